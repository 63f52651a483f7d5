"""`tspack build`: export each artifact a spec asks for, validate it against eager, package it, report.

Orchestration only. Per artifact, in order: prepare the network (prune, fp16) -> export it with its format's
exporter (archiver/optimize/formats.py) into a staging folder -> load it with the serving runtime -> compare
with the eager model on the spec's samples, per named output, at two lengths of every free axis -> package the
`.mar` only when it passed. A failed artifact leaves nothing in the model store and is reported with its reason.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import torch

from archiver.errors import TspackCliError
from archiver.operate.drift import PROFILE_KEY, profile_from_outputs  # issue 21 (drift)
from archiver.optimize import export
from archiver.optimize.criteria import FP16_TOLERANCE, criteria_for
from archiver.optimize.formats import FORMATS, ExportJob, prepare_network
from archiver.optimize.named_io import NamedIO
from archiver.optimize.samples import Samples, calibration, load_samples
from archiver.optimize.validate import Figures, compare, measure_latency, require_passed, run_batched
from archiver.package.archive import build_artifact_mar
from archiver.package.report import ArtifactReport, write_report
from archiver.spec import ArtifactSpec, DeploySpec, ModelSpec, check_files
from handlers.device import Placement
from handlers.errors import SpecError
from handlers.runtimes import load_runtime
from handlers.spec import INDEX_TO_NAME_FILE, ArtifactManifest

logger = logging.getLogger(__name__)

__all__ = ["build", "build_artifact", "BuildResult", "FP16_TOLERANCE", "criteria_for"]
_criteria = criteria_for  # the name older callers use


@dataclass
class BuildResult:
    entries: list[ArtifactReport] = field(default_factory=list)
    report_path: str = ""

    @property
    def failed(self) -> list[ArtifactReport]:
        return [e for e in self.entries if not e.passed]


@dataclass
class Source:
    """A model ready to build: the eager reference behind its named inputs and outputs, and its samples.

    `spec` is the model's spec with everything a Hugging Face folder declares filled in (inputs, labels, text);
    `files` are shipped in every archive of the model (name in the archive -> path), e.g. tokenizer.json.
    """

    spec: ModelSpec
    eager: torch.nn.Module
    named: NamedIO
    samples: Samples
    program_cache: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)


def resolve(model: ModelSpec) -> tuple[ModelSpec, Samples, Optional[object]]:
    """The model's spec and samples, with a Hugging Face folder's inputs, labels, text spec and tokenized sample
    texts (two lengths, two batch sizes, padded) filled in; the loaded folder too, when there is one."""
    if not model.source.pretrained:
        return model, load_samples(model), None
    from archiver.optimize.pretrained import DEFAULT_TEXTS, load_pretrained

    pretrained = load_pretrained(model.source.pretrained, model.source.task)
    text = pretrained.text
    if model.text is not None:  # the spec's settings, within the model's position table
        text = replace(text, max_length=min(model.text.max_length, text.max_length), max_texts=model.text.max_texts,
                       padding=model.text.padding)
    output = model.output if model.output.labels else replace(
        pretrained.output_spec(model.output.top_k), softmax=model.output.softmax)
    resolved = replace(model, inputs=model.inputs or pretrained.input_specs(), output=output, text=text,
                       frontend="text" if model.frontend == "tensor" else model.frontend)
    batches = pretrained.sample_batches(model.samples.texts or DEFAULT_TEXTS, batch_sizes=(1, 4))
    widest = {}
    for batch in batches:  # per length, the batch with the most rows
        if batch.length not in widest or len(batch.texts) > len(widest[batch.length].texts):
            widest[batch.length] = batch
    sets = [b.inputs for _, b in sorted(widest.items())]
    return resolved, Samples(sets[0], None, sets[1:]), pretrained


def eager_runner(named: NamedIO):
    """The reference: the eager model on named arrays, answering named outputs."""
    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = named(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in named.input_names))
        return {name: t.float().numpy() if t.is_floating_point() else t.numpy()
                for name, t in zip(named.output_names, out)}

    return run


def count_parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def load_source(model: ModelSpec, samples: Optional[Samples] = None, pretrained: Optional[object] = None) -> Source:
    """The eager model, wrapped so that every exporter sees the spec's named inputs and named outputs."""
    samples = samples or load_samples(model)
    files = {}
    if pretrained is not None:
        eager = pretrained.module
        files[model.text.tokenizer] = pretrained.tokenizer_file
    else:
        eager = export.load_eager(model.source)
    named = NamedIO(eager, [i.name for i in model.inputs], list(model.outputs) or None).eval()
    named.discover({name: torch.from_numpy(a) for name, a in samples.head(2).items()})
    return Source(model, eager, named, samples, files=files)


def _manifest(source: Source, artifact: ArtifactSpec, runtime_spec, built_at: str, optimizations: list[str]):
    model = source.spec
    name = model.archive_name(artifact)
    return ArtifactManifest(
        name=name, version=model.version, frontend=artifact.frontend or model.frontend, runtime=runtime_spec,
        inputs=model.inputs, outputs=tuple(source.named.output_names), output=model.output, image=model.image,
        text=model.text, max_body_bytes=model.max_body_bytes, built_at=built_at, optimizations=tuple(optimizations))


