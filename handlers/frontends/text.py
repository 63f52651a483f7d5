"""Text front end: sentences -> token ids with the archive's `tokenizer.json`, and logits -> top-k labels.

Accepted bodies (up to `text.max_texts` texts per request):
- `{"text": "..."}` (one text; the answer is not a list) or `{"texts": ["...", ...]}`, as JSON; a bare JSON
  string or list of strings works too;
- a `text/plain` body (one text, UTF-8);
- OIP v2 with one BYTES input (one UTF-8 text per element), as JSON
  (`{"inputs": [{"name": "text", "shape": [n], "datatype": "BYTES", "data": ["...", ...]}]}`) or with the binary
  tensor data extension (tritonclient's default); handlers/oip.py parses both, and answers the same way.

Tokenization is Hugging Face `tokenizers` (Rust, one batch call per request); texts longer than
`text.max_length` tokens are truncated and the answer says `"truncated": true`. A request's rows are padded to
its own longest text. `collate` sorts a TorchServe batch's requests by length and pads them in runs, each to its
own longest row (not to `max_length`), with `attention_mask` 0 on the padding: a run is split off only when the
padding it saves outweighs the fixed cost of one more model call (`length_runs`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from tokenizers import Tokenizer

from handlers import jsonio, oip
from handlers.errors import (
    DTypeMismatch,
    EmptyBody,
    EmptyText,
    MalformedJSON,
    MalformedOipRequest,
    ModelLoadError,
    NotText,
    NotUTF8,
    PayloadTooLarge,
    SpecError,
    TooManyTexts,
    UnknownOutput,
    UnsupportedMediaType,
)
from handlers.frontends import Batch
from handlers.postprocess import answer_rows, json_answer
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest, TextSpec

if TYPE_CHECKING:
    from handlers.pipeline import Answer

JSON_TYPES = ("application/json", "text/json")
# A body with no content type is read as JSON when it looks like JSON, else as plain text.
JSON_STARTS = ("{", "[", '"')
EXAMPLE_TEXT = "an example sentence for the warm-up run"
# The fixed cost of one more model call, in padded tokens (rows x length). Measured here: an ONNX Runtime call of the
# text benchmark's 2-layer BERT costs ~0.06 ms plus ~0.014 ms per token, linear in tokens at any batch size, so
# padding a batch of review-length texts (7-55 tokens) to its longest row cost 1.6x the time of runs split by length.
# Taken well above 4 tokens, so that rows split off only for a clear gain (bigger models gain more).
RUN_COST_TOKENS = 64


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
        # Padding every batch to max_length is what naive text servers do; it exists so the benchmark can
        # report both.
        self.pad_to_max_length = spec.padding == "max_length"

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
        grpc = oip.is_grpc_bridge(request.headers, payload)
        if isinstance(payload, (bytes, bytearray, memoryview)):
            payload = bytes(payload)
            self._check_size(len(payload))
            header_length = request.header(oip.HEADER_LENGTH)
            # The binary extension: a JSON header, then each BYTES element length-prefixed. Not UTF-8 as a
            # whole, and tritonclient sends it as application/octet-stream, so it is told apart by this header.
            if header_length is not None:
                return self._from_oip(oip.parse_request(payload, header_length, grpc=grpc), grpc)
            _check_media_type(content_type)
            payload = _utf8(payload)
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
        return self._from_json(payload, grpc)

    def _check_size(self, size: int) -> None:
        if size > self.manifest.max_body_bytes:
            raise PayloadTooLarge(f"body has {size} bytes; this model accepts at most {self.manifest.max_body_bytes}")

    def _from_json(self, payload: Any, grpc: bool = False) -> tuple[list[str], bool, str, dict]:
        if payload is None or payload == {} or payload == []:
            raise EmptyBody('empty request: send {"text": "..."}, {"texts": [...]}, text/plain or OIP v2 BYTES')
        if isinstance(payload, str):
            return [payload], True, "json", {}
        if isinstance(payload, list):
            return _strings(payload, "the JSON list"), False, "json", {}
        if not isinstance(payload, dict):
            raise NotText(f"expected a JSON object, string or list of strings, got {_json_type(payload)}")
        if "inputs" in payload:
            return self._from_oip(oip.parse_document(payload, grpc=grpc), grpc)
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

    def _from_oip(self, request: oip.OipRequest, grpc: bool) -> tuple[list[str], bool, str, dict]:
        """The texts of a parsed OIP request: its one BYTES input, any name and shape, one text per element."""
        if len(request.inputs) != 1:
            raise MalformedOipRequest(f"a text model takes one BYTES input (the texts); got {len(request.inputs)}: "
                                      f"{', '.join(request.inputs)}")
        (name, values), = request.inputs.items()
        if request.datatypes[name] != "BYTES":
            raise DTypeMismatch(f"OIP input '{name}' is {request.datatypes[name]}; a text model takes BYTES, "
                                "one UTF-8 text per element")
        unknown = [o.name for o in request.outputs if o.name not in self.manifest.outputs]
        if unknown:  # refused before inference, not after
            raise UnknownOutput(f"unknown output '{unknown[0]}'; this model has: {', '.join(self.manifest.outputs)}")
        texts = [_utf8_element(name, i, value) for i, value in enumerate(values.reshape(-1))]
        return texts, False, "oip", {**oip.reply_meta(request), "grpc": grpc}

    # --- batch, warm-up, answer ----------------------------------------------------------------------------

    def example_input(self) -> Decoded:
        return self.tokenize([EXAMPLE_TEXT], single=True, protocol="text")

    def collate(self, items: list[Decoded]) -> list[Batch]:
        """Runs of items of similar length, each padded to its longest row (`length_runs`); or one run of every item
        padded to max_length, for comparison."""
        if self.pad_to_max_length:
            return [(list(range(len(items))), self.encoder.pad([item.inputs for item in items],
                                                               length=self.spec.max_length))]
        lengths = [item.inputs[self.spec.input_ids].shape[1] for item in items]
        return [(run, self.encoder.pad([items[i].inputs for i in run]))
                for run in length_runs(lengths, [item.rows for item in items])]

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> dict | Answer:
        truncated = decoded.meta.get("truncated") or [False] * decoded.rows
        if decoded.protocol == "oip":
            return _oip_answer(decoded, outputs, meta, truncated)
        rows = answer_rows(self.manifest, outputs)
        for row, cut in zip(rows, truncated):
            if cut:
                row["truncated"] = True
        return json_answer(meta, rows, decoded.single)


def length_runs(lengths: Sequence[int], rows: Sequence[int], run_cost: int = RUN_COST_TOKENS) -> list[list[int]]:
    """Split items into runs of similar length that cost the fewest padded tokens, counting `run_cost` per run.

    Args: lengths: each item's padded length; rows: each item's rows; run_cost: one run's fixed cost, in tokens.
    Returns: runs of item indices, shortest items first; every index once.
    """
    # Items of one length always share a run, so the search is over the distinct lengths (at most max_length).
    groups: list[list] = []  # [length, rows, item indices], shortest first
    for i in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if not groups or groups[-1][0] != lengths[i]:
            groups.append([lengths[i], 0, []])
        groups[-1][1] += rows[i]
        groups[-1][2].append(i)
    # best[j]: the cheapest split of groups[:j]; a run of groups[i:j] pads to groups[j - 1]'s length.
    best, start = [0] + [math.inf] * len(groups), [0] * (len(groups) + 1)
    for j in range(1, len(groups) + 1):
        run_rows = 0
        for i in range(j - 1, -1, -1):
            run_rows += groups[i][1]
            cost = best[i] + run_cost + run_rows * groups[j - 1][0]
            if cost < best[j]:
                best[j], start[j] = cost, i
    runs, j = [], len(groups)
    while j > 0:
        runs.append([item for group in groups[start[j]:j] for item in group[2]])
        j = start[j]
    return runs[::-1]


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


def _utf8_element(name: str, index: int, value: Any) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUTF8(f"OIP input '{name}' element {index} is not UTF-8: {exc.reason} at byte {exc.start}; "
                      "send UTF-8 text") from exc


def _oip_answer(decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict, truncated: list[bool]) -> Answer:
    """The model's outputs as an OIP response (JSON or binary, as the request asked), through handlers/oip.py.

    Truncation goes in the response parameters as scalars, which is all OIP parameters may hold:
    `truncated: true` and the cut rows as `truncated_rows: "0,3"`.
    """
    from handlers.pipeline import Answer  # the pipeline imports the front ends

    reply = decoded.meta
    if any(truncated):
        rows = ",".join(str(i) for i, cut in enumerate(truncated) if cut)
        reply = {**reply, "parameters": {**(reply.get("parameters") or {}), "truncated": True, "truncated_rows": rows}}
    extra = {k: v for k, v in meta.items() if k not in ("model", "version")}
    response = oip.encode_response(meta.get("model"), meta.get("version"), outputs, reply,
                                   grpc=reply.get("grpc", False), extra=extra)
    return Answer(200, {}, rows=decoded.rows, raw=response.body, content_type=response.content_type,
                  headers=response.headers)
