"""The deployment spec (`config/deploy.yaml`): what to build, how to check it, how to serve it.

Declared as frozen dataclasses; `DeploySpec.from_yaml` refuses unknown keys and bad values with a
message naming the key and the allowed values. Relative paths are resolved against the spec file's
folder. See config/README.md for the schema with examples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Optional, Union

import yaml

from handlers.cache import CacheConfig
from handlers.errors import SpecError
from handlers.registry import RUNTIMES
from handlers.routing import RoutingPolicy
from handlers.routing import Variant as RoutedVariant
from handlers.spec import (
    Batching,
    Frontend,
    GraphOptimization,
    ImageSpec,
    InputSpec,
    OutputSpec,
    Precision,
    TextSpec,
    located,
    parse,
    require,
)

ArtifactFormat = Literal[tuple(RUNTIMES)]
PretrainedTask = Literal["sequence-classification"]
ScriptMethod = Literal["trace", "script"]
QuantizeMode = Literal["dynamic", "static", "qat"]
PruneMethod = Literal["l1_unstructured", "global_unstructured"]


_require = require


@dataclass(frozen=True)
class SourceSpec:
    """Where the trained model comes from: a model class plus a state_dict, a TorchScript file, or a Hugging Face
    model folder (written by `save_pretrained`: config.json, model.safetensors, tokenizer files)."""

    model_class: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    torchscript: Optional[str] = None
    pretrained: Optional[str] = None
    task: PretrainedTask = "sequence-classification"

    def __post_init__(self):
        eager = self.model_class is not None or self.weights is not None
        given = sum((eager, self.torchscript is not None, self.pretrained is not None))
        _require(given == 1, "source: give one of model_class + weights (a state_dict), torchscript (a .pt file) or "
                             "pretrained (a save_pretrained folder)")
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
    inputs_key: str = "x"  # one-input models; a model with several inputs reads one array per input name
    labels_key: str = "y"
    count: int = 64
    seed: int = 0
    texts: tuple[str, ...] = ()  # text models: sample texts, tokenized with the model's tokenizer

    def __post_init__(self):
        _require(self.count >= 2, f"samples.count: must be >= 2, got {self.count}")


DEFAULT_BATCH_DELAY_MS = 2
# The batching of a spec that names neither a mode nor a delay: TorchServe's own (delay). zero_wait answers a lone
# client in 2.1 ms p50 against ~5 ms with a fixed delay (`make bench`, light CNN) and serves as many requests/s at 32
# clients, but it runs on TorchServe 0.12's asynchronous frontend, which lost 4 workers in 2 of the 3 full `make
# bench` runs of 2026-12-04 that served it: each time it threw "Unexpected job in sendResponse()" for an answer, dropped
# the worker's connection, and its recovery of that worker then failed on every retry ("Received more than 1
# control command"), so the model served on its other workers from then on. Not reproduced in ~630,000 requests of
# load outside the benchmark; until it is, zero_wait is opt-in (README, "Zero-wait batching").
DEFAULT_BATCHING: Batching = "delay"


@dataclass(frozen=True)
class ServingSpec:
    """TorchServe settings for one model: batching, workers, timeouts, threads, the response cache."""

    batch_size: int = 8
    # zero_wait: the handler runs whatever is queued the moment the model is free (handlers/zero_wait.py); delay:
    # TorchServe's frontend waits max_batch_delay_ms for a batch to fill. None: delay when max_batch_delay_ms is
    # given (or batch_size is 1), else DEFAULT_BATCHING.
    batching: Optional[Batching] = None
    # None: 2 ms with batching, 0 without (the only values TorchServe 0.12 handles well for each); 0 with zero_wait.
    max_batch_delay_ms: Optional[int] = None
    workers: int = 1
    max_workers: Optional[int] = None
    response_timeout_s: int = 120
    job_queue_size: Optional[int] = None
    intra_op_threads: Optional[int] = None
    # GPU placement: "cpu", "all" GPUs of the target host, or a list of GPU ids; workers_per_gpu on each.
    devices: Union[Literal["cpu", "all"], tuple[int, ...]] = "cpu"
    workers_per_gpu: int = 1
    cpu_fallback: bool = True
    # Workers keep the memory they free for the next batch rather than returning it to the OS (handlers/allocator.py:
    # ~10% more samples/s for batched CNNs on CPU, at the cost of holding their peak heap).
    keep_freed_memory: bool = True
    # The worker's response cache (handlers/cache.py); None: off. Only for deterministic models.
    cache: Optional[CacheConfig] = None

    def __post_init__(self):
        _require(self.batch_size >= 1, f"serving.batch_size: must be >= 1, got {self.batch_size}")
        if self.batching is None:
            delay = self.max_batch_delay_ms is not None or self.batch_size == 1
            object.__setattr__(self, "batching", "delay" if delay else DEFAULT_BATCHING)
        if self.batching == "zero_wait":
            self._check_zero_wait()
        else:
            self._check_delay()
        _require(self.workers >= 1, f"serving.workers: must be >= 1, got {self.workers}")
        _require(self.workers_per_gpu >= 1, f"serving.workers_per_gpu: must be >= 1, got {self.workers_per_gpu}")
        if isinstance(self.devices, tuple):
            _require(len(self.devices) >= 1 and all(d >= 0 for d in self.devices)
                     and len(set(self.devices)) == len(self.devices),
                     f"serving.devices: a list of distinct GPU ids >= 0, or 'cpu' or 'all'; got {list(self.devices)}")
        _require(self.max_workers is None or self.max_workers >= self.workers,
                 "serving.max_workers: must be >= serving.workers")
        _require(self.response_timeout_s >= 1, "serving.response_timeout_s: must be >= 1")
        _require(self.job_queue_size is None or self.job_queue_size >= 1, "serving.job_queue_size: must be >= 1")
        _require(self.intra_op_threads is None or self.intra_op_threads >= 1, "serving.intra_op_threads: must be >= 1")

    def _check_zero_wait(self) -> None:
        _require(self.batch_size > 1, "serving.batching: zero_wait batches up to batch_size requests, and "
                                      "batch_size is 1; raise batch_size or leave batching out")
        _require(self.max_batch_delay_ms in (None, 0),
                 f"serving.max_batch_delay_ms: zero_wait never waits for a batch to fill, so a delay of "
                 f"{self.max_batch_delay_ms} ms means nothing; drop it, or set batching: delay")
        object.__setattr__(self, "max_batch_delay_ms", 0)

    def _check_delay(self) -> None:
        if self.max_batch_delay_ms is None:
            object.__setattr__(self, "max_batch_delay_ms", DEFAULT_BATCH_DELAY_MS if self.batch_size > 1 else 0)
        _require(self.max_batch_delay_ms >= 0,
                 f"serving.max_batch_delay_ms: must be >= 0, got {self.max_batch_delay_ms}")
        _require(self.batch_size == 1 or self.max_batch_delay_ms >= 1,
                 "serving.max_batch_delay_ms: must be >= 1 with batching; TorchServe 0.12 reads 0 as unset and "
                 "waits its 100 ms default for every lone request")
        _require(self.batch_size > 1 or self.max_batch_delay_ms == 0,
                 f"serving.max_batch_delay_ms: {self.max_batch_delay_ms} ms of batch delay without batching "
                 "(batch_size 1) only adds latency; set batch_size > 1 or max_batch_delay_ms: 0")


@dataclass(frozen=True)
class QuantizeSpec:
    """int8 quantization. Torch quantizes TorchScript artifacts, ONNX Runtime quantizes ONNX ones.

    Validated by task metrics rather than tolerance: top-1 agreement with fp32 and the accuracy drop
    (in percentage points) on the samples' labels.
    """

    mode: QuantizeMode
    calibration_file: Optional[str] = None
    calibration_key: str = "x"
    calibration_samples: int = 256
    per_channel: bool = True
    finetune: Optional[str] = None
    finetune_epochs: int = 1
    min_top1_agreement: float = 0.98
    max_accuracy_drop: float = 1.0

    def __post_init__(self):
        _require(self.calibration_samples >= 1, "quantize.calibration_samples: must be >= 1")
        _require(self.mode != "qat" or self.finetune is not None,
                 "quantize.finetune: mode 'qat' needs a fine-tune callback, e.g. 'train.py:finetune'")
        _require(0.0 <= self.min_top1_agreement <= 1.0, "quantize.min_top1_agreement: must be within 0..1")
        _require(self.max_accuracy_drop >= 0, "quantize.max_accuracy_drop: must be >= 0 (percentage points)")
        _require(self.finetune is None or ":" in self.finetune, "quantize.finetune: expected 'file.py:function'")


@dataclass(frozen=True)
class PruneSpec:
    """Magnitude pruning to `amount` sparsity in `iterations` steps, an optional fine-tune after each."""

    method: PruneMethod
    amount: float
    iterations: int = 1
    finetune: Optional[str] = None
    max_accuracy_drop: float = 2.0

    def __post_init__(self):
        _require(0.0 < self.amount < 1.0, f"prune.amount: must be between 0 and 1, got {self.amount}")
        _require(self.iterations >= 1, "prune.iterations: must be >= 1")
        _require(self.finetune is None or ":" in self.finetune, "prune.finetune: expected 'file.py:function'")


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact to build from the model. `id` names it; the archive is `<model>-<id>` unless id is 'main'."""

    format: ArtifactFormat = "torchscript"
    id: str = "main"
    method: ScriptMethod = "trace"
    opset: int = 18  # the dynamo exporter's lowest; the legacy fallback takes >= 17
    optimize_graph: bool = False
    graph_optimization: GraphOptimization = "all"  # ONNX Runtime's session level when serving
    custom_ops: Optional[str] = None
    quantize: Optional[QuantizeSpec] = None
    prune: Optional[PruneSpec] = None
    precision: Precision = "fp32"
    tolerance: Optional[float] = None
    frontend: Optional[Frontend] = None

    def __post_init__(self):
        _require(self.id.replace("-", "").replace("_", "").isalnum(), f"artifacts.id: '{self.id}' must be alphanumeric")
        _require(self.opset >= 17, f"artifacts.opset: must be >= 17, got {self.opset}")
        _require(self.tolerance is None or self.tolerance > 0, "artifacts.tolerance: must be > 0")
        _require(self.format == "onnx" or not (self.optimize_graph or self.custom_ops),
                 "artifacts.optimize_graph/custom_ops: only for format 'onnx'")
        _require(self.format != "state_dict" or not (self.quantize or self.prune or self.precision != "fp32"),
                 "artifacts.format: 'state_dict' ships the eager model as is; quantize/prune/fp16 need "
                 "'torchscript' or 'onnx'")
        _require(not (self.quantize and self.precision == "fp16"),
                 "artifacts: choose int8 (quantize) or fp16, not both")
        _require(self.format == "torchscript" or self.quantize is None or self.quantize.mode != "qat",
                 "quantize.mode: 'qat' is a torch.ao path; use format 'torchscript'")

    @property
    def optimizations(self) -> list[str]:
        applied = []
        if self.prune:
            applied.append(f"prune-{self.prune.method}-{self.prune.amount:g}")
        if self.quantize:
            path = {"onnx": "ort", "aoti": "pt2e"}.get(self.format, "torch")
            applied.append(f"int8-{self.quantize.mode}-{path}")
        if self.precision == "fp16":
            applied.append("fp16")
        if self.optimize_graph:
            applied.append("ort-graph-optimized")
        return applied


