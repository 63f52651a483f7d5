"""The format table of the build: for each model format, how to write its artifact into the staging folder.

The served side of a format (its runtime class and file name) is handlers/registry.py's RUNTIMES entry; this
table adds the exporter. Both are keyed by the same names (checked at import), so a new runtime is one runtime
module, one RUNTIMES entry and one exporter here.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

import torch

from archiver.errors import BuildError
from archiver.optimize import export
from archiver.optimize.named_io import NamedIO
from archiver.optimize.samples import Samples, calibration
from archiver.spec import ArtifactSpec, ModelSpec
from handlers.device import available_cores
from handlers.integrity import sha256_of
from handlers.registry import RUNTIMES, RuntimeEntry
from handlers.spec import RuntimeSpec

QUANTIZATION = {"dynamic": "dynamic-int8", "static": "static-int8", "qat": "qat-int8"}


@dataclass
class ExportJob:
    """One artifact being exported: the model (already pruned/fp16 as asked), its samples, the staging folder."""

    model: ModelSpec
    artifact: ArtifactSpec
    network: torch.nn.Module
    named: NamedIO  # `network` behind the spec's input order and output names
    samples: Samples
    stage: str
    notes: list[str] = field(default_factory=list)
    program_cache: dict = field(default_factory=dict)  # one torch.export per network, shared by its formats

    @property
    def example(self) -> dict[str, torch.Tensor]:
        """Two rows of the samples: torch.export needs sizes >= 2 on every dynamic axis."""
        tensors = {name: torch.from_numpy(a) for name, a in self.samples.head(2).items()}
        if self.artifact.precision == "fp16":
            tensors = {name: t.half() if t.is_floating_point() else t for name, t in tensors.items()}
        return tensors

    @property
    def free_axes(self) -> dict[str, list[int]]:
        return {spec.name: [axis for axis, d in enumerate(spec.shape, start=1) if d == -1] for spec in
                self.model.inputs if -1 in spec.shape}

    def runtime_spec(self, file: str, **extra) -> RuntimeSpec:
        return RuntimeSpec(format=self.artifact.format, file=file, sha256=sha256_of(os.path.join(self.stage, file)),
                           quantization=QUANTIZATION.get(self.artifact.quantize.mode) if self.artifact.quantize
                           else None, precision=self.artifact.precision, **extra)

    def program(self):
        """The network's ExportedProgram (torch.export), made once per network and reused by every format."""
        from archiver.optimize.export_program import export_program

        key = id(self.network)
        if key not in self.program_cache:
            with quiet_torch():
                self.program_cache[key] = export_program(self.named, self.example, self.free_axes)
        program, notes = self.program_cache[key]
        self.notes.extend(n for n in notes if n not in self.notes)
        return program

    def serving_threads(self) -> int:
        serving = self.model.serving
        return serving.intra_op_threads or max(1, available_cores() // serving.workers)


Exporter = Callable[[ExportJob], RuntimeSpec]

# Loggers that print a first, failed strict attempt at ERROR level although the export then succeeds; what matters
# reaches the report as a note.
NOISY_LOGGERS = ("torch._guards", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "torch.export",
                 "torch.onnx", "onnxscript")


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@dataclass(frozen=True)
class Format:
    runtime: RuntimeEntry
    export: Exporter


def export_torchscript(job: ExportJob) -> RuntimeSpec:
    network, artifact = job.network, job.artifact
    if artifact.quantize:
        from archiver.optimize.quantize import DEPRECATION_NOTE

        network = _quantize_torch(job)
        job.notes.append(DEPRECATION_NOTE)
    path = os.path.join(job.stage, "model.pt")
    if artifact.method == "script" or isinstance(network, torch.jit.ScriptModule):
        # Scripting compiles the model's own forward: it takes its inputs positionally in the spec's order.
        scripted = export.to_torchscript(network, None, "script")
    else:
        named = job.named if network is job.network else NamedIO(network, job.named.input_names, job.named.output_names)
        named.output_names = job.named.output_names
        scripted = export.to_torchscript(named, tuple(job.example.values()), "trace", job.notes)
    scripted.save(path)
    return job.runtime_spec("model.pt")


def _quantize_torch(job: ExportJob) -> torch.nn.Module:
    from archiver.optimize import quantize

    mode = job.artifact.quantize.mode
    if mode == "dynamic":
        return quantize.quantize_dynamic_torch(job.network)
    if len(job.model.inputs) != 1:
        raise BuildError(f"quantize: torch.ao mode '{mode}' takes one-input models; use format aoti (pt2e) or "
                         "onnx for int8 of a model with several inputs")
    data = next(iter(calibration(job.model, job.artifact, job.samples).values()))
    if mode == "static":
        return quantize.quantize_static_torch(job.network, data)
    finetune = export.import_object(job.artifact.quantize.finetune, f"artifacts.{job.artifact.id}.quantize.finetune")
    return quantize.quantization_aware_training(job.network, next(iter(job.samples.inputs.values())), finetune,
                                                job.artifact.quantize.finetune_epochs)


def export_state_dict(job: ExportJob) -> RuntimeSpec:
    """The eager class ships in the archive and loads the weights with weights_only=True."""
    source = job.model.source
    if not source.model_class:
        raise BuildError(f"models.{job.model.name}: format 'state_dict' needs source.model_class")
    class_file = os.path.basename(source.model_file)
    shutil.copy2(source.model_file, os.path.join(job.stage, class_file))
    torch.save(job.network.state_dict(), os.path.join(job.stage, "model.pt"))
    return job.runtime_spec("model.pt", model_class=f"{class_file}:{source.class_name}", model_kwargs=source.kwargs)


def export_onnx(job: ExportJob) -> RuntimeSpec:
    """Dynamo exporter from the model's ExportedProgram (the legacy exporter only as a named fallback), the ONNX
    checker, optional offline graph optimization, optional ORT int8."""
    import onnx

    from archiver.optimize.export_program import dynamic_shapes_for
    from archiver.optimize.onnx_dynamo import to_onnx_dynamo

    artifact = job.artifact
    if artifact.custom_ops:
        registrar = export.import_object(artifact.custom_ops + ":", f"artifacts.{artifact.id}.custom_ops")
        if hasattr(registrar, "register"):
            registrar.register(artifact.opset)
    path = os.path.join(job.stage, "model.onnx")
    legacy = "custom_ops registers symbolics for the legacy exporter" if artifact.custom_ops else None
    source = job.named
    if not artifact.custom_ops:
        try:
            source = job.program()
        except BuildError as exc:
            # The dynamo exporter would hit the same wall, or quietly fix a free axis to the example's size: the
            # legacy exporter traces instead, and validation at a second length checks what it made.
            legacy = f"torch.export failed ({exc})"
    with quiet_torch():
        job.notes.extend(to_onnx_dynamo(source, job.example, path, list(job.named.input_names),
                                        list(job.named.output_names), artifact.opset,
                                        dynamic_shapes=dynamic_shapes_for(job.example, job.free_axes,
                                                                          job.named.input_names),
                                        legacy_reason=legacy))
    name_dynamic_axes(path, job.free_axes)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise BuildError(f"format 'onnx': onnx.checker rejected the model: {exc}") from exc
    if artifact.optimize_graph:
        export.optimize_onnx_graph(path, path)
    if not artifact.quantize:
        return job.runtime_spec("model.onnx", graph_optimization=artifact.graph_optimization)
    from archiver.optimize import quantize

    target = os.path.join(job.stage, "model.int8.onnx")
    if artifact.quantize.mode == "dynamic":
        quantize.quantize_dynamic_onnx(path, target)
    else:
        quantize.quantize_static_onnx(path, target, calibration(job.model, artifact, job.samples),
                                      artifact.quantize.per_channel)
    os.remove(path)
    return job.runtime_spec("model.int8.onnx", graph_optimization=artifact.graph_optimization)


def name_dynamic_axes(path: str, free_axes: dict[str, list[int]]) -> None:
    """Call the graph's symbolic dimensions what they are ("batch", "input_ids_1"), not torch's symbols ("s6").

    Names are taken from the inputs' axes and applied to every tensor of the graph that uses the same symbol.
    """
    import onnx

    model = onnx.load(path)
    graph = model.graph
    renames: dict[str, str] = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        wanted = {0: "batch", **{axis: f"{value.name}_{axis}" for axis in free_axes.get(value.name, [])}}
        for axis, name in wanted.items():
            if axis < len(dims) and dims[axis].dim_param:
                renames.setdefault(dims[axis].dim_param, name)
    if not renames:
        return
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    onnx.save(model, path)


def aoti_cache_dir() -> str:
    """Compiled packages are kept here between builds (TSPACK_CACHE_DIR overrides)."""
    base = os.environ.get("TSPACK_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "tspack")
    return os.path.join(base, "aoti")


def export_aoti(job: ExportJob) -> RuntimeSpec:
    """torch.export -> (pt2e int8) -> AOTInductor package, compiled for the serving worker's thread count."""
    from archiver.optimize.aoti import compile_aoti

    if job.artifact.quantize:
        if job.artifact.quantize.mode != "static":
            raise BuildError(f"quantize: format 'aoti' takes mode 'static' (pt2e, X86InductorQuantizer); for mode "
                             f"'{job.artifact.quantize.mode}' use format torchscript or onnx")
        from archiver.optimize.pt2e import quantize_pt2e_static

        data = calibration(job.model, job.artifact, job.samples)
        rows = len(next(iter(data.values())))
        batches = [{name: torch.from_numpy(a[i:i + 32]) for name, a in data.items()} for i in range(0, rows, 32)]
        program, notes = quantize_pt2e_static(job.named, job.example, batches, job.free_axes)
        job.notes.extend(notes)
    else:
        program = job.program()
    # Inductor writes `#pragma omp parallel num_threads(N)` with N fixed at compile time: compile for the threads a
    # worker will have, or two workers on two cores would each run two threads.
    freezing = None  # compile_aoti's default: on for int8 (its qlinear kernels need it), off for fp32
    if job.artifact.quantize and has_convolution(program):
        # Measured in torch 2.13: freezing an int8 convolution program compiles to wrong answers (6% top-1 agreement
        # on the digits CNN, 99.8% without freezing). Validation would refuse it; compile it unfrozen instead.
        freezing = False
        job.notes.append("aoti int8: compiled without freezing (frozen int8 convolutions are wrong in torch 2.13)")
    with quiet_torch():
        cached, seconds = compile_aoti(program, os.path.join(job.stage, "model.pt2"), aoti_cache_dir(),
                                       freezing=freezing, threads=job.serving_threads())
    job.notes.append(f"aoti: {'compile cache hit' if cached else 'compiled'} in {seconds:.1f} s "
                     f"for {job.serving_threads()} thread(s)")
    return job.runtime_spec("model.pt2", intra_op_threads=job.serving_threads())


def has_convolution(program) -> bool:
    return any("conv" in str(node.target) for node in program.graph.nodes if node.op == "call_function")


EXPORTERS: dict[str, Exporter] = {
    "aoti": export_aoti,
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "state_dict": export_state_dict,
}
if set(EXPORTERS) != set(RUNTIMES):  # pragma: no cover - a registration mistake, caught by any import
    raise RuntimeError(f"formats without an exporter or a runtime: {sorted(set(EXPORTERS) ^ set(RUNTIMES))}")
FORMATS: dict[str, Format] = {name: Format(RUNTIMES[name], EXPORTERS[name]) for name in RUNTIMES}


def prepare_network(artifact: ArtifactSpec, eager: torch.nn.Module,
                    notes: list[str]) -> tuple[torch.nn.Module, Optional[float], bool]:
    """Prune and cast a copy of the eager model as the artifact asks.

    Returns:
        (the network to export, its sparsity when pruned, whether this host can validate it).
    """
    network, sparsity, validate_here = eager, None, True
    if artifact.prune:
        from archiver.optimize.prune import prune_model
        from archiver.optimize.prune import sparsity as measure

        spec = artifact.prune
        finetune = export.import_object(spec.finetune, f"artifacts.{artifact.id}.prune.finetune") \
            if spec.finetune else None
        network = prune_model(eager, spec.method, spec.amount, spec.iterations, finetune)
        sparsity = measure(network)
    if artifact.precision == "fp16":
        network = copy.deepcopy(network).half()
        validate_here = torch.cuda.is_available()
        if not validate_here:
            notes.append("fp16 targets GPUs and no GPU is here: built, NOT validated")
    return network, sparsity, validate_here

