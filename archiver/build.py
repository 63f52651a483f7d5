"""`tspack build`: export each artifact a spec asks for, validate it against eager, package it, report.

Per artifact, in order: export into a staging folder -> load it with the serving runtime -> compare
with the eager model on the spec's samples -> package the `.mar` only when it passed. A failed artifact
leaves nothing in the model store and is reported with its reason.
"""

from __future__ import annotations

import datetime as _dt
import json
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
from archiver.package import archive_file_name, build_mar
from archiver.report import ArtifactReport, write_report
from archiver.spec import ArtifactSpec, DeploySpec, ModelSpec, check_files
from archiver.validate import Criteria, Figures, compare, measure_latency, require_passed
from handlers.device import Placement
from handlers.errors import SpecError
from handlers.integrity import sha256_of
from handlers.runtimes import load_runtime
from handlers.spec import ArtifactManifest, RuntimeSpec


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

    runtime: RuntimeSpec
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


def export_artifact(model: ModelSpec, artifact: ArtifactSpec, eager: torch.nn.Module, inputs: np.ndarray,
                    labels: Optional[np.ndarray], stage: str) -> Exported:
    """Write the artifact's model file into `stage`; return its runtime spec and what was applied."""
    example = torch.from_numpy(np.ascontiguousarray(inputs[: min(2, len(inputs))]))
    tolerance = artifact.tolerance or model.tolerance
    criteria = Criteria(tolerance=tolerance)
    parameters = count_parameters(eager)
    if artifact.format == "torchscript":
        path = os.path.join(stage, "model.pt")
        export.to_torchscript(eager, example, artifact.method).save(path)
        return Exported(RuntimeSpec(format="torchscript", file="model.pt", sha256=sha256_of(path)),
                        [f"torchscript-{artifact.method}"], criteria, parameters)
    if artifact.format == "onnx":
        import onnx

        path = os.path.join(stage, "model.onnx")
        export.to_onnx(eager, example, path, artifact.opset, input_name=model.input.name)
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as exc:
            raise BuildError(f"format 'onnx': onnx.checker rejected the model: {exc}") from exc
        return Exported(RuntimeSpec(format="onnx", file="model.onnx", sha256=sha256_of(path)),
                        [f"onnx-opset{artifact.opset}"], criteria, parameters)
    # state_dict: the eager class ships in the archive and loads the weights with weights_only=True
    if not model.source.model_class:
        raise SpecError(f"models.{model.name}.artifacts.{artifact.id}: format 'state_dict' needs source.model_class")
    class_file = os.path.basename(model.source.model_file)
    shutil.copy2(model.source.model_file, os.path.join(stage, class_file))
    path = os.path.join(stage, "model.pt")
    torch.save(eager.state_dict(), path)
    return Exported(RuntimeSpec(format="state_dict", file="model.pt", sha256=sha256_of(path),
                                model_class=f"{class_file}:{model.source.class_name}",
                                model_kwargs=model.source.kwargs),
                    [], criteria, parameters)


def build_artifact(model: ModelSpec, artifact: ArtifactSpec, eager: torch.nn.Module, inputs: np.ndarray,
                   labels: Optional[np.ndarray], model_store: str) -> ArtifactReport:
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
            here = Placement(device="cpu", gpu_id=None, threads=torch.get_num_threads())
            runtime = load_runtime(manifest, stage, here)
            entry.runtime = runtime.describe().get("runtime", artifact.format)
            figures = Figures()
            if exported.validate_on_this_host:
                figures = compare(eager_runner(eager), runtime.run, inputs, exported.criteria, labels)
                figures.latency_ms_b1 = measure_latency(runtime.run, inputs, 1)
                figures.latency_ms_b32 = measure_latency(runtime.run, inputs, 32)
            else:
                entry.validated = False
            _copy_figures(entry, figures)
            require_passed(f"{name}@{model.version}", figures)
            if model.output.labels:
                with open(os.path.join(stage, "index_to_name.json"), "w", encoding="utf-8") as f:
                    json.dump({str(i): label for i, label in enumerate(model.output.labels)}, f)
            validation = {**figures.as_dict(), "validated": entry.validated, "tolerance": entry.tolerance}
            manifest = replace(manifest, validation=validation)
            serving = model.serving
            entry.archive = build_mar(stage, manifest, serving, model_store, archive_file_name(name, model.version))
            entry.passed = True
        except (TspackCliError, SpecError) as exc:
            entry.error = str(exc)
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

    models = [m for m in spec.models if not only or m.name in only]
    for model in models:
        check_files(model)
    result = BuildResult()
    jobs = [(m, a) for m in models for a in m.artifacts]
    bar = tqdm(total=len(jobs), desc="tspack build", unit="artifact", disable=not progress)
    for model in models:
        inputs, labels = load_samples(model)
        eager = export.load_eager(model.source)
        for artifact in model.artifacts:
            bar.set_postfix_str(f"{model.archive_name(artifact)}@{model.version}")
            result.entries.append(build_artifact(model, artifact, eager, inputs, labels, spec.model_store))
            bar.update(1)
    bar.close()
    result.report_path = write_report(spec.model_store, result.entries)
    return result
