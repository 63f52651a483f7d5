"""A/B artifacts from an `ab:` entry of the spec: a router archive (recommended) and a workflow `.war`.

Both are assembled from variant archives that were built and validated on their own; a variant is
copied byte for byte (model file, manifest with its validation figures), so one variant can be rebuilt
and swapped without touching the other.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import shutil
import tempfile
import zipfile

import yaml

from archiver.errors import BuildError
from archiver.package.archive import HANDLERS_DIR, archive_file_name, build_mar, read_manifest
from archiver.package.report import ArtifactReport
from archiver.spec import ABSpec
from handlers.device import Placement
from handlers.errors import SpecError
from handlers.integrity import sha256_of
from handlers.pipeline import Pipeline
from handlers.routing import ROUTER_MANIFEST_FILE, RouterManifest, Shadow, body_limit
from handlers.spec import ArtifactManifest

WORKFLOW_HANDLER = "ab_workflow.py"
# The route node forwards a body as base64 (4/3 larger) in its answer, which TorchServe caps at
# max_response_size (16 MiB in the generated config): larger answers make the frontend drop the worker.
WORKFLOW_BODY_CAP = 12 * 1024 * 1024
HANDLERS_ZIP = "tspack_handlers.zip"


def resolve_archive(store: str, archive: str, key: str) -> str:
    path = archive if os.path.isabs(archive) else os.path.join(store, archive)
    if not os.path.isfile(path):
        raise SpecError(f"{key}: archive not found: {archive} (build it first; looked in {store})")
    return path


def stage_variant(mar_path: str, folder: str, key: str) -> ArtifactManifest:
    """Copy a validated archive's model files and manifest (not its handlers or TorchServe files) into `folder`."""
    manifest = read_manifest(mar_path)
    if manifest.validation.get("passed") is not True:
        raise BuildError(f"{key}: {os.path.basename(mar_path)} was not validated on this kind of host "
                         f"(validation: {manifest.validation.get('notes') or 'missing'}); refusing it as a variant")
    with zipfile.ZipFile(mar_path) as archive:
        mar_manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        handler_file = os.path.basename(mar_manifest["model"].get("handler", ""))
        for member in archive.infolist():
            name = member.filename
            own = name.startswith(("MAR-INF/", "handlers/")) or name in (handler_file, "model-config.yaml")
            if member.is_dir() or own:
                continue
            target = os.path.join(folder, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return manifest


def router_manifest(ab: ABSpec, store: str, stage: str) -> RouterManifest:
    """Stage every variant (and the shadow) under `stage/variants/<name>` and describe the routing."""
    sources = {}
    arms = [(v.name, v.archive, f"ab.{ab.name}.variants.{v.name}.archive") for v in ab.variants]
    if ab.shadow:
        arms.append((ab.shadow.name, ab.shadow.archive, f"ab.{ab.name}.shadow.archive"))
    for name, archive, key in arms:
        mar = resolve_archive(store, archive, key)
        manifest = stage_variant(mar, os.path.join(stage, "variants", name), key)
        sources[name] = {"archive": os.path.basename(mar), "sha256": sha256_of(mar), "model": manifest.name,
                         "version": manifest.version}
    policy = ab.policy({v.name: f"variants/{v.name}" for v in ab.variants})
    shadow = None
    if ab.shadow:
        shadow = Shadow(name=ab.shadow.name, folder=f"variants/{ab.shadow.name}", sample_rate=ab.shadow.sample_rate,
                        queue_size=ab.shadow.queue_size)
    return RouterManifest(name=ab.name, version=ab.version, policy=policy, shadow=shadow,
                          built_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), sources=sources)


def smoke_test(stage: str, manifest: RouterManifest) -> None:
    """Load every staged variant with the serving code (SHA-256 checks included) and run one zero sample."""
    from handlers.base import warm_up

    folders = [v.folder for v in manifest.policy.variants] + ([manifest.shadow.folder] if manifest.shadow else [])
    for folder in folders:
        warm_up(Pipeline.load(os.path.join(stage, folder), Placement(device="cpu", gpu_id=None, threads=1)))


