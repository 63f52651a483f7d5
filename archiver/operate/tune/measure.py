"""One configuration served and measured: a private TorchServe, the archive with the configuration's
model-config.yaml, registered, warmed, loaded at each concurrency, unregistered.

One server serves every trial of a run (a TorchServe start costs 10-30 s; a registration a few), with its own
ports, store and run folder, token auth on and the model API on for it alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from typing import Optional

import yaml

from archiver.errors import ApiError, ServerError, TuneError
from archiver.operate.tune import load
from archiver.operate.tune.space import Config
from archiver.package.archive import MODEL_CONFIG_FILE, model_config
from archiver.spec import ServingSpec

WARM_S = 1.0


@dataclass
class Trial:
    """A configuration and what it did at each concurrency; `error` when it could not be served at all."""

    number: int
    config: Config
    levels: list[load.Level] = field(default_factory=list)
    error: Optional[str] = None
    seconds: float = 0.0

    def level(self, concurrency: int) -> Optional[load.Level]:
        return next((lv for lv in self.levels if lv.concurrency == concurrency), None)


def with_model_config(archive: str, config: dict, dest: str) -> str:
    """A copy of `archive` whose model-config.yaml is `config` (everything else byte for byte)."""
    partial = dest + ".partial"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
        for item in source.infolist():
            if item.filename != MODEL_CONFIG_FILE:
                target.writestr(item, source.read(item.filename))
        target.writestr(MODEL_CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    os.replace(partial, dest)
    return dest


class TrialServer:
    """A TorchServe of its own for one tuning run; use as a context manager."""

    def __init__(self, work_dir: str, start_timeout_s: float = 180.0):
        self.work_dir = work_dir
        self.store = os.path.join(work_dir, "store")
        self.start_timeout_s = start_timeout_s
        self.handle = None
        self.client = None

    def __enter__(self) -> TrialServer:
        from archiver.deploy.properties import ServerConfig, write_config
        from archiver.operate.server import free_ports, start

        os.makedirs(self.store, exist_ok=True)
        inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
        config = ServerConfig(model_store=self.store, inference_port=inference, management_port=management,
                              metrics_port=metrics, grpc_inference_port=grpc_inference,
                              grpc_management_port=grpc_management, model_api=True, open_inference_protocol=False)
        path = write_config(config, os.path.join(self.work_dir, "config.properties"))
        self.handle = start(path, os.path.join(self.work_dir, "run"), timeout_s=self.start_timeout_s)
        self.client = self.handle.client(timeout=120.0)
        return self

    def __exit__(self, *exc) -> None:
        from archiver.operate.server import stop

        if self.handle is not None:
            stop(self.handle.run_dir, quiet=True)

    def run(self, number: int, config: Config, base: ServingSpec, body: load.Body, concurrency: tuple[int, ...],
            duration_s: float) -> Trial:
        """Serve `config` (on `base`'s other settings) and measure it at each concurrency, in order."""
        started = time.monotonic()
        trial = Trial(number, config)
        name = f"trial{number}"
        archive = with_model_config(config.runtime.archive, model_config(config.serving(base)),
                                    os.path.join(self.store, f"{name}.mar"))
        try:
            self.client.register(os.path.basename(archive), model_name=name, initial_workers=config.workers)
        except (ApiError, ServerError) as exc:
            trial.error = f"not served: {exc}"
        else:
            try:
                trial.levels = self._measure(name, body, concurrency, duration_s)
            except TuneError as exc:
                trial.error = str(exc)
            finally:
                self._unregister(name)
        os.remove(archive)
        trial.seconds = time.monotonic() - started
        return trial

    def _measure(self, name: str, body: load.Body, concurrency: tuple[int, ...], duration_s: float) -> list:
        url = f"{self.handle.inference_url}/predictions/{name}"
        authorization = self.handle.authorization()
        load.run(url, body, max(concurrency), WARM_S, authorization)  # lazy init, JIT, caches
        return [load.run(url, body, c, duration_s, authorization) for c in concurrency]

    def _unregister(self, name: str) -> None:
        try:
            self.client.unregister(name)
        except (ApiError, ServerError):  # a worker that died took its registration with it
            pass


def scratch_folder(parent: Optional[str] = None) -> str:
    """A private work folder for one tuning run (removed by `remove_scratch`)."""
    return tempfile.mkdtemp(prefix="tspack-tune-", dir=parent)


def remove_scratch(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
