"""The deployment record: what a TorchServe serves, kept in its run folder so that a restart brings it back.

`deployment.json` lists every model version (archive, SHA-256 of its bytes, workers, batching) and each
model's default version. The `tspack` commands that change a deployment (register, set-default, unregister,
swap, scale) rewrite it from what the server reports afterwards; `tspack serve start` restores from it
(archiver/operate/restore.py).

Why our own record and not TorchServe's snapshot (read in TorchServe 0.12.0's frontend):
- ConfigManager reads the last snapshot only when no `--ts-config` is given, and then the snapshot's saved
  properties *replace* config.properties: edits to ports or auth in the config would be silently ignored.
- FSSnapshotSerializer writes `LOG_LOCATION/config/<timestamp>-snapshot.cfg` with a plain stream (no fsync, no
  rename) and restores the newest by file name: a crash mid-write leaves a truncated newest snapshot.
- SnapshotManager.validate throws on the first missing archive, so nothing starts; nothing checks the
  archive's bytes; workflow models are skipped.

Writes are atomic (temp file, fsync, rename, fsync of the folder): a crash leaves the old record or the new one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import requests

from archiver.errors import ApiError, DeploymentError
from archiver.operate.client import TorchServeClient

RECORD_FILE = "deployment.json"
FORMAT = 1
# TorchServe names the models a workflow registers `<workflow>__<node>`; they come back with the workflow.
WORKFLOW_MODEL_SEPARATOR = "__"


@dataclass(frozen=True)
class VersionRecord:
    """One registered model version and the archive it was loaded from."""

    archive: str                  # file name in the model store
    sha256: str
    size: int
    mtime_ns: int
    min_workers: int = 1
    max_workers: int = 1
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    response_timeout_s: int = 120


@dataclass(frozen=True)
class ModelRecord:
    default: str
    versions: dict[str, VersionRecord] = field(default_factory=dict)


@dataclass(frozen=True)
class Deployment:
    model_store: str
    models: dict[str, ModelRecord] = field(default_factory=dict)
    updated_at: str = ""
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Deployment:
        if data.get("format") != FORMAT:
            raise DeploymentError(f"unknown record format {data.get('format')!r} (this tspack writes {FORMAT})")
        models = {name: ModelRecord(default=m["default"],
                                    versions={v: VersionRecord(**r) for v, r in m["versions"].items()})
                  for name, m in data["models"].items()}
        return cls(model_store=data["model_store"], models=models, updated_at=data.get("updated_at", ""))

    def version_count(self) -> int:
        return sum(len(m.versions) for m in self.models.values())


def record_path(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), RECORD_FILE)


def load(run_dir: str) -> Optional[Deployment]:
    """The run folder's record, or None when there is none.

    Raises:
        DeploymentError: the file is not a record this tspack wrote (it names `--fresh` as the way out).
    """
    path = record_path(run_dir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return Deployment.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DeploymentError(f"cannot read the deployment record {path}: {exc}; "
                              "start with `tspack serve start --fresh` to set it aside") from exc
    except DeploymentError as exc:
        raise DeploymentError(f"{path}: {exc}; start with `tspack serve start --fresh` to set it aside") from exc


def save(deployment: Deployment, run_dir: str) -> str:
    """Write the record atomically; returns its path."""
    path = record_path(run_dir)
    write_atomically(path, json.dumps(deployment.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def write_atomically(path: str, text: str) -> None:
    """Write `text` to `path` so that a crash at any point leaves the old file or the new one, whole."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # The rename lives in the folder's entry list: without this fsync a power cut can undo it.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def set_aside(run_dir: str) -> Optional[str]:
    """Rename the record out of the way (never delete it); returns the new path, or None when there was none."""
    path = record_path(run_dir)
    if not os.path.isfile(path):
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside = os.path.join(os.path.dirname(path), f"deployment.set-aside-{stamp}.json")
    os.replace(path, aside)
    return aside


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _archive_facts(store: str, archive: str, previous: Optional[VersionRecord]) -> tuple[str, int, int]:
    """(sha256, size, mtime_ns) of a store archive. The hash is reused while size and mtime are unchanged, so a
    set-default does not re-read gigabytes; `serve start` always hashes anew (restore.plan)."""
    stat = os.stat(os.path.join(store, archive))
    if previous and previous.archive == archive and (previous.size, previous.mtime_ns) == (stat.st_size,
                                                                                            stat.st_mtime_ns):
        return previous.sha256, stat.st_size, stat.st_mtime_ns
    return sha256_file(os.path.join(store, archive)), stat.st_size, stat.st_mtime_ns


def from_server(client: TorchServeClient, model_store: str, previous: Optional[Deployment] = None) -> Deployment:
    """What `client`'s server serves now, as a record. Workflow-owned models and archives that are not files
    of the model store (nothing could restore them) are left out.

    Raises:
        ApiError: the management API did not answer.
    """
    store = os.path.abspath(model_store)
    models: dict[str, ModelRecord] = {}
    for listed in client.models():
        name = listed["modelName"]
        if WORKFLOW_MODEL_SEPARATOR in name:
            continue
        try:
            default = client.describe(name)[0]["modelVersion"]
            described = client.describe(name, "all")
        except ApiError as exc:
            if exc.status == 404:  # unregistered between the listing and the describe
                continue
            raise
        old = previous.models.get(name) if previous else None
        versions = {}
        for d in described:
            archive = os.path.basename(d.get("modelUrl") or "")
            if not archive or not os.path.isfile(os.path.join(store, archive)):
                continue
            sha, size, mtime = _archive_facts(store, archive, old.versions.get(d["modelVersion"]) if old else None)
            versions[d["modelVersion"]] = VersionRecord(
                archive=archive, sha256=sha, size=size, mtime_ns=mtime, min_workers=int(d.get("minWorkers", 1)),
                max_workers=int(d.get("maxWorkers", 1)), batch_size=int(d.get("batchSize", 1)),
                max_batch_delay_ms=int(d.get("maxBatchDelay", 100)),
                response_timeout_s=int(d.get("responseTimeout", 120)))
        if default in versions:
            models[name] = ModelRecord(default=default, versions=versions)
    return Deployment(model_store=store, models=models,
                      updated_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


def record_now(client: TorchServeClient, model_store: str, run_dir: str) -> Deployment:
    """Rewrite the run folder's record from what the server serves now.

    Raises:
        DeploymentError: the server did not answer, so the record could not follow the change.
    """
    try:
        previous = load(run_dir)
    except DeploymentError:
        set_aside(run_dir)  # unreadable (edited by hand?): kept beside the new one, never overwritten
        previous = None
    try:
        deployment = from_server(client, model_store, previous)
    except (ApiError, OSError, requests.RequestException) as exc:
        raise DeploymentError(f"the deployment record {record_path(run_dir)} could not be updated: {exc}") from exc
    save(deployment, run_dir)
    return deployment
