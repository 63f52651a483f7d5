"""What an archive declares about its model: input, output, preprocessing, runtime, provenance.

The archiver writes an `ArtifactManifest` as `tspack-manifest.json` into every archive; the handlers read
it back. Both sides use these dataclasses, so the contract is declared once. `parse` turns plain
dicts (JSON, YAML) into them and refuses unknown keys and bad values with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

from handlers.errors import SpecError
from handlers.registry import FRONTENDS, RUNTIMES

MANIFEST_FILE = "tspack-manifest.json"
INDEX_TO_NAME_FILE = "index_to_name.json"
# `X | Y` unions exist from Python 3.10; the official TorchServe 0.12 images run 3.9.
_UNION_TYPE = getattr(types, "UnionType", typing.Union)

DType = Literal["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool"]
Frontend = Literal[tuple(FRONTENDS)]
ModelFormat = Literal[tuple(RUNTIMES)]
Precision = Literal["fp32", "fp16"]
Quantization = Literal["dynamic-int8", "static-int8", "qat-int8"]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
OutputKind = Literal["classification", "raw"]
ColorMode = Literal["L", "RGB"]
Resample = Literal["nearest", "box", "bilinear", "bicubic", "lanczos"]
TextPadding = Literal["longest", "max_length"]
# How a model's requests are batched (handlers/zero_wait.py): `zero_wait` runs whatever is queued the moment the
# model is free; `delay` lets TorchServe's frontend wait `maxBatchDelay` for a batch to fill.
Batching = Literal["zero_wait", "delay"]


def parse(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, recursively.

    Args:
        cls: a dataclass type from this module or another that follows the same conventions.
        data: a dict as read from JSON or YAML.
        path: dotted location used in error messages (e.g. "models.mnist.input").

    Raises:
        SpecError: an unknown or missing key, or a value of the wrong type or outside its allowed set.
    """
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(known)}")
    kwargs = {}
    for name, f in known.items():
        key_path = f"{path}.{name}" if path else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{key_path}: missing required key")
            continue
        kwargs[name] = _coerce(hints[name], data[name], key_path)
    try:
        return cls(**kwargs)
    except SpecError as exc:
        raise SpecError(located(path, str(exc))) from exc
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{where}: {exc}") from exc


def located(path: str, message: str) -> str:
    """A validation message ("serving.batch_size: must be >= 1") under the full path of the object that raised it
    ("models[2].serving.batch_size: must be >= 1"), so a spec with many models says which one."""
    if not path or message.startswith(path):
        return message
    head, colon, rest = message.partition(":")
    first = head.split(".", 1)[0]
    parent, _, last = path.rpartition(".")
    bare = last.split("[", 1)[0]
    if colon and " " not in head and first in (last, bare, bare.rstrip("s")):
        # The message names this object itself ("serving.batch_size" raised by models[2].serving).
        tail = head[len(first):]
        return f"{path}{tail}:{rest}"
    return f"{path}.{message}" if colon and " " not in head else f"{path}: {message}"


