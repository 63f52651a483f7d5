"""Open Inference Protocol v2 (KServe / Triton) request and response bodies, as pure functions over bytes.

Covers the JSON form and the binary tensor data extension that tritonclient uses by default: the body is a
JSON header of `Inference-Header-Content-Length` bytes followed by each binary input's raw bytes, in input
order, each input naming its share in `parameters.binary_data_size`. BYTES tensors are a run of elements,
each a 4-byte little-endian length and that many bytes. Numeric binary data is little-endian, row-major.

No model knowledge lives here: which inputs a model takes, their shapes and dtypes, is the front end's job.
TorchServe 0.12's gRPC bridge (OpenInferenceProtocolImpl) turns a gRPC ModelInfer into a JSON body with
BYTES as base64 and no HTTP headers at all, and its reply parser requires id/model_name/model_version/outputs
in every answer; `parse_request(..., grpc=True)` and `grpc_error_body` handle those two quirks.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from handlers.errors import (
    BinarySizeMismatch,
    DTypeMismatch,
    MalformedJSON,
    MalformedOipRequest,
    ShapeMismatch,
    UnknownOutput,
    UnsupportedDatatype,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
JSON_CONTENT_TYPE = "application/json"

# OIP datatype -> numpy dtype, little-endian as the extension specifies. BYTES is an object array of `bytes`.
NUMERIC_DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("uint8"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("int8"), "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*NUMERIC_DATATYPES, "BYTES")
_DATATYPE_OF = {dtype.newbyteorder("=").str: name for name, dtype in NUMERIC_DATATYPES.items()}


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of the request's `outputs`: which output, and whether its data comes back binary."""

    name: str
    binary: bool


