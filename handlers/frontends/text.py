"""Text front end: sentences -> token ids with the archive's `tokenizer.json`, and logits -> top-k labels.

Accepted bodies (up to `text.max_texts` texts per request):
- `{"text": "..."}` (one text; the answer is not a list) or `{"texts": ["...", ...]}`, as JSON; a bare JSON
  string or list of strings works too;
- a `text/plain` body (one text, UTF-8);
- OIP v2: `{"inputs": [{"name": "text", "shape": [n], "datatype": "BYTES", "data": ["...", ...]}]}`.

Tokenization is Hugging Face `tokenizers` (Rust, one batch call per request); texts longer than
`text.max_length` tokens are truncated and the answer says `"truncated": true`. A request's rows are padded to
its own longest text, and `collate` pads a TorchServe batch to the longest row in it (not to `max_length`), with
`attention_mask` 0 on the padding, so short texts do not pay for long ones' length more than once per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
from tokenizers import Tokenizer

from handlers import jsonio
from handlers.errors import (
    DTypeMismatch,
    EmptyBody,
    EmptyText,
    MalformedJSON,
    ModelLoadError,
    NotText,
    NotUTF8,
    PayloadTooLarge,
    ShapeMismatch,
    SpecError,
    TooManyTexts,
    UnsupportedMediaType,
)
from handlers.frontends import Batch
from handlers.oip import datatype_of
from handlers.postprocess import answer_rows, json_answer
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest, TextSpec

JSON_TYPES = ("application/json", "text/json")
# A body with no content type is read as JSON when it looks like JSON, else as plain text.
JSON_STARTS = ("{", "[", '"')
EXAMPLE_TEXT = "an example sentence for the warm-up run"


class TextEncoder:
    """Texts -> named int arrays with the tokenizer of a `TextSpec`; shared by the front end and the build.

    Args:
        tokenizer: a `tokenizers.Tokenizer`; its padding and truncation settings are replaced by the spec's.
        spec: which model inputs to fill (input ids, attention mask, token type ids), `max_length`, `pad_id`.
        dtypes: dtype per input name (default int64).
    """

    def __init__(self, tokenizer: Tokenizer, spec: TextSpec, dtypes: Optional[dict[str, Any]] = None):
        self.tokenizer = tokenizer
        self.spec = spec
        # Padding is ours (to the batch's longest row, across requests); truncation is the tokenizer's, so the
        # closing special token ([SEP], </s>) survives it.
        tokenizer.no_padding()
        tokenizer.enable_truncation(spec.max_length)
        # input name -> (which field of an Encoding fills it, value on padding)
        self.fields: dict[str, tuple[str, int]] = {spec.input_ids: ("ids", spec.pad_id)}
        if spec.attention_mask:
            self.fields[spec.attention_mask] = ("attention_mask", 0)
        if spec.token_type_ids:
            self.fields[spec.token_type_ids] = ("type_ids", 0)
        dtypes = dtypes or {}
        self.dtypes = {name: np.dtype(dtypes.get(name, "int64")) for name in self.fields}

    @classmethod
    def from_file(cls, path: str, spec: TextSpec, dtypes: Optional[dict[str, Any]] = None) -> TextEncoder:
        """Raises ModelLoadError when the file is missing or is not a tokenizers JSON file."""
        if not os.path.isfile(path):
            raise ModelLoadError(f"tokenizer file {path} not found; the archive must ship text.tokenizer")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # the Rust side raises plain Exception for unreadable files
            raise ModelLoadError(f"{path} is not a Hugging Face tokenizers file: {exc}") from exc
        return cls(tokenizer, spec, dtypes)

    def encode(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], list[bool]]:
        """(arrays padded to the longest of `texts`, whether each text was truncated)."""
        # The fast variant skips character offsets, which serving never reads: 54 us against 81 us for one
        # 20-token text, measured here. Truncation and `overflowing` work the same.
        encodings = self.tokenizer.encode_batch_fast(list(texts))
        length = max(len(e.ids) for e in encodings)
        arrays = {name: np.full((len(encodings), length), pad, dtype=self.dtypes[name])
                  for name, (_, pad) in self.fields.items()}
        for row, encoding in enumerate(encodings):
            for name, (attribute, _) in self.fields.items():
                values = getattr(encoding, attribute)
                arrays[name][row, :len(values)] = values
        # The tokenizer keeps what truncation cut off in `overflowing`; nothing there means nothing was cut.
        return arrays, [bool(e.overflowing) for e in encodings]

    def pad(self, parts: Sequence[dict[str, np.ndarray]], length: Optional[int] = None) -> dict[str, np.ndarray]:
        """Concatenate row groups, padding each on the right to `length` (default: the longest of them)."""
        length = length or max(part[self.spec.input_ids].shape[1] for part in parts)
        padded = {}
        for name, (_, pad) in self.fields.items():
            blocks = []
            for part in parts:
                array = part[name]
                if array.shape[1] < length:
                    array = np.pad(array, ((0, 0), (0, length - array.shape[1])), constant_values=pad)
                blocks.append(array)
            padded[name] = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
        return padded


class TextFrontend:
    """Decodes text requests with the archive's tokenizer and answers with the model's top-k labels."""

    def __init__(self, manifest: ArtifactManifest, model_dir: str = ""):
        self.manifest = manifest
        spec = manifest.text
        if spec is None:
            raise SpecError("text: required when frontend is 'text'")
        dtypes = {i.name: i.dtype for i in manifest.inputs}
        self.encoder = TextEncoder.from_file(os.path.join(model_dir, spec.tokenizer), spec, dtypes)
        _check_inputs(set(dtypes), set(self.encoder.fields))
        self.spec = spec
        # Padding every batch to max_length is what naive text servers do; it exists here so the benchmark can
        # report both. TextSpec.padding ("longest" | "max_length") is read with a default until the field lands.
        self.pad_to_max_length = getattr(spec, "padding", "longest") == "max_length"

    # --- decode ------------------------------------------------------------------------------------------

    def decode(self, request: Request) -> Decoded:
        texts, single, protocol, meta = self._texts(request)
        return self.tokenize(texts, single, protocol, meta)

    def tokenize(self, texts: list[str], single: bool, protocol: str, meta: Optional[dict] = None) -> Decoded:
        """Checked texts -> a `Decoded` whose meta["truncated"] lists, per row, whether truncation cut it."""
        _check_texts(texts, self.spec.max_texts)
        inputs, truncated = self.encoder.encode(texts)
        return Decoded(inputs, single=single, protocol=protocol, meta={**(meta or {}), "truncated": truncated})

    def _texts(self, request: Request) -> tuple[list[str], bool, str, dict]:
        payload, content_type = request.payload, request.content_type
        if isinstance(payload, (bytes, bytearray, memoryview)):
            self._check_size(len(payload))
            _check_media_type(content_type)
            payload = _utf8(bytes(payload))
        elif isinstance(payload, str):
            self._check_size(len(payload.encode("utf-8", errors="surrogatepass")))
            _check_media_type(content_type)
        # dict/list: JSON TorchServe already parsed (decode_input_request=true); its max_request_size bounded it.
        elif payload is not None and not isinstance(payload, (dict, list)):
            raise NotText(f"expected text or JSON, got {type(payload).__name__}")
        if isinstance(payload, str):
            if not _is_json(payload, content_type):
                return [payload], True, "text", {}
            payload = _parse_json(payload)
        return self._from_json(payload)

    def _check_size(self, size: int) -> None:
        if size > self.manifest.max_body_bytes:
            raise PayloadTooLarge(f"body has {size} bytes; this model accepts at most {self.manifest.max_body_bytes}")

    def _from_json(self, payload: Any) -> tuple[list[str], bool, str, dict]:
        if payload is None or payload == {} or payload == []:
            raise EmptyBody('empty request: send {"text": "..."}, {"texts": [...]}, text/plain or OIP v2 BYTES')
        if isinstance(payload, str):
            return [payload], True, "json", {}
        if isinstance(payload, list):
            return _strings(payload, "the JSON list"), False, "json", {}
        if not isinstance(payload, dict):
            raise NotText(f"expected a JSON object, string or list of strings, got {_json_type(payload)}")
        if "inputs" in payload:
            return _from_oip(payload)
        if "text" in payload and "texts" in payload:
            raise MalformedJSON("give 'text' (one) or 'texts' (a list), not both")
        if "text" in payload:
            text = payload["text"]
            if not isinstance(text, str):
                raise NotText(f"'text' must be a string, got {_json_type(text)}; several texts go in 'texts'")
            return [text], True, "json", {}
        if "texts" in payload:
            return _strings(payload["texts"], "'texts'"), False, "json", {}
        raise MalformedJSON(f'JSON object has no "text", "texts" or "inputs" key (keys: {sorted(payload)[:5]})')

    # --- batch, warm-up, answer ----------------------------------------------------------------------------

    def example_input(self) -> Decoded:
        return self.tokenize([EXAMPLE_TEXT], single=True, protocol="text")

    def collate(self, items: list[Decoded]) -> list[Batch]:
        """One batch for all items, padded to the longest row among them (or to max_length, for comparison)."""
        length = self.spec.max_length if self.pad_to_max_length else None
        return [(list(range(len(items))), self.encoder.pad([item.inputs for item in items], length=length))]

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> dict:
        truncated = decoded.meta.get("truncated") or [False] * decoded.rows
        if decoded.protocol == "oip":
            return _oip_answer(decoded, outputs, meta, truncated)
        rows = answer_rows(self.manifest, outputs)
        for row, cut in zip(rows, truncated):
            if cut:
                row["truncated"] = True
        return json_answer(meta, rows, decoded.single)


def _check_inputs(declared: set[str], filled: set[str]) -> None:
    """The model's inputs must be exactly those the tokenizer fills (as the text spec names them)."""
    if declared != filled:
        raise SpecError(f"inputs: the text front end fills {', '.join(sorted(filled))} (text.input_ids, "
                        f"text.attention_mask, text.token_type_ids); the model takes {', '.join(sorted(declared))}")


