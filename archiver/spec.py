"""The deployment spec (`config/deploy.yaml`): what to build, how to check it, how to serve it.

Declared as frozen dataclasses; `DeploySpec.from_yaml` refuses unknown keys and bad values with a
message naming the key and the allowed values. Relative paths are resolved against the spec file's
folder. See config/README.md for the schema with examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional

import yaml

from handlers.errors import SpecError
from handlers.spec import Frontend, ImageSpec, InputSpec, OutputSpec, Precision, parse

ArtifactFormat = Literal["torchscript", "onnx", "state_dict"]
ScriptMethod = Literal["trace", "script"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SpecError(message)


@dataclass(frozen=True)
class SourceSpec:
    """Where the trained model comes from: a model class plus a state_dict, or a TorchScript file."""

    model_class: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    torchscript: Optional[str] = None

    def __post_init__(self):
        eager = self.model_class is not None or self.weights is not None
        _require(eager != (self.torchscript is not None),
                 "source: give either model_class + weights (a state_dict) or torchscript (a .pt file), not both")
        if eager:
            _require(bool(self.model_class) and ":" in self.model_class,
                     "source.model_class: expected 'path/to/file.py:ClassName'")
            _require(bool(self.weights), "source.weights: a state_dict file is required with model_class")

    @property
    def model_file(self) -> Optional[str]:
        return self.model_class.partition(":")[0] if self.model_class else None

    @property
    def class_name(self) -> Optional[str]:
        return self.model_class.partition(":")[2] if self.model_class else None


@dataclass(frozen=True)
class SamplesSpec:
    """Inputs used to validate artifacts (and to calibrate int8): an .npz file or seeded random data.

    file: .npz holding `inputs_key` (N x input shape) and optionally `labels_key` (N class ids).
    """

    file: Optional[str] = None
    inputs_key: str = "x"
    labels_key: str = "y"
    count: int = 64
    seed: int = 0

    def __post_init__(self):
        _require(self.count >= 2, f"samples.count: must be >= 2, got {self.count}")


@dataclass(frozen=True)
class ServingSpec:
    """TorchServe settings for one model: batching, workers, timeouts, threads."""

    batch_size: int = 8
    max_batch_delay_ms: int = 5
    workers: int = 1
    max_workers: Optional[int] = None
    response_timeout_s: int = 120
    job_queue_size: Optional[int] = None
    intra_op_threads: Optional[int] = None

    def __post_init__(self):
        _require(self.batch_size >= 1, f"serving.batch_size: must be >= 1, got {self.batch_size}")
        _require(self.max_batch_delay_ms >= 0,
                 f"serving.max_batch_delay_ms: must be >= 0, got {self.max_batch_delay_ms}")
        _require(self.workers >= 1, f"serving.workers: must be >= 1, got {self.workers}")
        _require(self.max_workers is None or self.max_workers >= self.workers,
                 "serving.max_workers: must be >= serving.workers")
        _require(self.response_timeout_s >= 1, "serving.response_timeout_s: must be >= 1")
        _require(self.job_queue_size is None or self.job_queue_size >= 1, "serving.job_queue_size: must be >= 1")
        _require(self.intra_op_threads is None or self.intra_op_threads >= 1, "serving.intra_op_threads: must be >= 1")


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact to build from the model. `id` names it; the archive is `<model>-<id>` unless id is 'main'."""

    format: ArtifactFormat = "torchscript"
    id: str = "main"
    method: ScriptMethod = "trace"
    opset: int = 17
    tolerance: Optional[float] = None
    frontend: Optional[Frontend] = None
    precision: Precision = "fp32"

    def __post_init__(self):
        _require(self.id.replace("-", "").replace("_", "").isalnum(), f"artifacts.id: '{self.id}' must be alphanumeric")
        _require(self.opset >= 17, f"artifacts.opset: must be >= 17, got {self.opset}")
        _require(self.tolerance is None or self.tolerance > 0, "artifacts.tolerance: must be > 0")


@dataclass(frozen=True)
class ModelSpec:
    """A trained model, the artifacts to build from it, and how to serve them."""

    name: str
    version: str
    source: SourceSpec
    input: InputSpec
    output: OutputSpec = field(default_factory=OutputSpec)
    frontend: Frontend = "tensor"
    image: Optional[ImageSpec] = None
    samples: SamplesSpec = field(default_factory=SamplesSpec)
    tolerance: float = 1e-4
    max_body_bytes: int = 8 * 1024 * 1024
    serving: ServingSpec = field(default_factory=ServingSpec)
    artifacts: tuple[ArtifactSpec, ...] = (ArtifactSpec(),)

    def __post_init__(self):
        import re

        _require(re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$", self.name) is not None,
                 f"name: '{self.name}' may hold letters, digits, '_', '-' and '.' only")
        _require(re.match(r"^[0-9][0-9A-Za-z.\-]*$", self.version) is not None,
                 f"version: '{self.version}' must start with a digit, e.g. '1.0'")
        _require(self.tolerance > 0, "tolerance: must be > 0")
        _require(len(self.artifacts) >= 1, "artifacts: list at least one artifact")
        ids = [a.id for a in self.artifacts]
        _require(len(ids) == len(set(ids)), f"artifacts: ids must be unique, got {ids}")
        frontends = {a.frontend or self.frontend for a in self.artifacts}
        _require("image" not in frontends or self.image is not None, "image: required when a front end is 'image'")

    def archive_name(self, artifact: ArtifactSpec) -> str:
        return self.name if artifact.id == "main" else f"{self.name}-{artifact.id}"


@dataclass(frozen=True)
class DeploySpec:
    models: tuple[ModelSpec, ...]
    model_store: str = "model_store"

    def __post_init__(self):
        names = [m.name for m in self.models]
        _require(len(names) >= 1, "models: list at least one model")

    @classmethod
    def from_yaml(cls, path: str) -> DeploySpec:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise SpecError(f"{path}: cannot read the spec: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from exc
        return resolve_paths(parse(cls, data or {}), os.path.dirname(os.path.abspath(path)))


def resolve_paths(spec: DeploySpec, base: str) -> DeploySpec:
    """Make every file path in the spec absolute, relative paths taken from `base`."""

    def absolute(p: Optional[str]) -> Optional[str]:
        return p if p is None or os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    models = []
    for m in spec.models:
        src = m.source
        model_class = None
        if src.model_class:
            model_class = f"{absolute(src.model_file)}:{src.class_name}"
        source = replace(src, model_class=model_class, weights=absolute(src.weights),
                         torchscript=absolute(src.torchscript))
        models.append(replace(m, source=source, samples=replace(m.samples, file=absolute(m.samples.file))))
    return replace(spec, models=tuple(models), model_store=absolute(spec.model_store))


def check_files(model: ModelSpec) -> None:
    """Refuse a spec naming files that do not exist, naming the key."""
    src = model.source
    for key, path in (("source.model_class", src.model_file), ("source.weights", src.weights),
                      ("source.torchscript", src.torchscript), ("samples.file", model.samples.file)):
        if path is not None and not os.path.isfile(path):
            raise SpecError(f"models.{model.name}.{key}: file not found: {path}")