def _coerce(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, _UNION_TYPE):
        return _coerce_union(typing.get_args(hint), value, path)
    if origin is Literal:
        args = typing.get_args(hint)
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise SpecError(f"{path}: {value!r} is not allowed; choose one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"{path}: expected a list, got {type(value).__name__}")
        args = typing.get_args(hint)
        item_hint = args[0] if args else Any
        return tuple(_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{path}: expected a mapping, got {type(value).__name__}")
        args = typing.get_args(hint)
        value_hint = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, path)
    return _coerce_scalar(hint, value, path)


def _coerce_union(args: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    inner = [a for a in args if a is not type(None)]
    if len(inner) == 1:
        return _coerce(inner[0], value, path)
    for candidate in inner:
        try:
            return _coerce(candidate, value, path)
        except SpecError:
            continue
    raise SpecError(f"{path}: {value!r} is not allowed; expected {' or '.join(_describe(a) for a in inner)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return ", ".join(repr(a) for a in typing.get_args(hint))
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(hint) or origin is dict:
        return "a mapping"
    return _SCALARS.get(hint, (None, getattr(hint, "__name__", str(hint))))[1]


# scalar type -> (accepts, what the message says is expected)
_SCALARS = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce_scalar(hint: Any, value: Any, path: str) -> Any:
    if hint not in _SCALARS:
        return value
    accepts, expected = _SCALARS[hint]
    if not accepts(value):
        raise SpecError(f"{path}: expected {expected}, got {value!r}")
    return float(value) if hint is float else value


def to_dict(obj: Any) -> Any:
    """Dataclass -> JSON-ready dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def require(condition: bool, message: str, error: type[Exception] = SpecError) -> None:
    """Raise error(message) unless `condition`: the one validation helper of every spec dataclass (and of the
    checks that raise their own error type)."""
    if not condition:
        raise error(message)


_require = require


@dataclass(frozen=True)
class InputSpec:
    """One sample's tensor. A request may carry one sample of `shape` or up to `max_rows` of them
    stacked on a leading axis. -1 in `shape` marks an axis of free length (e.g. a sequence)."""

    shape: tuple[int, ...]
    dtype: DType = "float32"
    name: str = "input"
    allow_nonfinite: bool = False
    max_rows: int = 64

    def __post_init__(self):
        _require(len(self.shape) >= 1, "input.shape: needs at least one axis")
        _require(all(d == -1 or d > 0 for d in self.shape), f"input.shape: axes must be > 0 or -1, got {self.shape}")
        _require(self.max_rows >= 1, f"input.max_rows: must be >= 1, got {self.max_rows}")


@dataclass(frozen=True)
class ImageSpec:
    """Preprocessing of an image request into a CHW float tensor, declared at build time.

    The image is converted to `mode`, resized so its shorter side is `resize` (or straight to
    height x width when `resize` is None), center-cropped to height x width, scaled by `scale`,
    then normalised per channel with `mean`/`std`. `max_bytes` and `max_pixels` are checked before
    the image is decoded.
    """

    height: int
    width: int
    mode: ColorMode = "RGB"
    resize: Optional[int] = None
    resample: Resample = "bilinear"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0 / 255.0
    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    # JPEG draft decoding (libjpeg's 1/2, 1/4, 1/8 scaling) may undershoot the needed resolution by this
    # share, then upsample: 640x480 -> 256 decodes at 320x240. 0 decodes at least the needed resolution.
    draft_slack: float = 0.125

    def __post_init__(self):
        _require(self.height > 0 and self.width > 0, "image.height/width: must be > 0")
        _require(0.0 <= self.draft_slack < 0.5, f"image.draft_slack: must be within [0, 0.5), got {self.draft_slack}")
        _require(self.resize is None or self.resize >= min(self.height, self.width),
                 f"image.resize: {self.resize} is smaller than the crop {self.height}x{self.width}")
        channels = 1 if self.mode == "L" else 3
        for key, values in (("mean", self.mean), ("std", self.std)):
            _require(len(values) in (1, channels), f"image.{key}: needs 1 or {channels} values for mode {self.mode}")
        _require(all(s > 0 for s in self.std), "image.std: values must be > 0")
        _require(self.max_bytes > 0 and self.max_pixels > 0, "image.max_bytes/max_pixels: must be > 0")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


@dataclass(frozen=True)
class OutputSpec:
    """How a model's output row becomes JSON: top-k classes, or the raw values."""

    kind: OutputKind = "raw"
    top_k: int = 5
    labels: tuple[str, ...] = ()
    softmax: bool = True
    primary: Optional[str] = None  # the output `kind` applies to, for models with several; default: the first

    def __post_init__(self):
        _require(self.top_k >= 1, f"output.top_k: must be >= 1, got {self.top_k}")

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)


@dataclass(frozen=True)
class RuntimeSpec:
    """Which file holds the model and how to run it."""

    format: ModelFormat
    file: str
    sha256: str
    model_class: Optional[str] = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    quantization: Optional[Quantization] = None
    precision: Precision = "fp32"
    intra_op_threads: Optional[int] = None
    graph_optimization: GraphOptimization = "all"

    def __post_init__(self):
        _require(self.format != "state_dict" or bool(self.model_class),
                 "runtime.model_class: required for format 'state_dict' (e.g. 'model.py:Net')")
        _require(self.intra_op_threads is None or self.intra_op_threads >= 1,
                 "runtime.intra_op_threads: must be >= 1")
        _require(len(self.sha256) == 64, "runtime.sha256: must be a hex SHA-256 digest")


@dataclass(frozen=True)
class TextSpec:
    """Tokenization of text requests: the archive's tokenizer.json (Hugging Face tokenizers), declared at build."""

    tokenizer: str = "tokenizer.json"
    max_length: int = 128
    max_texts: int = 64
    pad_id: int = 0
    # "longest": a batch is padded to its longest row; "max_length": every row to max_length (for comparison)
    padding: TextPadding = "longest"
    # names of the model inputs the tokenizer fills; token_type_ids only when the model takes them
    input_ids: str = "input_ids"
    attention_mask: Optional[str] = "attention_mask"
    token_type_ids: Optional[str] = None

    def __post_init__(self):
        _require(self.max_length >= 2, f"text.max_length: must be >= 2, got {self.max_length}")
        _require(self.max_texts >= 1, f"text.max_texts: must be >= 1, got {self.max_texts}")


@dataclass(frozen=True)
class ArtifactManifest:
    """Everything a handler needs to serve one artifact, plus the figures that proved it at build.

    `inputs` are the model's named inputs in call order (`input` is the one-input shorthand older archives
    wrote); `outputs` names the model's outputs in the order the runtime returns them.
    """

    name: str
    version: str
    frontend: Frontend
    runtime: RuntimeSpec
    inputs: tuple[InputSpec, ...] = ()
    input: Optional[InputSpec] = None
    outputs: tuple[str, ...] = ("output",)
    output: OutputSpec = field(default_factory=OutputSpec)
    image: Optional[ImageSpec] = None
    text: Optional[TextSpec] = None
    max_body_bytes: int = 8 * 1024 * 1024
    built_at: str = ""
    optimizations: tuple[str, ...] = ()
    validation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.input is not None:
            _require(not self.inputs, "input: give `input` (one input) or `inputs`, not both")
            object.__setattr__(self, "inputs", (self.input,))
            object.__setattr__(self, "input", None)
        _require(len(self.inputs) >= 1, "inputs: the model needs at least one input")
        names = [i.name for i in self.inputs]
        _require(len(set(names)) == len(names), f"inputs: names must be unique, got {names}")
        _require(len(self.outputs) >= 1 and len(set(self.outputs)) == len(self.outputs),
                 f"outputs: one or more distinct names, got {list(self.outputs)}")
        _require(self.output.primary is None or self.output.primary in self.outputs,
                 f"output.primary: '{self.output.primary}' is not an output; outputs: {', '.join(self.outputs)}")
        _require(self.frontend != "image" or self.image is not None, "image: required when frontend is 'image'")
        _require(self.frontend != "text" or self.text is not None, "text: required when frontend is 'text'")
        _require(self.max_body_bytes > 0, "max_body_bytes: must be > 0")

    @property
    def primary_output(self) -> str:
        return self.output.primary or self.outputs[0]

    def input_spec(self, name: str) -> InputSpec:
        return next(i for i in self.inputs if i.name == name)

    @classmethod
    def load(cls, model_dir: str) -> ArtifactManifest:
        path = os.path.join(model_dir, MANIFEST_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(f"{MANIFEST_FILE}: cannot read {path}: {exc}") from exc
        manifest = parse(cls, data)
        labels_file = os.path.join(model_dir, INDEX_TO_NAME_FILE)
        if os.path.exists(labels_file):  # TorchServe's convention wins, so a user can relabel an archive
            manifest = replace(manifest, output=replace(manifest.output, labels=read_index_to_name(labels_file)))
        return manifest

    def dump(self, model_dir: str) -> str:
        path = os.path.join(model_dir, MANIFEST_FILE)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(to_dict(self), f, indent=2, sort_keys=True)
        return path


def read_index_to_name(path: str) -> tuple[str, ...]:
    """Labels from TorchServe's index_to_name.json: {"0": "cat"} or ImageNet's {"0": ["n01440764", "tench"]}."""
    try:
        with open(path, encoding="utf-8") as f:
            mapping = json.load(f)
        by_index = {int(k): (v[-1] if isinstance(v, list) and v else v) for k, v in mapping.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise SpecError(f"{INDEX_TO_NAME_FILE}: expected {{\"0\": \"label\", ...}}: {exc}") from exc
    if not by_index or min(by_index) < 0 or not all(isinstance(v, str) for v in by_index.values()):
        raise SpecError(f"{INDEX_TO_NAME_FILE}: expected {{\"0\": \"label\", ...}} with indices >= 0")
    return tuple(by_index.get(i, str(i)) for i in range(max(by_index) + 1))