def _check_texts(texts: list[str], max_texts: int) -> None:
    if not texts:
        raise EmptyText("the request holds no texts")
    if len(texts) > max_texts:
        raise TooManyTexts(f"request holds {len(texts)} texts; at most {max_texts} allowed")
    for i, text in enumerate(texts):
        if not text.strip():
            where = "the text" if len(texts) == 1 else f"text {i}"
            raise EmptyText(f"{where} is empty")


def _check_media_type(content_type: str) -> None:
    if content_type and not (content_type.startswith("text/") or _is_json_type(content_type)):
        raise UnsupportedMediaType(
            f"content type '{content_type}' is not supported; send text/plain or application/json")


def _utf8(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUTF8(f"body is not UTF-8: {exc.reason} at byte {exc.start}; send UTF-8 text") from exc


def _is_json_type(content_type: str) -> bool:
    return content_type in JSON_TYPES or content_type.endswith("+json")


def _is_json(body: str, content_type: str) -> bool:
    if _is_json_type(content_type):
        return True
    return not content_type and body.lstrip()[:1] in JSON_STARTS


def _parse_json(body: str) -> Any:
    if not body.strip():
        return None
    try:
        return jsonio.loads(body)
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError as exc:
        raise MalformedJSON("malformed JSON: nested too deeply") from exc


def _strings(values: Any, where: str) -> list[str]:
    if not isinstance(values, list):
        raise NotText(f"{where} must be a list of strings, got {_json_type(values)}")
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise NotText(f"{where}[{i}] must be a string, got {_json_type(value)}")
    return values


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def _from_oip(payload: dict) -> tuple[list[str], bool, str, dict]:
    """OIP v2, JSON form: one BYTES tensor whose data is a list of strings (one per row)."""
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise MalformedJSON("OIP 'inputs' must hold exactly one tensor object (the texts) for a text model")
    tensor = inputs[0]
    missing = [k for k in ("shape", "datatype", "data") if k not in tensor]
    if missing:
        raise MalformedJSON(f"OIP inputs[0] lacks {', '.join(missing)}")
    if str(tensor["datatype"]).upper() != "BYTES":
        raise DTypeMismatch(f"OIP datatype '{tensor['datatype']}' is not text; send datatype BYTES")
    texts = _strings(tensor["data"], "OIP inputs[0].data")
    shape = tensor["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise MalformedJSON(f"OIP shape must be a list of non-negative integers, got {shape!r}")
    if int(np.prod(shape)) != len(texts):
        raise ShapeMismatch(f"OIP data has {len(texts)} texts but shape {shape} needs {int(np.prod(shape))}")
    meta: dict[str, Any] = {"input_name": tensor.get("name")}
    if "id" in payload:
        meta["id"] = payload["id"]
    if isinstance(payload.get("parameters"), dict):
        meta["parameters"] = payload["parameters"]
    return texts, False, "oip", meta


def _oip_answer(decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict, truncated: list[bool]) -> dict:
    body = {"model_name": meta.get("model"), "model_version": meta.get("version")}
    body.update({k: v for k, v in meta.items() if k not in ("model", "version")})
    if "id" in decoded.meta:
        body["id"] = decoded.meta["id"]
    parameters = dict(decoded.meta.get("parameters") or {})
    if any(truncated):
        parameters["truncated"] = list(truncated)
    if parameters:
        body["parameters"] = parameters
    body["outputs"] = [{"name": name, "shape": list(array.shape), "datatype": datatype_of(array),
                        "data": array.reshape(-1).tolist()} for name, array in outputs.items()]
    return body

