"""Tensor front end: JSON, Open Inference Protocol v2 and `.npy` requests -> validated arrays.

Accepted bodies (one sample of the declared shape, or up to `max_rows` stacked on a leading axis):
- `{"data": [...]}` or a bare nested list, as JSON;
- OIP v2: `{"inputs": [{"name": ..., "shape": [...], "datatype": "FP32", "data": [...]}]}`;
- raw `.npy` bytes (numpy.save), any content type.
"""

from __future__ import annotations

import io
import json
import tokenize
from typing import Any

import numpy as np

from handlers import jsonio
from handlers.errors import (
    DTypeMismatch,
    EmptyBody,
    MalformedJSON,
    MalformedPayload,
    NonFiniteInput,
    PayloadTooLarge,
    ShapeMismatch,
    UnsupportedMediaType,
)
from handlers.postprocess import format_rows
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest, InputSpec

NPY_MAGIC = b"\x93NUMPY"

OIP_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
NUMPY_TO_OIP = {v: k for k, v in OIP_DATATYPES.items()}

JSON_TYPES = ("application/json", "text/plain", "")


class TensorFrontend:
    """Decodes tensor requests against the archive's `InputSpec` and encodes model outputs."""

    def __init__(self, manifest: ArtifactManifest):
        self.manifest = manifest
        self.spec = manifest.input

    def decode(self, request: Request) -> Decoded:
        payload = request.payload
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload)
            if payload.startswith(NPY_MAGIC):
                self._check_size(payload)
                return self._from_npy(payload)
            payload = self._json_from_bytes(payload, request.content_type)
        elif isinstance(payload, str):
            payload = _parse_json(payload.encode("utf-8"))
        if payload is None or payload == {} or payload == []:
            raise EmptyBody("empty request: send {\"data\": [...]}, an OIP v2 'inputs' body or .npy bytes")
        if isinstance(payload, dict) and "inputs" in payload:
            return self._from_oip(payload)
        if isinstance(payload, dict):
            if "data" not in payload:
                raise MalformedJSON(f"JSON object has no 'data' or 'inputs' key (keys: {sorted(payload)[:5]})")
            payload = payload["data"]
        elif not isinstance(payload, list):
            raise MalformedJSON(f"expected a JSON object or list, got {type(payload).__name__}")
        return self._finish(_to_array(payload, self.spec), protocol="json")

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.manifest.max_body_bytes:
            raise PayloadTooLarge(
                f"body has {len(payload)} bytes; this model accepts at most {self.manifest.max_body_bytes}")

    def _json_from_bytes(self, payload: bytes, content_type: str) -> Any:
        self._check_size(payload)
        if content_type == "application/x-www-form-urlencoded":
            raise UnsupportedMediaType(
                "form-encoded body; send JSON with 'Content-Type: application/json' or .npy bytes")
        if content_type not in JSON_TYPES and payload.lstrip()[:1] not in (b"{", b"["):
            raise UnsupportedMediaType(
                f"content type '{content_type}' is not supported; send application/json or .npy bytes")
        return _parse_json(payload)

    def encode(self, decoded: Decoded, outputs: np.ndarray, meta: dict) -> dict:
        if decoded.protocol == "oip":
            body = {"model_name": meta.get("model"), "model_version": meta.get("version")}
            body.update({k: v for k, v in meta.items() if k not in ("model", "version")})
            if "id" in decoded.meta:
                body["id"] = decoded.meta["id"]
            shape = list(outputs.shape[1:] if decoded.single else outputs.shape)
            body["outputs"] = [{
                "name": "output", "shape": shape, "datatype": NUMPY_TO_OIP.get(str(outputs.dtype), "FP32"),
                "data": outputs.reshape(-1).tolist(),
            }]
            return body
        rows = format_rows(self.manifest.output, outputs)
        body = dict(meta)
        if decoded.single:
            body.update(rows[0])
        else:
            body["results"] = rows
        return body

    def _from_npy(self, payload: bytes) -> Decoded:
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        # numpy parses the header with Python's tokenizer: a damaged one raises SyntaxError or TokenError.
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError,
                UnicodeDecodeError) as exc:
            raise MalformedPayload(f"body looks like .npy but does not parse: {exc}") from exc
        return self._finish(array, protocol="npy")

    def _from_oip(self, payload: dict) -> Decoded:
        inputs = payload.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise MalformedJSON("OIP 'inputs' must be a non-empty list")
        if len(inputs) != 1:
            raise ShapeMismatch(f"this model takes one input tensor ('{self.spec.name}'), got {len(inputs)}")
        tensor = inputs[0]
        if not isinstance(tensor, dict):
            raise MalformedJSON("OIP inputs[0] must be an object with name, shape, datatype and data")
        missing = [k for k in ("shape", "datatype", "data") if k not in tensor]
        if missing:
            raise MalformedJSON(f"OIP inputs[0] lacks {', '.join(missing)}")
        datatype = str(tensor["datatype"]).upper()
        if datatype not in OIP_DATATYPES:
            raise DTypeMismatch(
                f"OIP datatype '{tensor['datatype']}' is not supported; use one of {sorted(OIP_DATATYPES)}")
        shape = tensor["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise MalformedJSON(f"OIP shape must be a list of non-negative integers, got {shape!r}")
        array = _to_array(tensor["data"], self.spec, declared=OIP_DATATYPES[datatype])
        if array.size != int(np.prod(shape)):
            raise ShapeMismatch(f"OIP data has {array.size} values but shape {shape} needs {int(np.prod(shape))}")
        decoded = self._finish(array.reshape(shape), protocol="oip")
        if "id" in payload:
            decoded.meta["id"] = payload["id"]
        return decoded

    def _finish(self, array: np.ndarray, protocol: str) -> Decoded:
        """Shape first (the more basic mistake), then dtype and values."""
        decoded = self._shaped(array, protocol)
        decoded.array = _checked_dtype(decoded.array, self.spec)
        return decoded

    def _shaped(self, array: np.ndarray, protocol: str) -> Decoded:
        spec = self.spec
        if _matches(array.shape, spec.shape):
            return Decoded(array[np.newaxis], single=True, protocol=protocol)
        if array.ndim == len(spec.shape) + 1 and _matches(array.shape[1:], spec.shape):
            if array.shape[0] == 0:
                raise EmptyBody("request holds zero samples")
            if array.shape[0] > spec.max_rows:
                raise PayloadTooLarge(f"request holds {array.shape[0]} samples; at most {spec.max_rows} allowed")
            return Decoded(array, single=False, protocol=protocol)
        expected = tuple("N" if d == -1 else d for d in spec.shape)
        raise ShapeMismatch(
            f"input '{spec.name}' must have shape {_fmt(expected)} or (rows, {_fmt(expected)[1:-1]}); "
            f"got {_fmt(array.shape)}")


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return None
    try:
        return jsonio.loads(raw)
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"body is not UTF-8 JSON: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise MalformedJSON("malformed JSON: nested too deeply") from exc


def _to_array(values: Any, spec: InputSpec, declared: str | None = None) -> np.ndarray:
    """Nested JSON lists -> array of the spec's dtype, refusing ragged lists, strings and lossy casts."""
    if not isinstance(values, list):
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            raise ShapeMismatch(f"input '{spec.name}' must be a list of numbers, got a single number")
        raise MalformedJSON(f"input '{spec.name}' must be a (nested) list of numbers, got {type(values).__name__}")
    try:
        array = np.asarray(values, dtype=declared) if declared else np.asarray(values)
    except (ValueError, TypeError, OverflowError) as exc:
        message = str(exc)
        if "inhomogeneous" in message or "sequence" in message:
            raise ShapeMismatch(f"input '{spec.name}' is a ragged list: rows differ in length") from exc
        expected = declared or "numbers"
        raise DTypeMismatch(f"input '{spec.name}' holds values that are not {expected}: {message}") from exc
    except RecursionError as exc:
        raise ShapeMismatch(f"input '{spec.name}' is nested too deeply") from exc
    return array


def _checked_dtype(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    target = np.dtype(spec.dtype)
    kind = array.dtype.kind
    if kind in "OUSV" or (kind == "b" and target.kind != "b"):
        shown = {"O": "mixed or non-numeric values", "U": "strings", "S": "bytes", "V": "records",
                 "b": "booleans"}[kind]
        raise DTypeMismatch(f"input '{spec.name}' must be {spec.dtype}, got {shown}")
    if target.kind in "iu" and kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise DTypeMismatch(f"input '{spec.name}' must be integers ({spec.dtype}), got fractional values")
    if target.kind in "iu" and kind in "iuf":
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DTypeMismatch(f"input '{spec.name}' has values outside the {spec.dtype} range")
    if target.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            converted = array.astype(target, copy=False)
        if not spec.allow_nonfinite and not np.all(np.isfinite(converted)):
            if kind == "f" and not np.all(np.isfinite(array)):
                raise NonFiniteInput(f"input '{spec.name}' contains NaN or infinity")
            raise NonFiniteInput(f"input '{spec.name}' has values beyond the {spec.dtype} range")
        return converted
    return array.astype(target, copy=False)


def _matches(shape: tuple, expected: tuple) -> bool:
    """Same rank, fixed axes equal, free (-1) axes of any length but 0."""
    return len(shape) == len(expected) and all(s > 0 if e == -1 else s == e for s, e in zip(shape, expected))


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"