@dataclass
class OipRequest:
    """A parsed infer request. `outputs` empty means every output; `binary_output` is the default for those."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: Optional[str] = None
    parameters: dict = field(default_factory=dict)
    outputs: tuple[RequestedOutput, ...] = ()
    binary_output: bool = False


@dataclass(frozen=True)
class OipResponse:
    """An encoded answer: the body, and the header value to send when it carries binary outputs."""

    body: bytes
    header_length: Optional[int]
    content_type: str

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.header_length is None else {HEADER_LENGTH: str(self.header_length)}


def datatype_of(array: np.ndarray) -> str:
    """The OIP datatype of an array; strings and bytes (object, `U`, `S` arrays) are BYTES."""
    if array.dtype.kind in "OUS":
        return "BYTES"
    try:
        return _DATATYPE_OF[array.dtype.newbyteorder("=").str]
    except KeyError:
        raise UnsupportedDatatype(f"outputs of dtype {array.dtype} have no OIP datatype") from None


# --- requests ------------------------------------------------------------------------------------------


def parse_request(body: bytes, header_length: Optional[str] = None, grpc: bool = False) -> OipRequest:
    """Parse an infer request body.

    Args: body: the raw request bytes; header_length: the `Inference-Header-Content-Length` header (None when
        absent: the whole body is JSON); grpc: the body came through TorchServe's gRPC bridge (BYTES in base64).
    Returns: the inputs as arrays of their declared shape and datatype, plus id, parameters, requested outputs.
    Raises: MalformedJSON, MalformedOipRequest, BinarySizeMismatch, UnsupportedDatatype, ShapeMismatch,
        DTypeMismatch.
    """
    header, binary = _split(body, header_length)
    return parse_document(_load_header(header), binary, grpc)


def parse_document(document: Any, binary: bytes | memoryview = b"", grpc: bool = False) -> OipRequest:
    """Parse an already-decoded JSON request (and the binary data after its header, if any); see parse_request."""
    if not isinstance(document, dict):
        raise MalformedOipRequest(f"OIP request must be a JSON object, got {type(document).__name__}")
    binary = memoryview(binary)
    tensors = document.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise MalformedOipRequest("OIP 'inputs' must be a non-empty list of tensors")
    parameters = _parameters(document, "request")
    request = OipRequest(inputs={}, datatypes={}, parameters=parameters,
                         binary_output=bool(parameters.get("binary_data_output", False)))
    if "id" in document:
        request.id = str(document["id"])
    offset = 0
    for i, tensor in enumerate(tensors):
        name, datatype, shape, size = _describe(i, tensor)
        if name in request.inputs:
            raise MalformedOipRequest(f"OIP input '{name}' appears twice")
        if size is None:
            if "data" not in tensor:
                raise MalformedOipRequest(f"OIP input '{name}' has neither 'data' nor parameters.binary_data_size")
            array = _from_json(name, datatype, shape, tensor["data"], grpc)
        else:
            if offset + size > len(binary):
                raise BinarySizeMismatch(f"OIP input '{name}' declares {size} binary bytes but only "
                                         f"{len(binary) - offset} remain after the JSON header")
            array = _from_binary(name, datatype, shape, binary[offset:offset + size])
            offset += size
        request.inputs[name] = array
        request.datatypes[name] = datatype
    if offset != len(binary):
        raise BinarySizeMismatch(f"the body has {len(binary) - offset} binary bytes that no input's "
                                 f"binary_data_size accounts for")
    request.outputs = _requested(document.get("outputs"), request.binary_output)
    return request


def _split(body: bytes, header_length: Optional[str]) -> tuple[bytes, memoryview]:
    if header_length is None or str(header_length).strip() == "":
        return body, memoryview(b"")
    try:
        length = int(str(header_length).strip())
    except ValueError:
        raise MalformedOipRequest(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if not 0 < length <= len(body):
        raise BinarySizeMismatch(f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes")
    # One copy into a bytearray makes every decoded array writable (torch.from_numpy warns on read-only ones).
    return body[:length], memoryview(bytearray(body[length:]))


def _load_header(header: bytes) -> Any:
    try:
        document = json.loads(header)
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"OIP JSON header is not UTF-8: {exc.reason} at byte {exc.start}; binary tensor "
                            f"data needs the {HEADER_LENGTH} header") from exc
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"OIP JSON header is malformed: {exc.msg} at line {exc.lineno} column {exc.colno}"
                            ) from exc
    except RecursionError as exc:
        raise MalformedJSON("OIP JSON header is nested too deeply") from exc
    return document


def _parameters(owner: Mapping, where: str) -> dict:
    parameters = owner.get("parameters", {})
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise MalformedOipRequest(f"OIP {where} 'parameters' must be an object")
    return parameters


def _describe(i: int, tensor: Any) -> tuple[str, str, tuple[int, ...], Optional[int]]:
    """name, datatype, shape and binary size (None: JSON data) of inputs[i], each checked."""
    if not isinstance(tensor, dict):
        raise MalformedOipRequest(f"OIP inputs[{i}] must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedOipRequest(f"OIP inputs[{i}] needs a 'name'")
    missing = [k for k in ("shape", "datatype") if k not in tensor]
    if missing:
        raise MalformedOipRequest(f"OIP input '{name}' lacks {', '.join(missing)}")
    datatype = tensor["datatype"]
    if datatype not in DATATYPES:
        raise UnsupportedDatatype(f"OIP input '{name}' has datatype {datatype!r}; supported: {', '.join(DATATYPES)}")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise MalformedOipRequest(f"OIP input '{name}' shape must be a list of non-negative integers, got {shape!r}")
    size = _parameters(tensor, f"input '{name}'").get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise MalformedOipRequest(f"OIP input '{name}' binary_data_size must be a non-negative integer")
    return name, datatype, tuple(shape), size


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # Python ints: a hostile shape must not wrap around to the data's length


def _from_binary(name: str, datatype: str, shape: tuple[int, ...], chunk: memoryview) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        return _unpack_bytes(name, shape, count, chunk)
    dtype = NUMERIC_DATATYPES[datatype]
    if len(chunk) != count * dtype.itemsize:
        raise BinarySizeMismatch(f"OIP input '{name}' is {datatype} of shape {list(shape)}: {count * dtype.itemsize} "
                                 f"bytes, but binary_data_size says {len(chunk)}")
    if datatype == "BOOL":  # any non-zero byte is true; viewing arbitrary bytes as numpy bool is undefined
        return (np.frombuffer(chunk, dtype=np.uint8) != 0).reshape(shape)
    return np.frombuffer(chunk, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _unpack_bytes(name: str, shape: tuple[int, ...], count: int, chunk: memoryview) -> np.ndarray:
    items, at = [], 0
    while at < len(chunk):
        if at + 4 > len(chunk):
            raise BinarySizeMismatch(f"OIP BYTES input '{name}' ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", chunk, at)
        if at + 4 + length > len(chunk):
            raise BinarySizeMismatch(f"OIP BYTES input '{name}' element {len(items)} claims {length} bytes; "
                                     f"only {len(chunk) - at - 4} remain")
        items.append(bytes(chunk[at + 4:at + 4 + length]))
        at += 4 + length
    if len(items) != count:
        raise BinarySizeMismatch(f"OIP BYTES input '{name}' of shape {list(shape)} needs {count} elements, "
                                 f"the binary data holds {len(items)}")
    return _object_array(items, shape)


def _object_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _from_json(name: str, datatype: str, shape: tuple[int, ...], data: Any, grpc: bool) -> np.ndarray:
    count = _count(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        _check_count(name, shape, len(flat), count)
        return _object_array([_as_bytes(name, v, grpc) for v in flat], shape)
    values = _numbers(data)
    _check_count(name, shape, values.size, count)
    kind = values.dtype.kind
    if datatype == "BOOL":
        if kind != "b" and values.size:
            raise DTypeMismatch(f"OIP input '{name}' is BOOL: values must be true or false")
        return values.astype(bool).reshape(shape)
    if kind not in "iuf" and values.size:  # strings, nulls, objects, or booleans for a number
        raise DTypeMismatch(f"OIP input '{name}' is {datatype}: values must be numbers")
    dtype = NUMERIC_DATATYPES[datatype].newbyteorder("=")
    if dtype.kind in "iu" and values.size:
        if kind == "f" and not np.all(np.mod(values, 1) == 0):  # NaN and infinity fail this too
            raise DTypeMismatch(f"OIP input '{name}' is {datatype}: values must be integers")
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise DTypeMismatch(f"OIP input '{name}' has values outside the {datatype} range")
    with np.errstate(over="ignore", invalid="ignore"):  # FP16/32 overflow is inf: the front end refuses it
        return values.astype(dtype).reshape(shape)


def _numbers(data: Any) -> np.ndarray:
    """JSON values as one flat array, vectorised: numpy parses well-formed nested lists in C. Ragged nesting,
    and integers beyond 64 bits, take the slow path and come back as an object array (refused by the caller)."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        array = None
    if array is None or array.dtype.kind == "O":
        flat = _flatten(data)
        try:
            array = np.asarray(flat)
        except (ValueError, TypeError, OverflowError):
            array = np.empty(len(flat), dtype=object)
    return array.reshape(-1)


