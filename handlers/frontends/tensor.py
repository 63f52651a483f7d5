"""Tensor front end: JSON, Open Inference Protocol v2, `.npy` and `.npz` requests -> validated named arrays.

Accepted bodies (per input: one sample of the declared shape, or up to `max_rows` stacked on a leading axis;
every input of a request has the same number of rows):
- `{"<input name>": [...], ...}` as JSON, one key per input; a one-input model also takes `{"data": [...]}` or
  a bare nested list;
- OIP v2: `{"inputs": [{"name": ..., "shape": [...], "datatype": "FP32", "data": [...]}, ...]}`;
- raw `.npy` bytes (numpy.save; one-input models) or `.npz` bytes (numpy.savez, one array per input name).
"""

from __future__ import annotations

import io
import json
import tokenize
import zipfile
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers import jsonio, oip
from handlers.errors import (
    DTypeMismatch,
    EmptyBody,
    MalformedJSON,
    MalformedPayload,
    MissingInput,
    NonFiniteInput,
    PayloadTooLarge,
    RowCountMismatch,
    ShapeMismatch,
    UnknownInput,
    UnknownOutput,
    UnsupportedMediaType,
)
from handlers.frontends import Batch, stack_by_shape, zeros_example
from handlers.postprocess import answer_rows, json_answer
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest, InputSpec

if TYPE_CHECKING:
    from handlers.pipeline import Answer

NPY_MAGIC = b"\x93NUMPY"
NPZ_MAGIC = b"PK\x03\x04"

OIP_DATATYPES = {
    "BOOL": "bool", "UINT8": "uint8", "INT8": "int8", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64",
}
NUMPY_TO_OIP = {v: k for k, v in OIP_DATATYPES.items()}

JSON_TYPES = ("application/json", "text/plain", "")


