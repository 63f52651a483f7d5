"""Packaging: a staged artifact -> a self-contained `.mar`, through torch-model-archiver's Python API.

An archive carries the `handlers` package, the manifest (input spec, runtime, provenance, validation
figures) and `model-config.yaml`, so TorchServe serves it without this pack installed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from typing import Optional

import yaml

import handlers
from archiver.errors import BuildError
from archiver.spec import ServingSpec
from handlers.registry import FRONTENDS
from handlers.spec import MANIFEST_FILE, ArtifactManifest, parse, to_dict
from handlers.zero_wait import DEFAULT_MAX_PENDING

HANDLERS_DIR = os.path.dirname(os.path.abspath(handlers.__file__))
MODEL_CONFIG_FILE = "model-config.yaml"


def model_config(serving: ServingSpec, gpus: int = 0, extra: Optional[dict] = None) -> dict:
    """The archive's model-config.yaml: TorchServe reads workers, devices and batching here, our handler
    its `handler:` section. `gpus` is the GPU count of the host the archive is built for."""
    from archiver.deploy.placement import device_config

    zero_wait = serving.batching == "zero_wait"
    config = {
        **device_config(serving, gpus),
        # zero_wait: the frontend hands each request over at once and the handler batches (handlers/zero_wait.py)
        "batchSize": 1 if zero_wait else serving.batch_size,
        "maxBatchDelay": serving.max_batch_delay_ms,
        "responseTimeout": serving.response_timeout_s,
    }
    if serving.job_queue_size:
        config["jobQueueSize"] = serving.job_queue_size
    handler = {}
    if zero_wait:
        config["asyncCommunication"] = True
        handler["zero_wait"] = {"max_batch": serving.batch_size,
                                "max_pending": max(serving.job_queue_size or DEFAULT_MAX_PENDING, serving.batch_size)}
    if serving.intra_op_threads:
        handler["intra_op_threads"] = serving.intra_op_threads
    if not serving.cpu_fallback:
        handler["cpu_fallback"] = False
    if not serving.keep_freed_memory:  # read back by handlers/base.py
        handler["keep_freed_memory"] = False
    if serving.cache is not None:  # read back by handlers/cache.py:cache_config
        handler["cache"] = to_dict(serving.cache)
    if handler:
        config["handler"] = handler
    config.update(extra or {})
    return config


def copy_handlers(dest_dir: str) -> None:
    """Copy the handlers package (sources only) into `dest_dir/handlers`."""
    shutil.copytree(HANDLERS_DIR, os.path.join(dest_dir, "handlers"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def build_mar(stage_dir: str, name: str, version: str, handler: str, serving: ServingSpec, export_dir: str,
              archive_file: str, serialized_file: Optional[str] = None, gpus: int = 0) -> str:
    """Package the files in `stage_dir` (manifests, model files, labels) into `export_dir/archive_file`.

    `handler` names a module of the handlers package ("tensor", "image", "ab_router"); the archive gets
    the whole package beside it. The archive is written to a temporary name and moved into place only
    when complete, so a failed build leaves no partial archive in the model store.

    Returns:
        the path of the `.mar`.
    """
    from model_archiver import ModelArchiver, ModelArchiverConfig

    with tempfile.TemporaryDirectory(prefix="tspack-pack-") as work:
        extra = os.path.join(work, "extra")
        shutil.copytree(stage_dir, extra)
        copy_handlers(extra)
        config_path = os.path.join(work, MODEL_CONFIG_FILE)
        with open(config_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(model_config(serving, gpus), f, sort_keys=False)
        out = os.path.join(work, "out")
        os.makedirs(out)
        config = ModelArchiverConfig(
            model_name=name,
            handler=os.path.join(extra, "handlers", f"{handler}.py"),
            version=version,
            serialized_file=os.path.join(extra, serialized_file) if serialized_file else None,
            extra_files=extra,
            config_file=config_path,
            export_path=out,
            force=True,
        )
        # torch-model-archiver logs through the root logger and stages in $TMPDIR/<model name>.
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                ModelArchiver.generate_model_archive(config)
            except Exception as exc:
                raise BuildError(f"{name}: torch-model-archiver failed: {exc}") from exc
        os.makedirs(export_dir, exist_ok=True)
        target = os.path.join(export_dir, archive_file)
        partial = target + ".partial"
        shutil.move(os.path.join(out, f"{name}.mar"), partial)
        os.replace(partial, target)
    logging.getLogger(__name__).info("built %s", target)
    return target


def build_artifact_mar(stage_dir: str, manifest: ArtifactManifest, serving: ServingSpec, export_dir: str,
                       gpus: int = 0) -> str:
    """A single-artifact archive: its manifest, model file and the front end's handler."""
    manifest.dump(stage_dir)
    handler = FRONTENDS[manifest.frontend].handler
    return build_mar(stage_dir, manifest.name, manifest.version, handler, serving, export_dir,
                     archive_file_name(manifest.name, manifest.version), serialized_file=manifest.runtime.file,
                     gpus=gpus)


def read_manifest(mar_path: str) -> ArtifactManifest:
    """The tspack manifest inside a `.mar` (its version, build time and validation figures)."""
    try:
        with zipfile.ZipFile(mar_path) as archive:
            return parse(ArtifactManifest, json.loads(archive.read(MANIFEST_FILE)))
    except (KeyError, zipfile.BadZipFile, OSError) as exc:
        raise BuildError(f"{mar_path}: not a tspack archive ({exc})") from exc


def archive_info(mar_path: str) -> tuple[str, str, dict]:
    """(model name, version, model-config.yaml) of any `.mar`, from TorchServe's own manifest."""
    try:
        with zipfile.ZipFile(mar_path) as archive:
            model = json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]
            names = archive.namelist()
            config = yaml.safe_load(archive.read(MODEL_CONFIG_FILE)) if MODEL_CONFIG_FILE in names else {}
    except (KeyError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BuildError(f"{mar_path}: not a model archive ({exc})") from exc
    return model["modelName"], model["modelVersion"], config or {}


def archive_file_name(name: str, version: str) -> str:
    return f"{name}_v{version}.mar"


def copy_into_store(archive: str, store: str) -> bool:
    """Put `archive` into the model store TorchServe reads (it registers archives by file name only there).
    True when it was copied, False when it was already there."""
    if os.path.dirname(os.path.abspath(archive)) == os.path.abspath(store):
        return False
    shutil.copy2(archive, os.path.join(store, os.path.basename(archive)))
    return True
