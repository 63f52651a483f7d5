"""The deployment `make reliability` and tests/integration/test_reliability.py run against.

Real archives built by the archiver into a work folder, served by real TorchServes on free loopback ports:

- the main server (token auth on, model API on, so versions can be swapped and a workflow registered):
  `digits` (tensor, 2 workers; v1.0 at start, v2.0 registered by the swap scenario), `slow` (1 worker,
  a job queue of 4, a model that sleeps 50 ms per batch: the overload target), `image` (image front end),
  `ab` (the A/B router archive over digits v1.0 / v2.0) and the `ab` workflow (`.war`, /wfpredict/ab);
- the production server, started only for the security checks: the config `tspack config` writes by
  default (token auth on, model API off), no models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import requests
import torch

from archiver.build import build
from archiver.cli import main as tspack_main
from archiver.deploy.properties import entry_from_archive
from archiver.errors import ApiError
from archiver.operate.client import TorchServeClient
from archiver.operate.server import ServerHandle, free_ports, start, stop
from archiver.spec import DeploySpec
from archiver.zoo.digits_deploy import IMAGE_SPEC, digit_png, digits_model, digits_samples, digits_weights, start_server
from handlers.spec import parse

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODEL = "digits"
SLOW = "slow"
IMAGE = "image"
AB = "ab"
WORKFLOW = "ab"
DIGITS_WORKERS = 2
BATCH_SIZE = 8
SLOW_QUEUE = 4
SLOW_DELAY_S = 0.05
MAX_BODY_BYTES = 8 * 1024 * 1024  # the spec's default per-model limit

SLOW_MODEL_SOURCE = '''"""A linear model that sleeps in forward: one worker serves ~1/delay batches per second."""
import time

from torch import nn


class SlowNet(nn.Module):
    def __init__(self, delay_s: float = 0.05):
        super().__init__()
        self.delay_s = delay_s
        self.linear = nn.Linear(64, 10)

    def forward(self, x):
        time.sleep(self.delay_s)
        return self.linear(x.reshape(x.shape[0], -1))
'''


@dataclass
class Rig:
    """The built store and the running main server; the production server starts on demand."""

    root: str
    store: str
    handle: ServerHandle
    production: Optional[ServerHandle] = None
    notes: list[str] = field(default_factory=list)

    def client(self, timeout: float = 60.0) -> TorchServeClient:
        return self.handle.client(timeout)

    def url(self, path: str) -> str:
        return self.handle.inference_url + path

    def start_production(self) -> ServerHandle:
        if self.production is None:
            self.production = start_production(os.path.join(self.root, "production"), self.store)
        return self.production

    def stop_production(self) -> None:
        if self.production is not None:
            stop(self.production.run_dir, quiet=True)
            self.production = None

    def stop(self) -> None:
        self.stop_production()
        stop(self.handle.run_dir, quiet=True)


def good_sample() -> np.ndarray:
    return np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)


def good_png() -> bytes:
    return digit_png(good_sample())


def _slow_model(work: str) -> dict:
    path = os.path.join(work, "slow_model.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(SLOW_MODEL_SOURCE)
    module_spec = importlib.util.spec_from_file_location("tspack_reliability_slow_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    torch.manual_seed(0)
    weights = os.path.join(work, "slow.pt")
    torch.save(module.SlowNet(SLOW_DELAY_S).state_dict(), weights)
    return {"name": SLOW, "version": "1.0",
            "source": {"model_class": f"{path}:SlowNet", "weights": weights, "kwargs": {"delay_s": SLOW_DELAY_S}},
            "input": {"shape": [1, 8, 8]}, "samples": {"count": 4}, "artifacts": [{"format": "state_dict"}],
            "serving": {"batch_size": 1, "max_batch_delay_ms": 0, "workers": 1, "job_queue_size": SLOW_QUEUE}}


def spec_dict(work: str, store: str) -> dict:
    samples = digits_samples(work)
    weights = {v: digits_weights(work, seed) for v, seed in (("1.0", 1), ("2.0", 2))}
    serving = {"batch_size": BATCH_SIZE, "max_batch_delay_ms": 5, "workers": DIGITS_WORKERS}
    models = [digits_model(MODEL, v, w, samples, serving=serving, max_body_bytes=MAX_BODY_BYTES)
              for v, w in weights.items()]
    models.append(digits_model(IMAGE, "1.0", weights["1.0"], samples, image=dict(IMAGE_SPEC),
                               max_body_bytes=MAX_BODY_BYTES,
                               artifacts=[{"format": "torchscript", "frontend": "image"}]))
    models.append(_slow_model(work))
    ab = {"name": AB, "version": "1.0",
          "variants": [{"name": "a", "archive": f"{MODEL}_v1.0.mar", "weight": 0.5},
                       {"name": "b", "archive": f"{MODEL}_v2.0.mar", "weight": 0.5}],
          "sticky": {"header": "X-Request-Key", "field": "user"},
          "serving": {"batch_size": BATCH_SIZE, "max_batch_delay_ms": 2, "workers": 1}}
    return {"model_store": store, "models": models, "ab": [ab]}


def build_archives(root: str) -> str:
    """Build every archive of the rig into `root/store` (a fresh folder); returns the store."""
    store, work = os.path.join(root, "store"), os.path.join(root, "work")
    shutil.rmtree(store, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    result = build(parse(DeploySpec, spec_dict(work, store)), progress=False)
    failed = [(e.key, e.error) for e in result.failed]
    if failed:
        raise RuntimeError(f"building the reliability archives failed: {failed}")
    return store


def start_main(root: str, store: str) -> ServerHandle:
    entries = [entry_from_archive(f"{name}_v1.0.mar", store) for name in (MODEL, SLOW, IMAGE, AB)]
    # access_log: the overload scenario reads TorchServe's own 503 latencies from it (off in generated configs)
    handle = start_server(os.path.join(root, "main"), store, entries, model_api=True, token_auth=True,
                          access_log=True)
    try:
        handle.client().register_workflow(f"{WORKFLOW}_v1.0.war")
    except BaseException:
        stop(handle.run_dir, quiet=True)
        raise
    return handle


def production_config(folder: str, store: str) -> str:
    """The config `tspack config` writes with its defaults (the production profile), on free ports."""
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    path = os.path.join(folder, "config.properties")
    with contextlib.redirect_stdout(io.StringIO()):
        code = tspack_main(["config", "--model-store", store, "--out", path, "--gpus", "0",
                            "--inference-port", str(inference), "--management-port", str(management),
                            "--metrics-port", str(metrics), "--grpc-ports", str(grpc_inference), str(grpc_management)])
    if code != 0:
        raise RuntimeError(f"tspack config exited {code}")
    return path


def start_production(folder: str, store: str) -> ServerHandle:
    os.makedirs(folder, exist_ok=True)
    return start(production_config(folder, store), os.path.join(folder, "run"), timeout_s=180)


def prepare(root: str) -> Rig:
    """Build the archives and start the main server (about a minute on a quiet 2-core machine)."""
    os.makedirs(root, exist_ok=True)
    store = build_archives(root)
    return Rig(root=root, store=store, handle=start_main(root, store))


def default_version(client: TorchServeClient, model: str) -> str:
    """The version TorchServe serves for /predictions/<model> (its default)."""
    listing = {m["modelName"]: m.get("modelUrl") for m in client.models()}
    for described in client.describe(model, "all"):
        if described.get("modelUrl") == listing.get(model):
            return described["modelVersion"]
    raise RuntimeError(f"{model} has no default version")


def all_models(client: TorchServeClient) -> list[str]:
    return [m["modelName"] for m in client.models()]


def worker_states(client: TorchServeClient) -> dict[str, list[tuple[str, str, int]]]:
    """model -> [(version, status, pid)] for every worker of every registered model (workflow nodes too)."""
    states: dict[str, list[tuple[str, str, int]]] = {}
    for model in all_models(client):
        for described in client.describe(model, "all"):
            states.setdefault(model, []).extend(
                (described.get("modelVersion"), w.get("status"), w.get("pid")) for w in described.get("workers", []))
    return states


def ready_pids(client: TorchServeClient, model: str, version: str) -> list[int]:
    """PIDs of the READY workers of one version ([] while the management API does not answer)."""
    try:
        described = client.describe(model, version)
    except (ApiError, requests.RequestException):
        return []
    return [w["pid"] for d in described for w in d.get("workers", []) if w.get("status") == "READY"]


def tspack(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    """`tspack ARGS` as a user types it (python -m archiver.cli, from the checkout); output as text."""
    return subprocess.run([sys.executable, "-m", "archiver.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)