class TensorFrontend:
    """Decodes tensor requests against the archive's `InputSpec`s and encodes model outputs."""

    def __init__(self, manifest: ArtifactManifest, model_dir: str = ""):
        self.manifest = manifest
        self.specs = {spec.name: spec for spec in manifest.inputs}
        self.spec = manifest.inputs[0]

    def example_input(self) -> Decoded:
        return zeros_example(self.manifest)

    def collate(self, items: list[Decoded]) -> list[Batch]:
        return stack_by_shape(items)

    def decode(self, request: Request) -> Decoded:
        payload = request.payload
        grpc = oip.is_grpc_bridge(request.headers, payload)
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = self._from_bytes(bytes(payload), request)
            if isinstance(payload, Decoded):
                return payload
        elif isinstance(payload, str):
            payload = _parse_json(payload.encode("utf-8"))
        if payload is None or payload == {} or payload == []:
            raise EmptyBody(f"empty request: send {self._json_hint()}, an OIP v2 'inputs' body or .npy/.npz bytes")
        if isinstance(payload, dict) and "inputs" in payload and "inputs" not in self.specs:
            return self._from_oip(oip.parse_document(payload, grpc=grpc), grpc)
        if isinstance(payload, dict):
            return self._from_json_object(payload)
        if not isinstance(payload, list):
            raise MalformedJSON(f"expected a JSON object or list, got {type(payload).__name__}")
        if len(self.specs) > 1:
            raise MalformedJSON(f"this model takes several inputs: send {self._json_hint()}")
        return self._finish({self.spec.name: _to_array(payload, self.spec)}, protocol="json")

    def _from_bytes(self, payload: bytes, request: Request) -> Decoded | Any:
        """Binary bodies decoded at once; JSON bodies parsed (the caller reads them)."""
        header_length = request.header(oip.HEADER_LENGTH)
        if header_length is not None:  # OIP binary tensor extension: a JSON header, then raw tensor bytes
            self._check_size(payload)
            return self._from_oip(oip.parse_request(payload, header_length))
        if payload.startswith(NPY_MAGIC):
            self._check_size(payload)
            return self._from_npy(payload)
        if payload.startswith(NPZ_MAGIC):
            self._check_size(payload)
            return self._from_npz(payload)
        return self._json_from_bytes(payload, request.content_type)

    def _json_hint(self) -> str:
        if len(self.specs) == 1:
            return '{"data": [...]}'
        return "{" + ", ".join(f'"{name}": [...]' for name in self.specs) + "}"

    def _from_json_object(self, payload: dict) -> Decoded:
        if len(self.specs) == 1 and "data" in payload and self.spec.name not in payload:
            return self._finish({self.spec.name: _to_array(payload["data"], self.spec)}, protocol="json")
        known = [k for k in payload if k in self.specs]
        if not known:
            raise MalformedJSON(f"JSON object has none of the model's inputs; send {self._json_hint()} "
                                f"(keys: {sorted(payload)[:5]})")
        self._check_names(payload, where="JSON key")
        return self._finish({name: _to_array(payload[name], self.specs[name]) for name in self.specs},
                            protocol="json")

    def _check_names(self, named: Any, where: str) -> None:
        """Every declared input present, nothing else: an unknown name is most often a typo of a known one."""
        unknown = [k for k in named if k not in self.specs]
        if unknown:
            raise UnknownInput(f"unknown input '{unknown[0]}' ({where}); this model takes: {', '.join(self.specs)}")
        missing = [name for name in self.specs if name not in named]
        if missing:
            raise MissingInput(f"input '{missing[0]}' is missing; this model takes: {', '.join(self.specs)}")

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
                f"content type '{content_type}' is not supported; send application/json, .npy or .npz bytes")
        return _parse_json(payload)

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> dict:
        if decoded.protocol == "oip":
            return self._encode_oip(decoded, outputs, meta)
        return json_answer(meta, answer_rows(self.manifest, outputs), decoded.single)

    def _encode_oip(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> Answer:
        from handlers.pipeline import Answer  # the pipeline imports the front ends

        if decoded.single:
            outputs = {name: array[0] for name, array in outputs.items()}
        extra = {k: v for k, v in meta.items() if k not in ("model", "version")}
        response = oip.encode_response(meta.get("model"), meta.get("version"), outputs, decoded.meta,
                                       grpc=decoded.meta.get("grpc", False), extra=extra)
        return Answer(200, {}, rows=decoded.rows, raw=response.body, content_type=response.content_type,
                      headers=response.headers)

    def _from_npy(self, payload: bytes) -> Decoded:
        if len(self.specs) > 1:
            raise MalformedPayload(f"a .npy body holds one array; this model takes {', '.join(self.specs)}: "
                                   "send .npz bytes (numpy.savez with one array per input name)")
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        # numpy parses the header with Python's tokenizer: a damaged one raises SyntaxError or TokenError.
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError,
                UnicodeDecodeError) as exc:
            raise MalformedPayload(f"body looks like .npy but does not parse: {exc}") from exc
        return self._finish({self.spec.name: array}, protocol="npy")

    def _from_npz(self, payload: bytes) -> Decoded:
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
                self._check_names(archive.files, where=".npz array")
                arrays = {name: archive[name] for name in self.specs}
        except (ValueError, OSError, EOFError, SyntaxError, tokenize.TokenError, TypeError, UnicodeDecodeError,
                zipfile.BadZipFile, KeyError) as exc:
            raise MalformedPayload(f"body looks like .npz but does not parse: {exc}") from exc
        return self._finish(arrays, protocol="npz")

    def _from_oip(self, request: oip.OipRequest, grpc: bool = False) -> Decoded:
        arrays = request.inputs
        if len(self.specs) == 1:
            if len(arrays) != 1:
                raise ShapeMismatch(f"this model takes one input tensor ('{self.spec.name}'), got {len(arrays)}")
            arrays = {self.spec.name: next(iter(arrays.values()))}  # any name will do (INPUT__0 and the like)
        self._check_names(arrays, where="OIP input")
        unknown = [o.name for o in request.outputs if o.name not in self.manifest.outputs]
        if unknown:  # refused before inference, not after
            raise UnknownOutput(f"unknown output '{unknown[0]}'; this model has: {', '.join(self.manifest.outputs)}")
        decoded = self._finish({name: arrays[name] for name in self.specs}, protocol="oip")
        decoded.meta.update(oip.reply_meta(request), grpc=grpc)
        return decoded

    def _finish(self, arrays: dict[str, np.ndarray], protocol: str) -> Decoded:
        """Shape first (the more basic mistake), then rows shared by every input, then dtype and values."""
        if len(arrays) == 1:  # the common case, kept cheap: it runs once per request on the serving path
            (name, array), = arrays.items()
            shaped_array, single = self._shaped(array, self.specs[name])
            return Decoded({name: _checked_dtype(shaped_array, self.specs[name])}, single=single, protocol=protocol)
        shaped = {name: self._shaped(array, self.specs[name]) for name, array in arrays.items()}
        singles = {single for _, single in shaped.values()}
        rows = {name: array.shape[0] for name, (array, _) in shaped.items()}
        if len(singles) > 1 or len(set(rows.values())) > 1:
            shown = ", ".join(f"{name}: {'1 (no batch axis)' if shaped[name][1] else n}" for name, n in rows.items())
            raise RowCountMismatch(f"inputs must share their rows (the batch axis); got {shown}")
        inputs = {name: _checked_dtype(array, self.specs[name]) for name, (array, _) in shaped.items()}
        return Decoded(inputs, single=singles.pop(), protocol=protocol)

    def _shaped(self, array: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, bool]:
        if _matches(array.shape, spec.shape):
            return array[np.newaxis], True
        if array.ndim == len(spec.shape) + 1 and _matches(array.shape[1:], spec.shape):
            if array.shape[0] == 0:
                raise EmptyBody("request holds zero samples")
            if array.shape[0] > spec.max_rows:
                raise PayloadTooLarge(f"request holds {array.shape[0]} samples; at most {spec.max_rows} allowed")
            return array, False
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