def _check_count(name: str, shape: tuple[int, ...], size: int, count: int) -> None:
    if size != count:
        raise ShapeMismatch(f"OIP input '{name}' has {size} values but shape {list(shape)} needs {count}")


def _flatten(data: Any) -> list:
    """OIP allows `data` flat or nested (row-major); either way only the element count must match the shape."""
    if not isinstance(data, list):
        data = [data]
    flat: list = []
    stack = [iter(data)]
    while stack:  # iterative: a hostile nesting depth must not overflow the interpreter's stack
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    return flat


def _as_bytes(name: str, value: Any, grpc: bool) -> bytes:
    if not isinstance(value, str):
        raise DTypeMismatch(f"OIP input '{name}' is BYTES: values must be strings")
    if grpc:  # TorchServe's gRPC bridge base64-encodes bytes_contents
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise DTypeMismatch(f"OIP input '{name}': gRPC BYTES value is not base64") from exc
    return value.encode("utf-8")


def _requested(outputs: Any, binary_default: bool) -> tuple[RequestedOutput, ...]:
    if outputs is None:
        return ()
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise MalformedOipRequest("OIP 'outputs' must be a list of objects with a 'name'")
    requested = []
    for o in outputs:
        binary = _parameters(o, f"output '{o['name']}'").get("binary_data", binary_default)
        requested.append(RequestedOutput(o["name"], bool(binary)))
    return tuple(requested)