def _validate(source: Source, artifact: ArtifactSpec, manifest: ArtifactManifest, stage: str,
              entry: ArtifactReport) -> tuple[Figures, Optional[dict]]:
    """Load the staged artifact with the serving runtime and compare it with eager; also profile its predictions
    (a classifier's; else None)."""
    fp16 = artifact.precision == "fp16"
    here = Placement(device="cuda:0" if fp16 else "cpu", gpu_id=0 if fp16 else None, threads=torch.get_num_threads())
    runtime = load_runtime(manifest, stage, here)
    entry.runtime = runtime.describe().get("runtime", artifact.format)
    samples = source.samples
    figures = compare(eager_runner(source.named), runtime.run, samples.inputs, criteria_for(source.spec, artifact),
                      samples.labels, primary=manifest.primary_output, extra_sets=tuple(samples.other_lengths))
    figures.checked_lengths = samples.lengths()
    figures.latency_ms_b1 = measure_latency(runtime.run, samples.inputs, 1)
    figures.latency_ms_b32 = measure_latency(runtime.run, samples.inputs, 32)
    # issue 21 (drift): what this artifact predicts on the samples, for `tspack drift` to compare with.
    profile = profile_from_outputs(manifest.output, run_batched(runtime.run, samples.inputs, 32),
                                   manifest.primary_output)
    return figures, profile


def build_artifact(source: Source, artifact: ArtifactSpec, model_store: str, gpus: int = 0) -> ArtifactReport:
    model = source.spec
    name = model.archive_name(artifact)
    built_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry = ArtifactReport(name=name, version=model.version, format=artifact.format, model=model.name,
                           artifact_id=artifact.id, built_at=built_at)
    with tempfile.TemporaryDirectory(prefix="tspack-stage-") as stage:
        try:
            notes: list[str] = []
            network, entry.sparsity, validate_here = prepare_network(artifact, source.eager, notes)
            named = source.named if network is source.eager else _rewrapped(source.named, network)
            job = ExportJob(model, artifact, network, named, source.samples, stage, notes, source.program_cache)
            started = _dt.datetime.now()
            runtime_spec = FORMATS[artifact.format].export(job)
            entry.build_s = round((_dt.datetime.now() - started).total_seconds(), 2)
            optimizations = [artifact.format if artifact.format != "torchscript" else f"torchscript-{artifact.method}",
                             *artifact.optimizations]
            entry.optimizations = optimizations
            entry.parameters = count_parameters(source.eager)
            entry.notes = list(job.notes)
            criteria = criteria_for(model, artifact)
            entry.tolerance = criteria.tolerance
            entry.size_bytes = os.path.getsize(os.path.join(stage, runtime_spec.file))
            manifest = _manifest(source, artifact, runtime_spec, built_at, optimizations)
            precision = "" if artifact.precision == "fp32" else f"-{artifact.precision}"
            entry.runtime = artifact.format + precision
            figures, profile = Figures(), None
            if validate_here:
                figures, profile = _validate(source, artifact, manifest, stage, entry)
                _copy_figures(entry, figures)
            else:
                entry.validated = False
            require_passed(f"{name}@{model.version}", figures)
            for name, path in source.files.items():
                shutil.copyfile(path, os.path.join(stage, name))
            if model.output.labels:
                with open(os.path.join(stage, INDEX_TO_NAME_FILE), "w", encoding="utf-8") as f:
                    json.dump({str(i): label for i, label in enumerate(model.output.labels)}, f)
            validation = {"validated": False, "passed": None, "notes": entry.notes}
            if entry.validated:
                validation = {**figures.as_dict(), "validated": True, "tolerance": entry.tolerance,
                              "notes": entry.notes}
                if profile is not None:  # issue 21 (drift)
                    validation[PROFILE_KEY] = profile
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


def _rewrapped(named: NamedIO, network: torch.nn.Module) -> NamedIO:
    """The same named inputs and outputs around a pruned or cast copy of the model."""
    wrapped = NamedIO(network, named.input_names, named.output_names).eval()
    wrapped.output_names = named.output_names
    return wrapped


def _copy_figures(entry: ArtifactReport, figures: Figures) -> None:
    for key in ("max_abs_error", "top1_agreement", "accuracy", "reference_accuracy", "latency_ms_b1", "latency_ms_b32"):
        setattr(entry, key, getattr(figures, key))


def build(spec: DeploySpec, progress: bool = True, only: Optional[list[str]] = None) -> BuildResult:
    """Build every artifact of every model in `spec` (or of the models named in `only`).

    Spec errors (a missing file, a bad key) raise before anything is built. Validation failures do
    not raise: they are reported per artifact, and `BuildResult.failed` lists them.
    """
    from tqdm import tqdm

    from archiver.deploy.placement import detect_gpus, device_config

    gpus = spec.gpus if spec.gpus is not None else detect_gpus()
    models = [m for m in spec.models if not only or m.name in only]
    tests = [ab for ab in spec.ab if not only or ab.name in only]
    resolved = []
    for ab in tests:
        device_config(ab.serving, gpus, f"ab.{ab.name}.serving")
    for model in models:  # every spec error surfaces here, before anything is built
        check_files(model)
        device_config(model.serving, gpus, f"models.{model.name}.serving")
        model, samples, pretrained = resolve(model)
        for artifact in model.artifacts:
            if artifact.quantize and artifact.quantize.mode == "static":
                calibration(model, artifact, samples)
        resolved.append((model, samples, pretrained))
    result = BuildResult()
    jobs = sum(len(m.artifacts) for m in models) + sum(2 if ab.workflow.enabled else 1 for ab in tests)
    bar = tqdm(total=jobs, desc="tspack build", unit="artifact", disable=not progress)
    for model, samples, pretrained in resolved:
        source = load_source(model, samples, pretrained)
        for artifact in model.artifacts:
            bar.set_postfix_str(f"{model.archive_name(artifact)}@{model.version}")
            result.entries.append(build_artifact(source, artifact, spec.model_store, gpus))
            bar.update(1)
    from archiver.package.ab import build_router, build_workflow

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
