"""What `tspack tune` may change, one serving configuration, and the tuned spec it writes.

A configuration is an archive the build produced for the model (its runtime) plus the serving settings TorchServe
and the handler read from model-config.yaml: the batching mode, batch size and delay, workers and threads per
worker. Workers x threads never exceed the host's cores: more only makes the threads fight over them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import yaml

from archiver.package.report import load_report
from archiver.spec import DeploySpec, ModelSpec, ServingSpec
from handlers.errors import SpecError

BATCH_SIZES = (2, 4, 8, 16, 32)
DELAYS_MS = (1, 2, 5)
TUNED_KEYS = ("batching", "batch_size", "max_batch_delay_ms", "workers", "max_workers", "intra_op_threads")


@dataclass(frozen=True)
class Runtime:
    """One archive built for the model: what it runs, and the thread count its artifact was compiled for."""

    label: str  # the build's artifact id and format, e.g. "onnx (digits-onnx)"
    archive: str
    compiled_threads: Optional[int] = None  # AOTInductor: fixed at build time


@dataclass(frozen=True)
class Config:
    """One point of the search. batch_size 1 means no batching (mode and delay then do not apply)."""

    runtime: Runtime
    batching: str
    batch_size: int
    delay_ms: int
    workers: int
    threads: int

    @property
    def key(self) -> tuple:
        return (self.runtime.archive, self.batching, self.batch_size, self.delay_ms, self.workers, self.threads)

    def describe(self) -> str:
        if self.batch_size == 1:
            batching = "no batching"
        elif self.batching == "zero_wait":
            batching = f"zero_wait <= {self.batch_size}"
        else:
            batching = f"delay {self.delay_ms} ms <= {self.batch_size}"
        return f"{self.runtime.label}, {batching}, {self.workers} worker(s) x {self.threads} thread(s)"

    def serving(self, base: ServingSpec) -> ServingSpec:
        """`base` (the spec's own serving: devices, timeouts, cache) with this configuration's settings."""
        if self.batch_size == 1:
            batching, delay = "delay", 0
        else:
            batching, delay = self.batching, (self.delay_ms if self.batching == "delay" else None)
        return replace(base, batching=batching, batch_size=self.batch_size, max_batch_delay_ms=delay,
                       workers=self.workers, max_workers=None, intra_op_threads=self.threads)


def runtimes(spec: DeploySpec, model: ModelSpec) -> list[Runtime]:
    """The archives that `tspack build` produced and validated for `model`, in the spec's artifact order.

    Raises:
        SpecError: none was built (run `tspack build --spec FILE --only NAME` first).
    """
    from archiver.package.archive import read_manifest

    built = {e.get("artifact_id"): e for e in load_report(spec.model_store)["artifacts"].values()
             if e.get("model") == model.name and e.get("version") == model.version and e.get("passed")
             and e.get("validated", True) and e.get("archive") and os.path.isfile(e["archive"])}
    found = []
    for artifact in model.artifacts:
        entry = built.get(artifact.id)
        if entry is None:
            continue
        manifest = read_manifest(entry["archive"])
        found.append(Runtime(label=f"{artifact.format} ({entry['name']})", archive=entry["archive"],
                             compiled_threads=manifest.runtime.intra_op_threads))
    if not found:
        raise SpecError(f"tune: no validated archive of {model.name} {model.version} in {spec.model_store}; "
                        f"run `tspack build --spec FILE --only {model.name}` first")
    return found


def worker_layouts(cores: int, compiled_threads: Optional[int] = None) -> list[tuple[int, int]]:
    """(workers, threads per worker) pairs that fit `cores`: each power-of-two worker count with the cores split
    evenly between its workers, and with one thread each. An artifact compiled for N threads keeps N."""
    layouts = []
    workers = 1
    while workers <= cores:
        for threads in ((compiled_threads,) if compiled_threads else (cores // workers, 1)):
            if workers * threads <= cores and (workers, threads) not in layouts:
                layouts.append((workers, threads))
        workers *= 2
    return layouts or [(1, 1)]


def batchings(batch_size: int) -> list[tuple[str, int, int]]:
    """(mode, batch size, delay) choices around one batch size: none, zero-wait, and each delay."""
    return ([("delay", 1, 0), ("zero_wait", batch_size, 0)]
            + [("delay", batch_size, d) for d in DELAYS_MS])


def baseline(model: ModelSpec, found: list[Runtime], cores: int) -> Config:
    """Where the search starts: the spec's own serving settings on its first archive."""
    serving = model.serving
    runtime = found[0]
    threads = runtime.compiled_threads or serving.intra_op_threads or max(1, cores // serving.workers)
    workers = serving.workers if serving.workers * threads <= cores else 1
    return Config(runtime=runtime, batching=serving.batching, batch_size=serving.batch_size,
                  delay_ms=serving.max_batch_delay_ms if serving.batching == "delay" else 0, workers=workers,
                  threads=min(threads, cores))


def tuned_block(config: Config, original: dict) -> dict:
    """The model's `serving:` mapping with the tuned settings in place of the spec's own (the rest kept)."""
    block = {k: v for k, v in (original or {}).items() if k not in TUNED_KEYS}
    block["batch_size"] = config.batch_size
    if config.batch_size > 1:
        block["batching"] = config.batching
        if config.batching == "delay":
            block["max_batch_delay_ms"] = config.delay_ms
    block["workers"] = config.workers
    block["intra_op_threads"] = config.threads
    return block


def pick_model(spec: DeploySpec, name: str, version: Optional[str] = None) -> ModelSpec:
    """The spec's model `name` (at `version`; needed only when the spec lists several versions of it)."""
    found = [m for m in spec.models if m.name == name and (version is None or m.version == version)]
    if len(found) == 1:
        return found[0]
    if not found:
        listed = ", ".join(dict.fromkeys(f"{m.name} {m.version}" for m in spec.models)) or "none"
        raise SpecError(f"tune: the spec has no model {name}{' ' + version if version else ''}; it has: {listed}")
    raise SpecError(f"tune: the spec lists {name} at versions {', '.join(m.version for m in found)}; "
                    f"choose one with --version")


def write_tuned_spec(spec_path: str, model: ModelSpec, config: Config, out_path: str, note: str) -> str:
    """Write the spec at `spec_path` with `model`'s serving block tuned, to `out_path` (may be `spec_path`).

    The YAML is re-emitted (comments are lost; anchors shared with other models are not changed: the tuned
    model gets a mapping of its own). `note` goes on top as a comment. The result is parsed again before it is
    written, so a spec `tspack build` would refuse is never left behind.
    """
    with open(spec_path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    models = [m for m in data.get("models") or [] if isinstance(m, dict) and m.get("name") == model.name
              and str(m.get("version")) == model.version]
    if not models:
        raise SpecError(f"tune: {spec_path} has no model {model.name} {model.version}")
    for model in models:
        model["serving"] = tuned_block(config, model.get("serving"))
    text = "".join(f"# {line}\n" for line in note.splitlines()) + yaml.safe_dump(data, sort_keys=False)
    tmp = out_path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    try:
        DeploySpec.from_yaml(tmp)
    except SpecError:
        os.remove(tmp)
        raise
    os.replace(tmp, out_path)
    return out_path