# --- responses -----------------------------------------------------------------------------------------


def reply_meta(request: OipRequest) -> dict:
    """What the answer needs from the request (id, parameters, requested outputs, binary flags) as plain JSON
    values: front ends keep it in `Decoded.meta`, which the response cache hashes."""
    return {"id": request.id, "parameters": request.parameters,
            "outputs": [[o.name, o.binary] for o in request.outputs], "binary_output": request.binary_output}


def encode_response(model_name: str, model_version: str, outputs: Mapping[str, np.ndarray], reply: Mapping,
                    grpc: bool = False, extra: Optional[Mapping] = None) -> OipResponse:
    """Encode an infer answer.

    Args: outputs: output name -> array, in model order (every output the model produced);
        reply: `reply_meta` of the parsed request;
        grpc: answering through TorchServe's gRPC bridge, which needs an id and JSON data;
        extra: more top-level keys (e.g. the A/B variant that answered); OIP clients ignore unknown keys.
    Returns: the body, the `Inference-Header-Content-Length` value (None when all data is JSON), content type.
    Raises: UnknownOutput when the request names an output the model does not have.
    """
    wanted = [RequestedOutput(name, bool(binary)) for name, binary in reply.get("outputs") or ()]
    wanted = wanted or [RequestedOutput(name, bool(reply.get("binary_output"))) for name in outputs]
    unknown = [o.name for o in wanted if o.name not in outputs]
    if unknown:
        raise UnknownOutput(f"unknown output '{unknown[0]}'; this model has: {', '.join(outputs)}")
    document: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version), **(extra or {})}
    if reply.get("id") is not None or grpc:
        document["id"] = reply.get("id") or ""
    if reply.get("parameters"):
        document["parameters"] = reply["parameters"]
    tensors, chunks = [], []
    for o in wanted:
        array = np.asarray(outputs[o.name])
        tensor: dict[str, Any] = {"name": o.name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if o.binary and not grpc:
            chunk = _pack(array, tensor["datatype"])
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = _json_values(array, tensor["datatype"])
        tensors.append(tensor)
    document["outputs"] = tensors
    header = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return OipResponse(header, None, JSON_CONTENT_TYPE)
    return OipResponse(header + b"".join(chunks), len(header), BINARY_CONTENT_TYPE)


def _pack(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            raw = item.encode("utf-8") if isinstance(item, str) else bytes(item)
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    if datatype == "BOOL":
        return np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    return np.ascontiguousarray(array, dtype=NUMERIC_DATATYPES[datatype]).tobytes()


def _json_values(array: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item)
                for item in array.reshape(-1)]
    return array.reshape(-1).tolist()


def error_body(message: str) -> bytes:
    """The OIP error body, `{"error": "..."}`."""
    return json.dumps({"error": message}).encode("utf-8")


def grpc_error_body(model_name: str, model_version: str, request_id: Optional[str], message: str) -> bytes:
    """An error answer that TorchServe 0.12's gRPC bridge can carry.

    Its reply parser (GRPCJob.response) ignores the status and reads id, model_name, model_version and
    outputs from every answer; an `{"error": ...}` body makes it throw, which kills the worker and fails its
    whole batch. So the message travels as a BYTES output named "error" and the worker survives.
    """
    document = {"id": request_id or "", "model_name": model_name, "model_version": str(model_version),
                "outputs": [{"name": "error", "datatype": "BYTES", "shape": [1], "data": [message]}]}
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def is_grpc_bridge(headers: Mapping[str, str], payload: Any) -> bool:
    """TorchServe 0.12 hands the handler a gRPC ModelInfer as JSON with a "model_name" key and no request headers
    at all; an HTTP request always has some (Host)."""
    return not headers and isinstance(payload, (bytes, bytearray)) and b'"model_name"' in payload