# TorchServe 0.12 sends every request whose path contains "/token" to its token API (TokenAuthorizationHandler
# checks `uri.contains("/token")`), so a model called "tokens" can be neither described nor predicted.
TOKEN_API_PREFIX = "token"


def token_api_message(name: str) -> str:
    return (f"name: '{name}' starts with 'token'; TorchServe 0.12 sends any path containing '/token' (here "
            f"/models/{name}, /predictions/{name}) to its token API; choose another name")


@dataclass(frozen=True)
class ModelSpec:
    """A trained model, the artifacts to build from it, and how to serve them."""

    name: str
    version: str
    source: SourceSpec
    input: Optional[InputSpec] = None  # the one-input shorthand of `inputs`
    inputs: tuple[InputSpec, ...] = ()
    outputs: tuple[str, ...] = ()  # names of a tuple's outputs; dict outputs are named by their keys
    output: OutputSpec = field(default_factory=OutputSpec)
    frontend: Frontend = "tensor"
    image: Optional[ImageSpec] = None
    text: Optional[TextSpec] = None
    samples: SamplesSpec = field(default_factory=SamplesSpec)
    tolerance: float = 1e-4
    max_body_bytes: int = 8 * 1024 * 1024
    serving: ServingSpec = field(default_factory=ServingSpec)
    artifacts: tuple[ArtifactSpec, ...] = (ArtifactSpec(),)

    def __post_init__(self):
        import re

        _require(re.match(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$", self.name) is not None,
                 f"name: '{self.name}' may hold letters, digits, '_', '-' and '.' only")
        _require(not self.name.startswith(TOKEN_API_PREFIX), token_api_message(self.name))
        _require(re.match(r"^[0-9][0-9A-Za-z.\-]*$", self.version) is not None,
                 f"version: '{self.version}' must start with a digit, e.g. '1.0'")
        if self.input is not None:
            _require(not self.inputs, "input: give `input` (one input) or `inputs` (a list), not both")
            object.__setattr__(self, "inputs", (self.input,))
            object.__setattr__(self, "input", None)
        _require(len(self.inputs) >= 1 or self.source.pretrained is not None,
                 "inputs: declare the model's input (input: {shape: [...]}) or its inputs (a list)")
        names = [i.name for i in self.inputs]
        _require(len(set(names)) == len(names), f"inputs: names must be unique, got {names}")
        _require(len(set(self.outputs)) == len(self.outputs),
                 f"outputs: names must be unique, got {list(self.outputs)}")
        _require(self.tolerance > 0, "tolerance: must be > 0")
        _require(len(self.artifacts) >= 1, "artifacts: list at least one artifact")
        ids = [a.id for a in self.artifacts]
        _require(len(ids) == len(set(ids)), f"artifacts: ids must be unique, got {ids}")
        frontends = {a.frontend or self.frontend for a in self.artifacts}
        _require("image" not in frontends or self.image is not None, "image: required when a front end is 'image'")
        _require("image" not in frontends or len(self.inputs) == 1, "image: the image front end feeds one input")

    def archive_name(self, artifact: ArtifactSpec) -> str:
        return self.name if artifact.id == "main" else f"{self.name}-{artifact.id}"


@dataclass(frozen=True)
class VariantSpec:
    """One arm of an A/B test: an archive from the model store (built and validated on its own)."""

    name: str
    archive: str
    weight: float

    def __post_init__(self):
        _require(self.name.isidentifier(), f"ab.variants.name: '{self.name}' must be a simple name like 'a' or 'v2'")
        _require(0.0 <= self.weight <= 1.0, f"ab.variants.weight: must be within 0..1, got {self.weight}")


@dataclass(frozen=True)
class ShadowSpec:
    """A variant that also runs on (a sample of) the traffic; compared with the primary, never returned."""

    name: str
    archive: str
    sample_rate: float = 1.0
    queue_size: int = 64

    def __post_init__(self):
        _require(self.name.isidentifier(), f"ab.shadow.name: '{self.name}' must be a simple name")
        _require(0.0 < self.sample_rate <= 1.0, "ab.shadow.sample_rate: must be within (0, 1]")
        _require(self.queue_size >= 1, "ab.shadow.queue_size: must be >= 1")


@dataclass(frozen=True)
class StickySpec:
    """Where the routing key comes from: a request header, else a field of the JSON body."""

    header: Optional[str] = "X-Request-Key"
    field: Optional[str] = None


@dataclass(frozen=True)
class WorkflowSpec:
    """The `.war` twin of the router. Its settings bound TorchServe 0.12's lost-answer stall (a short node timeout
    with retries instead of 10 s); they cannot remove it."""

    enabled: bool = True
    batch_size: int = 2
    max_batch_delay_ms: int = 5
    timeout_ms: int = 500
    retry_attempts: int = 3

    def __post_init__(self):
        _require(self.batch_size >= 1 and self.max_batch_delay_ms >= 0, "ab.workflow: batch settings must be >= 0")
        _require(self.timeout_ms >= 100, "ab.workflow.timeout_ms: must be >= 100")


@dataclass(frozen=True)
class ABSpec:
    """An A/B test over two or more variant archives: a router archive (recommended) and a workflow."""

    name: str
    version: str
    variants: tuple[VariantSpec, ...]
    sticky: StickySpec = field(default_factory=StickySpec)
    shadow: Optional[ShadowSpec] = None
    salt: Optional[str] = None
    serving: ServingSpec = field(default_factory=ServingSpec)
    workflow: WorkflowSpec = field(default_factory=WorkflowSpec)

    def __post_init__(self):
        _require(not self.name.startswith(TOKEN_API_PREFIX), token_api_message(self.name))
        try:
            self.policy()  # the routing rules live in handlers.routing.RoutingPolicy, checked there only
        except SpecError as exc:
            raise SpecError(located(f"ab.{self.name}", str(exc))) from exc
        names = [v.name for v in self.variants]
        _require(self.shadow is None or self.shadow.name not in names,
                 f"ab.{self.name}.shadow.name: '{self.shadow.name if self.shadow else ''}' is already a variant")

    def policy(self, folders: Optional[dict[str, str]] = None) -> RoutingPolicy:
        """The routing policy the router and the workflow both serve; `folders`: variant name -> staged folder."""
        folders = folders or {}
        return RoutingPolicy(variants=tuple(RoutedVariant(v.name, v.weight, folders.get(v.name, ""))
                                            for v in self.variants),
                             sticky_header=self.sticky.header, sticky_field=self.sticky.field,
                             salt=self.salt or self.name)


@dataclass(frozen=True)
class DeploySpec:
    models: tuple[ModelSpec, ...] = ()
    model_store: str = "model_store"
    ab: tuple[ABSpec, ...] = ()
    gpus: Optional[int] = None  # GPUs of the host the archives are for; None: this build host's

    def __post_init__(self):
        _require(len(self.models) + len(self.ab) >= 1, "models: list at least one model (or an ab test)")

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
                         torchscript=absolute(src.torchscript), pretrained=absolute(src.pretrained))
        artifacts = tuple(_resolve_artifact(a, absolute) for a in m.artifacts)
        models.append(replace(m, source=source, samples=replace(m.samples, file=absolute(m.samples.file)),
                              artifacts=artifacts))
    return replace(spec, models=tuple(models), model_store=absolute(spec.model_store))


