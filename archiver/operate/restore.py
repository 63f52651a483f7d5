"""`tspack serve start`: start TorchServe with the deployment its run folder recorded, or seed that record.

Restoring means starting TorchServe with an *effective* config: config.properties as written, with its
`load_models=` and `models=` lines replaced by the record's versions. What TorchServe 0.12 does with those
lines decides the rest (ModelServer.initModelStore, ModelManager, ModelVersionedRefs; checked by running it):
- it loads every `load_models` entry, several versions of one model included;
- it ignores `defaultVersion` in `models=`: the first version of a model it loads becomes the default, so
  each model's recorded default goes first;
- the archive's own model-config.yaml workers win over `models=`, so versions whose recorded workers differ
  are scaled once the server is up (the scale API works with the model API off).

Each archive is hashed and compared with the record before the start; a missing or changed one is refused by
name and the rest start. The record changes only when a `tspack` command changes the deployment, or when a
start had nothing to restore from (it then records what config.properties started).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from archiver.deploy.properties import read_properties
from archiver.errors import ServerError
from archiver.operate import deployment as record
from archiver.operate.server import DEFAULT_RUN_DIR, ServerHandle, ensure_not_running, start
from archiver.operate.swap import wait_ready

EFFECTIVE_CONFIG = "effective.properties"
MODEL_LINES = ("load_models=", "models=")


@dataclass(frozen=True)
class Restored:
    model: str
    version: str
    default: bool
    min_workers: int
    max_workers: int
    archive: str


@dataclass(frozen=True)
class Refused:
    model: str
    version: str
    archive: str
    reason: str

    def __str__(self) -> str:
        return f"{self.model} {self.version} ({self.archive}): {self.reason}"


@dataclass
class Prepared:
    """What to start TorchServe with: the config (effective or as written) and what it will restore."""

    config_path: str
    model_store: str
    source: str                                    # "record" | "config"
    deployment: Optional[record.Deployment] = None
    restored: list[Restored] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    set_aside: Optional[str] = None                # where --fresh moved the record
    cleaned: Optional[str] = None                  # what a server that had died left behind, now cleaned up


@dataclass
class StartOutcome:
    """What `serve start` did: where the models came from, what was restored and what was refused."""

    handle: ServerHandle
    source: str                            # "record" | "config"
    restored: list[Restored] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    set_aside: Optional[str] = None        # where --fresh moved the record
    record_path: str = ""
    cleaned: Optional[str] = None


def plan(deployment: record.Deployment, model_store: str) -> tuple[list[Restored], list[Refused]]:
    """Versions to restore (each model's default first) and versions refused (archive missing or changed).

    When a model's default is refused, its first remaining version becomes the default (TorchServe's rule).
    """
    restored: list[Restored] = []
    refused: list[Refused] = []
    for name in sorted(deployment.models):
        model = deployment.models[name]
        order = sorted(model.versions, key=lambda v: (v != model.default, v))
        kept: list[tuple[str, record.VersionRecord]] = []
        for version in order:
            entry = model.versions[version]
            path = os.path.join(model_store, entry.archive)
            if not os.path.isfile(path):
                refused.append(Refused(name, version, entry.archive, f"archive missing from {model_store}"))
            elif record.sha256_file(path) != entry.sha256:
                refused.append(Refused(name, version, entry.archive,
                                       f"archive changed since it was deployed (SHA-256 was {entry.sha256[:12]}...)"))
            else:
                kept.append((version, entry))
        restored += [Restored(name, v, i == 0, e.min_workers, e.max_workers, e.archive)
                     for i, (v, e) in enumerate(kept)]
    return restored, refused


def effective_config(base_config: str, deployment: record.Deployment, restored: list[Restored], out: str) -> str:
    """config.properties with its model lines replaced by the restored versions; written atomically to `out`."""
    with open(base_config, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not line.lstrip().startswith(MODEL_LINES)]
    lines.insert(1 if lines and lines[0].startswith("#") else 0,
                 f"# Restored by `tspack serve start` from {record.RECORD_FILE}; base config: {base_config}")
    if restored:
        lines.append("load_models=" + ",".join(f"{r.model}={r.archive}" for r in restored))
        block: dict[str, dict] = {}
        for r in restored:
            v = deployment.models[r.model].versions[r.version]
            block.setdefault(r.model, {})[r.version] = {
                "defaultVersion": r.default, "marName": v.archive, "minWorkers": v.min_workers,
                "maxWorkers": v.max_workers, "batchSize": v.batch_size, "maxBatchDelay": v.max_batch_delay_ms,
                "responseTimeout": v.response_timeout_s}
        lines.append("models=" + json.dumps(block, separators=(",", ":")))
    record.write_atomically(out, "\n".join(lines) + "\n")
    return out


def scale_to_record(handle: ServerHandle, restored: list[Restored], timeout_s: float) -> None:
    """Bring each restored version to its recorded worker counts (the archive's own counts won at load)."""
    client = handle.client()
    for r in restored:
        described = client.describe(r.model, r.version)[0]
        if (described.get("minWorkers"), described.get("maxWorkers")) != (r.min_workers, r.max_workers):
            # Asynchronous: a synchronous scale holds a frontend network thread until the workers are up.
            client.scale(r.model, r.version, min_worker=r.min_workers, max_worker=r.max_workers, synchronous=False)
        wait_ready(client, r.model, r.version, r.min_workers, timeout_s)


def prepare(config_path: str, run_dir: str, fresh: bool = False) -> Prepared:
    """Before TorchServe starts: set the record aside (`fresh`), check the recorded archives, and write the
    effective config into `run_dir` when there is a record. No server may run from `run_dir`.

    Raises:
        ServerError: config.properties is missing, a server runs from `run_dir`, or every recorded version was
            refused (nothing would serve).
        DeploymentError: the record cannot be read (use `fresh`).
    """
    config_path = os.path.abspath(config_path)
    run_dir = os.path.abspath(run_dir)
    if not os.path.isfile(config_path):
        raise ServerError(f"config not found: {config_path} (write one with `tspack config`)")
    store = os.path.abspath(read_properties(config_path).get("model_store", "model_store"))
    os.makedirs(run_dir, exist_ok=True)
    cleaned = ensure_not_running(run_dir)  # before --fresh touches the record of a server that still runs
    aside = record.set_aside(run_dir) if fresh else None
    deployment = record.load(run_dir)
    if deployment is None:
        return Prepared(config_path, store, "config", set_aside=aside, cleaned=cleaned)
    restored, refused = plan(deployment, store)
    if deployment.version_count() and not restored:
        raise ServerError("every recorded version was refused: " + "; ".join(map(str, refused))
                          + ". Put the archives back, or start from config.properties with --fresh")
    effective = effective_config(config_path, deployment, restored, os.path.join(run_dir, EFFECTIVE_CONFIG))
    return Prepared(effective, store, "record", deployment, restored, refused, aside, cleaned)


def finish(handle: ServerHandle, prepared: Prepared, timeout_s: float = 180.0) -> list[Restored]:
    """Once TorchServe answers: scale restored versions to their recorded workers, and record the deployment
    (unless something was refused: refused versions stay in the record, so that putting the archive back and
    restarting restores them). Returns what serves, as restored (from the record) or seeded (from the config).
    """
    if prepared.source == "record":
        scale_to_record(handle, prepared.restored, timeout_s)
        if not prepared.refused:
            record.record_now(handle.client(), prepared.model_store, handle.run_dir)
        return prepared.restored
    seeded = record.record_now(handle.client(), prepared.model_store, handle.run_dir)
    return [Restored(name, v, v == m.default, r.min_workers, r.max_workers, r.archive)
            for name, m in sorted(seeded.models.items()) for v, r in sorted(m.versions.items())]


def start_restored(config_path: str, run_dir: str = DEFAULT_RUN_DIR, fresh: bool = False,
                   timeout_s: float = 180.0) -> StartOutcome:
    """Start TorchServe from `run_dir`'s record when there is one (and not `fresh`), else from `config_path`.

    Raises:
        ServerError: as server.start and prepare.
        DeploymentError: the record cannot be read (use `fresh`).
    """
    prepared = prepare(config_path, run_dir, fresh)
    handle = start(prepared.config_path, run_dir, timeout_s=timeout_s)
    restored = finish(handle, prepared, timeout_s)
    return StartOutcome(handle, prepared.source, restored, prepared.refused, prepared.set_aside,
                        record.record_path(run_dir), prepared.cleaned)


def describe_outcome(outcome: StartOutcome) -> list[str]:
    """The lines `serve start` prints about where the models came from."""
    lines = [outcome.cleaned] if outcome.cleaned else []
    if outcome.set_aside:
        lines.append(f"--fresh: the recorded deployment was set aside as {outcome.set_aside}")
    source = "the deployment record" if outcome.source == "record" else "config.properties"
    lines.append(f"models from {source} ({outcome.record_path}):")
    for r in outcome.restored:
        workers = f"{r.min_workers}" if r.min_workers == r.max_workers else f"{r.min_workers}-{r.max_workers}"
        lines.append(f"  {r.model} {r.version}{' (default)' if r.default else ''}: {workers} worker(s), {r.archive}")
    if not outcome.restored:
        lines.append("  (none)")
    for refusal in outcome.refused:
        lines.append(f"  REFUSED {refusal}")
    return lines