def build_router(ab: ABSpec, store: str, gpus: int = 0) -> ArtifactReport:
    """The recommended A/B artifact: one archive routing between its variants inside a single worker."""
    entry = ArtifactReport(name=ab.name, version=ab.version, format="ab-router", model=ab.name, runtime="ab-router",
                           artifact_id="router")
    with tempfile.TemporaryDirectory(prefix="tspack-ab-") as stage:
        manifest = router_manifest(ab, store, stage)
        with open(os.path.join(stage, ROUTER_MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(manifest.to_json(), f, indent=2)
        smoke_test(stage, manifest)
        entry.archive = build_mar(stage, ab.name, ab.version, "ab_router", ab.serving, store,
                                  archive_file_name(ab.name, ab.version), gpus=gpus)
    entry.built_at = manifest.built_at
    entry.size_bytes = os.path.getsize(entry.archive)
    entry.optimizations = [f"{v.name}={v.weight:g}" for v in manifest.policy.variants]
    entry.notes = [f"variant {name}: {src['model']} {src['version']} ({src['archive']})"
                   for name, src in manifest.sources.items()]
    entry.passed = True
    return entry


def workflow_spec(ab: ABSpec) -> dict:
    """TorchServe workflow spec: route -> every variant -> merge."""
    wf = ab.workflow
    models: dict = {"min-workers": 1, "max-workers": 1, "batch-size": wf.batch_size,
                    "max-batch-delay": wf.max_batch_delay_ms, "retry-attempts": wf.retry_attempts,
                    "timeout-ms": wf.timeout_ms}
    for v in ab.variants:
        models[v.name] = {"url": os.path.basename(v.archive)}
    dag: dict = {"route": [v.name for v in ab.variants]}
    dag.update({v.name: ["merge"] for v in ab.variants})
    return {"models": models, "dag": dag}


def _zip_handlers(path: str) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for root, dirs, files in os.walk(HANDLERS_DIR):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    full = os.path.join(root, name)
                    z.write(full, os.path.join("handlers", os.path.relpath(full, HANDLERS_DIR)))


def build_workflow(ab: ABSpec, store: str, gpus: int = 0) -> ArtifactReport:
    """The `.war` twin, through torch-workflow-archiver's Python API. Variant archives must be in the store."""
    from workflow_archiver.workflow_packaging import package_workflow
    from workflow_archiver.workflow_packaging_utils import WorkflowExportUtils

    for v in ab.variants:
        resolve_archive(store, v.archive, f"ab.{ab.name}.variants.{v.name}.archive")
    entry = ArtifactReport(name=f"{ab.name}.war", version=ab.version, format="workflow", model=ab.name,
                           runtime="workflow", artifact_id="workflow")
    with tempfile.TemporaryDirectory(prefix="tspack-war-") as stage:
        spec_file = os.path.join(stage, "workflow.yaml")
        with open(spec_file, "w", encoding="utf-8") as f:
            yaml.safe_dump(workflow_spec(ab), f, sort_keys=False)
        limits = [body_limit(read_manifest(resolve_archive(store, v.archive, v.name))) for v in ab.variants]
        policy = RouterManifest(name=ab.name, version=ab.version, policy=ab.policy(),
            max_body_bytes=min(max(limits), WORKFLOW_BODY_CAP))
        with open(os.path.join(stage, ROUTER_MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump(policy.to_json(), f, indent=2)
        handler = os.path.join(stage, WORKFLOW_HANDLER)
        shutil.copy2(os.path.join(HANDLERS_DIR, WORKFLOW_HANDLER), handler)
        _zip_handlers(os.path.join(stage, HANDLERS_ZIP))
        out = os.path.join(stage, "out")
        os.makedirs(out)
        extra = ",".join(os.path.join(stage, name) for name in (ROUTER_MANIFEST_FILE, HANDLERS_ZIP))
        args = argparse.Namespace(workflow_name=ab.name, spec_file=spec_file, handler=handler, export_path=out,
                                  extra_files=extra, force=True)
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                package_workflow(args, WorkflowExportUtils.generate_manifest_json(args))
            except SystemExit as exc:  # the archiver exits on its own errors
                raise BuildError(f"ab.{ab.name}.workflow: torch-workflow-archiver failed (exit {exc.code})") from exc
        target = os.path.join(store, f"{ab.name}_v{ab.version}.war")
        shutil.move(os.path.join(out, f"{ab.name}.war"), target + ".partial")
        os.replace(target + ".partial", target)
    entry.archive = target
    entry.size_bytes = os.path.getsize(target)
    entry.optimizations = [f"{v.name}={v.weight:g}" for v in ab.variants]
    entry.notes = [f"DAG route -> {', '.join(v.name for v in ab.variants)} -> merge; batch {ab.workflow.batch_size}, "
                   f"delay {ab.workflow.max_batch_delay_ms} ms, timeout {ab.workflow.timeout_ms} ms "
                   f"x {ab.workflow.retry_attempts} retries (lost-answer mitigation)"]
    entry.built_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    entry.passed = True
    return entry