def _resolve_callable(ref: Optional[str], absolute) -> Optional[str]:
    if not ref:
        return ref
    path, _, name = ref.partition(":")
    return f"{absolute(path)}:{name}"


def _resolve_artifact(artifact: ArtifactSpec, absolute) -> ArtifactSpec:
    quantize, prune = artifact.quantize, artifact.prune
    if quantize:
        quantize = replace(quantize, calibration_file=absolute(quantize.calibration_file),
                           finetune=_resolve_callable(quantize.finetune, absolute))
    if prune:
        prune = replace(prune, finetune=_resolve_callable(prune.finetune, absolute))
    return replace(artifact, quantize=quantize, prune=prune, custom_ops=absolute(artifact.custom_ops))


def check_files(model: ModelSpec) -> None:
    """Refuse a spec naming files that do not exist, naming the key."""
    src = model.source
    paths = [("source.model_class", src.model_file), ("source.weights", src.weights),
             ("source.torchscript", src.torchscript), ("samples.file", model.samples.file)]
    if src.pretrained is not None and not os.path.isdir(src.pretrained):
        raise SpecError(f"models.{model.name}.source.pretrained: folder not found: {src.pretrained}")
    for a in model.artifacts:
        where = f"artifacts.{a.id}"
        paths.append((f"{where}.custom_ops", a.custom_ops))
        if a.quantize:
            paths.append((f"{where}.quantize.calibration_file", a.quantize.calibration_file))
            paths.append((f"{where}.quantize.finetune", (a.quantize.finetune or "").partition(":")[0] or None))
        if a.prune:
            paths.append((f"{where}.prune.finetune", (a.prune.finetune or "").partition(":")[0] or None))
    for key, path in paths:
        if path is not None and not os.path.isfile(path):
            raise SpecError(f"models.{model.name}.{key}: file not found: {path}")
