"""`tspack build`: export each artifact a spec asks for, validate it against eager, package it, report.

Per artifact, in order: export into a staging folder -> load it with the serving runtime -> compare
with the eager model on the spec's samples -> package the `.mar` only when it passed. A failed artifact
leaves nothing in the model store and is reported with its reason.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from archiver import export
from archiver.errors import BuildError, TspackCliError
from archiver.package import build_artifact_mar
from archiver.report import ArtifactReport, write_report
from archiver.spec import ArtifactSpec, DeploySpec, ModelSpec, check_files
from archiver.validate import Criteria, Figures, compare, measure_latency, require_passed
from handlers.device import Placement
from handlers.errors import SpecError
from handlers.integrity import sha256_of
from handlers.runtimes import load_runtime
from handlers.spec import INDEX_TO_NAME_FILE, ArtifactManifest, RuntimeSpec

logger = logging.getLogger(__name__)


@dataclass
class BuildResult:
    entries: list[ArtifactReport] = field(default_factory=list)
    report_path: str = ""

    @property
    def failed(self) -> list[ArtifactReport]:
        return [e for e in self.entries if not e.passed]


@dataclass
class Exported:
    """An artifact written into the staging folder, with what was done to produce it."""

    runtime: Optional[RuntimeSpec]
    optimizations: list[str] = field(default_factory=list)
    criteria: Optional[Criteria] = None
    parameters: Optional[int] = None
    sparsity: Optional[float] = None
    validate_on_this_host: bool = True
    notes: list[str] = field(default_factory=list)


def load_samples(model: ModelSpec) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Validation inputs (N x input shape) and labels when the samples file has them."""
    shape = model.input.shape
    dtype = np.dtype(model.input.dtype)
    if model.samples.file:
        try:
            data = np.load(model.samples.file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise SpecError(f"models.{model.name}.samples.file: cannot read {model.samples.file}: {exc}") from exc
        if model.samples.inputs_key not in data:
            raise SpecError(f"models.{model.name}.samples.inputs_key: '{model.samples.inputs_key}' not in "
                            f"{os.path.basename(model.samples.file)} (has {', '.join(data.files)})")
        inputs = data[model.samples.inputs_key]
        fits = inputs.ndim == len(shape) + 1 and all(e == -1 or s == e for s, e in zip(inputs.shape[1:], shape))
        if not fits:
            raise SpecError(f"models.{model.name}.samples.file: inputs have shape {tuple(inputs.shape)}, "
                            f"expected (N, {', '.join(map(str, shape))})")
        labels = data[model.samples.labels_key] if model.samples.labels_key in data else None
        return inputs.astype(dtype, copy=False), labels
    rng = np.random.default_rng(model.samples.seed)
    concrete = tuple(8 if d == -1 else d for d in shape)
    if dtype.kind == "f":
        return rng.standard_normal((model.samples.count, *concrete)).astype(dtype), None
    return rng.integers(0, 100, size=(model.samples.count, *concrete)).astype(dtype), None


def eager_runner(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(np.ascontiguousarray(batch)))
            if isinstance(out, (tuple, list)):
                out = out[0]
            return out.float().numpy()

    return run


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _calibration(model: ModelSpec, artifact: ArtifactSpec, inputs: np.ndarray) -> np.ndarray:
    """Calibration samples for static int8: the quantize spec's file, else the model's samples."""
    spec = artifact.quantize
    key = f"models.{model.name}.artifacts.{artifact.id}.quantize.calibration_file"
    data = inputs
    if spec.calibration_file:
        try:
            data = np.load(spec.calibration_file, allow_pickle=False)[spec.calibration_key]
        except (OSError, ValueError, KeyError) as exc:
            raise SpecError(f"{key}: cannot read '{spec.calibration_key}' from {spec.calibration_file}: {exc}") from exc
    shape = model.input.shape
    if data.ndim != len(shape) + 1 or any(e != -1 and s != e for s, e in zip(data.shape[1:], shape)):
        expected = ", ".join(map(str, shape))
        raise SpecError(f"{key}: calibration data has shape {tuple(data.shape)}, expected (N, {expected})")
    return np.ascontiguousarray(data[: spec.calibration_samples].astype(np.dtype(model.input.dtype), copy=False))


# fp16 keeps ~3 significant digits: the digits CNN's logits move by up to 9e-3 in half precision, so an fp16
# artifact is held to this tolerance (unless its spec sets one) and to top-1 agreement with fp32.
FP16_TOLERANCE = 5e-2
FP16_MIN_TOP1_AGREEMENT = 0.99


def _criteria(model: ModelSpec, artifact: ArtifactSpec) -> Criteria:
    """Numeric tolerance for faithful exports; task metrics once pruning or int8 change the numbers."""
    if artifact.precision == "fp16" and not (artifact.quantize or artifact.prune):
        return Criteria(tolerance=artifact.tolerance or max(model.tolerance, FP16_TOLERANCE),
                        min_top1_agreement=FP16_MIN_TOP1_AGREEMENT)
    if not (artifact.quantize or artifact.prune):
        return Criteria(tolerance=artifact.tolerance or model.tolerance)
    drops = [s.max_accuracy_drop for s in (artifact.quantize, artifact.prune) if s]
    agreement = artifact.quantize.min_top1_agreement if artifact.quantize else 0.9
    return Criteria(tolerance=artifact.tolerance, min_top1_agreement=agreement, max_accuracy_drop_points=min(drops))


def _quantize_torch(model: ModelSpec, artifact: ArtifactSpec, network: torch.nn.Module,
                    inputs: np.ndarray) -> torch.nn.Module:
    from archiver import quantize

    mode = artifact.quantize.mode
    if mode == "dynamic":
        return quantize.quantize_dynamic_torch(network)
    if mode == "static":
        return quantize.quantize_static_torch(network, _calibration(model, artifact, inputs))
    finetune = export.import_object(artifact.quantize.finetune, f"artifacts.{artifact.id}.quantize.finetune")
    return quantize.quantization_aware_training(network, inputs, finetune, artifact.quantize.finetune_epochs)


def _export_onnx(model: ModelSpec, artifact: ArtifactSpec, network: torch.nn.Module, example: torch.Tensor,
                 inputs: np.ndarray, stage: str) -> str:
    """Export, check, optionally optimize the graph offline, optionally quantize; returns the file name."""
    import onnx

    if artifact.custom_ops:
        registrar = export.import_object(artifact.custom_ops + ":", f"artifacts.{artifact.id}.custom_ops")
        if hasattr(registrar, "register"):
            registrar.register(artifact.opset)
    path = os.path.join(stage, "model.onnx")
    free_axes = {i + 1: f"dim{i + 1}" for i, d in enumerate(model.input.shape) if d == -1}
    axes = {model.input.name: {0: "batch", **free_axes}, "output": {0: "batch"}}
    export.to_onnx(network, example, path, artifact.opset, input_name=model.input.name, dynamic_axes=axes)
    try:
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:
        raise BuildError(f"format 'onnx': onnx.checker rejected the model: {exc}") from exc
    if artifact.optimize_graph:
        export.optimize_onnx_graph(path, path)
    if not artifact.quantize:
        return "model.onnx"
    from archiver import quantize

    target = os.path.join(stage, "model.int8.onnx")
    if artifact.quantize.mode == "dynamic":
        quantize.quantize_dynamic_onnx(path, target)
    else:
        quantize.quantize_static_onnx(path, target, _calibration(model, artifact, inputs), model.input.name,
                                      artifact.quantize.per_channel)
    os.remove(path)
    return "model.int8.onnx"


def export_artifact(model: ModelSpec, artifact: ArtifactSpec, eager: torch.nn.Module, inputs: np.ndarray,
                    labels: Optional[np.ndarray], stage: str) -> Exported:
    """Optimize a copy of the eager model as the artifact asks, write it into `stage`, say what was done."""
    example = torch.from_numpy(np.ascontiguousarray(inputs[: min(2, len(inputs))]))
    exported = Exported(runtime=None, optimizations=list(artifact.optimizations),
                        criteria=_criteria(model, artifact), parameters=count_parameters(eager))
    network = eager
    if artifact.prune:
        from archiver.prune import prune_model, sparsity

        spec = artifact.prune
        finetune = None
        if spec.finetune:
            finetune = export.import_object(spec.finetune, f"artifacts.{artifact.id}.prune.finetune")
        network = prune_model(eager, spec.method, spec.amount, spec.iterations, finetune)
        exported.sparsity = sparsity(network)
    if artifact.precision == "fp16":
        network = copy.deepcopy(network).half()
        example = example.half() if example.is_floating_point() else example
        exported.validate_on_this_host = torch.cuda.is_available()
        if not exported.validate_on_this_host:
            exported.notes.append("fp16 targets GPUs and no GPU is here: built, NOT validated")
    quantization = {"dynamic": "dynamic-int8", "static": "static-int8", "qat": "qat-int8"}.get(
        artifact.quantize.mode) if artifact.quantize else None
    if artifact.format == "state_dict":
        exported.runtime = _stage_state_dict(model, network, stage)
    elif artifact.format == "torchscript":
        if artifact.quantize:
            from archiver.quantize import DEPRECATION_NOTE

            network = _quantize_torch(model, artifact, network, inputs)
            exported.notes.append(DEPRECATION_NOTE)
        path = os.path.join(stage, "model.pt")
        export.to_torchscript(network, example, artifact.method).save(path)
        exported.runtime = RuntimeSpec(format="torchscript", file="model.pt", sha256=sha256_of(path),
                                       quantization=quantization, precision=artifact.precision)
    else:
        name = _export_onnx(model, artifact, network, example, inputs, stage)
        exported.runtime = RuntimeSpec(format="onnx", file=name, sha256=sha256_of(os.path.join(stage, name)),
                                       quantization=quantization, precision=artifact.precision,
                                       graph_optimization=artifact.graph_optimization)
    exported.optimizations.insert(0, artifact.format if artifact.format != "torchscript"
                                  else f"torchscript-{artifact.method}")
    return exported


def _stage_state_dict(model: ModelSpec, network: torch.nn.Module, stage: str) -> RuntimeSpec:
    """The eager class ships in the archive and loads the weights with weights_only=True."""
    if not model.source.model_class:
        raise SpecError(f"models.{model.name}: format 'state_dict' needs source.model_class")
    class_file = os.path.basename(model.source.model_file)
    shutil.copy2(model.source.model_file, os.path.join(stage, class_file))
    path = os.path.join(stage, "model.pt")
    torch.save(network.state_dict(), path)
    return RuntimeSpec(format="state_dict", file="model.pt", sha256=sha256_of(path),
                       model_class=f"{class_file}:{model.source.class_name}", model_kwargs=model.source.kwargs)


def build_artifact(model: ModelSpec, artifact: ArtifactSpec, eager: torch.nn.Module, inputs: np.ndarray,
                   labels: Optional[np.ndarray], model_store: str, gpus: int = 0) -> ArtifactReport:
    name = model.archive_name(artifact)
    built_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry = ArtifactReport(name=name, version=model.version, format=artifact.format, model=model.name,
                           artifact_id=artifact.id, built_at=built_at)
    with tempfile.TemporaryDirectory(prefix="tspack-stage-") as stage:
        try:
            exported = export_artifact(model, artifact, eager, inputs, labels, stage)
            entry.optimizations = exported.optimizations
            entry.parameters, entry.sparsity = exported.parameters, exported.sparsity
            entry.notes = list(exported.notes)
            entry.tolerance = exported.criteria.tolerance if exported.criteria else None
            entry.size_bytes = os.path.getsize(os.path.join(stage, exported.runtime.file))
            manifest = ArtifactManifest(
                name=name, version=model.version, frontend=artifact.frontend or model.frontend,
                runtime=exported.runtime, input=model.input, output=model.output, image=model.image,
                max_body_bytes=model.max_body_bytes, built_at=built_at, optimizations=tuple(exported.optimizations))
            figures = Figures()
            precision = "" if artifact.precision == "fp32" else f"-{artifact.precision}"
            entry.runtime = artifact.format + precision
            if exported.validate_on_this_host:
                here = Placement(device="cuda:0" if artifact.precision == "fp16" else "cpu",
                                 gpu_id=0 if artifact.precision == "fp16" else None, threads=torch.get_num_threads())
                runtime = load_runtime(manifest, stage, here)
                entry.runtime = runtime.describe().get("runtime", artifact.format)
                figures = compare(eager_runner(eager), runtime.run, inputs, exported.criteria, labels)
                figures.latency_ms_b1 = measure_latency(runtime.run, inputs, 1)
                figures.latency_ms_b32 = measure_latency(runtime.run, inputs, 32)
                _copy_figures(entry, figures)
            else:
                entry.validated = False
            require_passed(f"{name}@{model.version}", figures)
            if model.output.labels:
                with open(os.path.join(stage, INDEX_TO_NAME_FILE), "w", encoding="utf-8") as f:
                    json.dump({str(i): label for i, label in enumerate(model.output.labels)}, f)
            validation = {"validated": False, "passed": None, "notes": entry.notes}
            if entry.validated:
                validation = {**figures.as_dict(), "validated": True, "tolerance": entry.tolerance}
            manifest = replace(manifest, validation=validation)
            entry.archive = build_artifact_mar(stage, manifest, model.serving, model_store, gpus)
            entry.passed = True
        except (TspackCliError, SpecError) as exc:
            entry.error = str(exc)
            entry.passed = False
        except Exception as exc:  # noqa: BLE001 - torch, ONNX Runtime or a user hook failed on this artifact
            # One artifact's failure is reported against that artifact; the others still build, and the
            # report is still written.
            logger.debug("building %s failed", name, exc_info=True)
            entry.error = f"{name}@{model.version}: {type(exc).__name__}: {exc}".strip()
            entry.passed = False
    return entry


def _copy_figures(entry: ArtifactReport, figures: Figures) -> None:
    for key in ("max_abs_error", "top1_agreement", "accuracy", "reference_accuracy", "latency_ms_b1", "latency_ms_b32"):
        setattr(entry, key, getattr(figures, key))


def build(spec: DeploySpec, progress: bool = True, only: Optional[list[str]] = None) -> BuildResult:
    """Build every artifact of every model in `spec` (or of the models named in `only`).

    Spec errors (a missing file, a bad key) raise before anything is built. Validation failures do
    not raise: they are reported per artifact, and `BuildResult.failed` lists them.
    """
    from tqdm import tqdm

    from archiver.placement import detect_gpus, device_config

    gpus = spec.gpus if spec.gpus is not None else detect_gpus()
    models = [m for m in spec.models if not only or m.name in only]
    tests = [ab for ab in spec.ab if not only or ab.name in only]
    samples = {}
    for ab in tests:
        device_config(ab.serving, gpus, f"ab.{ab.name}.serving")
    for model in models:  # every spec error surfaces here, before anything is built
        check_files(model)
        device_config(model.serving, gpus, f"models.{model.name}.serving")
        samples[id(model)] = load_samples(model)
        for artifact in model.artifacts:
            if artifact.quantize and artifact.quantize.mode == "static":
                _calibration(model, artifact, samples[id(model)][0])
    result = BuildResult()
    jobs = sum(len(m.artifacts) for m in models) + sum(2 if ab.workflow.enabled else 1 for ab in tests)
    bar = tqdm(total=jobs, desc="tspack build", unit="artifact", disable=not progress)
    for model in models:
        inputs, labels = samples[id(model)]
        eager = export.load_eager(model.source)
        for artifact in model.artifacts:
            bar.set_postfix_str(f"{model.archive_name(artifact)}@{model.version}")
            result.entries.append(build_artifact(model, artifact, eager, inputs, labels, spec.model_store, gpus))
            bar.update(1)
    from archiver.ab import build_router, build_workflow

    for ab in tests:
        for step in (build_router, build_workflow) if ab.workflow.enabled else (build_router,):
            bar.set_postfix_str(f"{ab.name}@{ab.version} ({step.__name__})")
            try:
                result.entries.append(step(ab, spec.model_store, gpus))
            except (TspackCliError, SpecError) as exc:
                result.entries.append(ArtifactReport(name=ab.name, version=ab.version, format=step.__name__[6:],
                                                     model=ab.name, error=str(exc)))
            bar.update(1)
    bar.close()
    result.report_path = write_report(spec.model_store, result.entries)
    return result
