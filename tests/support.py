"""Shared test helpers: tiny real models, real archives, real TorchServe contexts and servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import requests
import torch
import yaml

from archiver.build import build
from archiver.operate.status import metric_sum, parse_prometheus
from archiver.spec import DeploySpec

# The digits deployment helpers live in the library, shared with benchmarks/reliability/ (tests and benchmarks
# import neither the other); re-exported here under the names the tests use.
from archiver.zoo.digits_deploy import DIGITS_CLASS as DIGITS_CLASS
from archiver.zoo.digits_deploy import IMAGE_SPEC as IMAGE_SPEC
from archiver.zoo.digits_deploy import LABELS as LABELS
from archiver.zoo.digits_deploy import digit_png as digit_png
from archiver.zoo.digits_deploy import digits_model as digits_model
from archiver.zoo.digits_deploy import digits_samples as digits_samples
from archiver.zoo.digits_deploy import digits_weights as digits_weights
from archiver.zoo.digits_deploy import png_declaring as png_declaring
from archiver.zoo.digits_deploy import start_server as start_server
from handlers.spec import parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_models(store: str, models: list[dict]) -> list:
    spec = parse(DeploySpec, {"models": models, "model_store": store})
    result = build(spec, progress=False)
    failed = [(e.key, e.error) for e in result.failed]
    assert not failed, failed
    return result.entries


def extract(mar_path: str, folder: str) -> str:
    """Unpack an archive the way TorchServe does, into `folder`."""
    with zipfile.ZipFile(mar_path) as z:
        z.extractall(folder)
    return folder


def make_context(model_dir: str, batch: int = 8, gpu: Optional[int] = None, metrics: Any = None):
    """A real `ts.context.Context` for a model folder, as TorchServe builds it for a worker."""
    from ts.context import Context

    with open(os.path.join(model_dir, "MAR-INF", "MANIFEST.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    config_file = os.path.join(model_dir, "model-config.yaml")
    model_yaml = {}
    if os.path.exists(config_file):
        with open(config_file, encoding="utf-8") as f:
            model_yaml = yaml.safe_load(f)
    return Context(manifest["model"]["modelName"], model_dir, manifest, batch, gpu, "0.12.0",
                   metrics=metrics, model_yaml_config=model_yaml)


def torchserve_batch(context: Any, bodies: list[tuple[Any, str]], headers: Optional[list[dict]] = None,
                     field: str = "body") -> list[dict]:
    """Give `context` the per-request metadata TorchServe sets, and return the handler's `data` list.

    bodies: (payload, content type) per request; payload as TorchServe passes it (bytes when
    decode_input_request=false).
    """
    from ts.context import RequestProcessor

    processors, data = [], []
    for i, (payload, content_type) in enumerate(bodies):
        request_headers = {field: {"content-type": content_type}}
        request_headers.update((headers or [{}] * len(bodies))[i])
        processors.append(RequestProcessor(request_headers))
        data.append({field: payload})
    context.request_processor = processors
    context.request_ids = {i: f"req-{i}" for i in range(len(bodies))}
    return data


def statuses(context: Any, count: int) -> list[int]:
    return [context.get_response_status(i)[0] for i in range(count)]


def eager_outputs(weights: str, x: np.ndarray) -> np.ndarray:
    from archiver.zoo.digits_cnn import DigitsCNN

    model = DigitsCNN()
    model.load_state_dict(torch.load(weights, weights_only=True))
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(x)).numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --- subprocesses and metrics -----------------------------------------------------------------------------

CLI_TIMEOUT_S = 300


def tspack(*args: str, cwd: Optional[str] = None, env: Optional[dict] = None,
           timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run `tspack ARGS` as a user types it (python -m archiver.cli), with a timeout; output as text."""
    return python("-m", "archiver.cli", *args, cwd=cwd, env=env, timeout=timeout)


def python(*args: str, cwd: Optional[str] = None, env: Optional[dict] = None,
           timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run this venv's Python with ARGS and the checkout on PYTHONPATH, with a timeout; output as text."""
    full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or REPO, env=full_env,
                          timeout=timeout)


def metric_deltas(client: Any, before: list, wanted: dict[str, tuple[str, dict]]) -> dict[str, float]:
    """{label: the change of `metric_sum(name, **labels)` since `before`} for wanted = {label: (name, labels)}."""
    after = parse_prometheus(client.metrics())
    return {label: metric_sum(after, name, **labels) - metric_sum(before, name, **labels)
            for label, (name, labels) in wanted.items()}


def wait_for_deltas(client: Any, before: list, wanted: dict[str, tuple[str, dict]],
                    done: Callable[[dict[str, float]], bool], timeout_s: float = 30.0,
                    settle_s: float = 1.5) -> dict[str, float]:
    """Poll the metrics port until `done(deltas)`; then once more after `settle_s`, so a late flush shows.

    Handler counters reach Prometheus through the worker's log, flushed every second: a fixed sleep is either
    too short on a busy machine or wasted on an idle one. Returns the last deltas (the caller asserts them).
    """
    deadline = time.monotonic() + timeout_s
    deltas = metric_deltas(client, before, wanted)
    while not done(deltas) and time.monotonic() < deadline:
        time.sleep(0.25)
        deltas = metric_deltas(client, before, wanted)
    if settle_s:
        time.sleep(settle_s)
        deltas = metric_deltas(client, before, wanted)
    return deltas


def settled_metrics(client: Any, quiet_s: float = 2.5, timeout_s: float = 60.0) -> list:
    """The metrics port's samples once the pack's counters have stopped moving for `quiet_s` seconds.

    Take the `before` of a delta with this: counts an earlier test's traffic still holds in a worker (flushed every
    second) or a shadow still computes would otherwise land in this test's delta.
    """
    deadline = time.monotonic() + timeout_s
    samples = parse_prometheus(client.metrics())
    pack = [s for s in samples if s[0].startswith("tspack_")]
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.25)
        samples = parse_prometheus(client.metrics())
        now = [s for s in samples if s[0].startswith("tspack_")]
        if now != pack:
            pack, quiet_since = now, time.monotonic()
    return samples


def wait_until(condition: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.25) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout_s` passes (its last value)."""
    deadline = time.monotonic() + timeout_s
    value = condition()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = condition()
    return value


def worker_environment(client: Any, model: str) -> dict[str, str]:
    """The environment of the first worker of `model` (its pid from the management API), from /proc."""
    pids = [w["pid"] for d in client.describe(model) for w in d["workers"]]
    assert pids, f"{model} has no worker"
    with open(f"/proc/{pids[0]}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


# --- a model with two named inputs and a dict output (archiver/zoo/token_classifier.py) -----------------

TOKEN_CLASS = os.path.join(REPO, "archiver", "zoo", "token_classifier.py") + ":TokenClassifier"
TOKEN_INPUTS = [{"name": "input_ids", "shape": [-1], "dtype": "int64"},
                {"name": "attention_mask", "shape": [-1], "dtype": "int64"}]


def token_samples(folder: str, rows: int = 16, length: int = 12) -> str:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1000, (rows, length)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, length - 3:] = 0
    path = os.path.join(folder, "tokens.npz")
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path


def token_model(folder: str, formats: list[dict], **overrides) -> dict:
    from archiver.zoo.token_classifier import TokenClassifier

    torch.manual_seed(3)
    weights = os.path.join(folder, "tokens.pt")
    torch.save(TokenClassifier().state_dict(), weights)
    model = {"name": "sequence", "version": "1.0", "source": {"model_class": TOKEN_CLASS, "weights": weights},
             "inputs": TOKEN_INPUTS, "samples": {"file": token_samples(folder)}, "artifacts": formats,
             "serving": {"batch_size": 8, "max_batch_delay_ms": 5, "workers": 1}}
    model.update(overrides)
    return model


def token_eager(folder: str, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    from archiver.zoo.token_classifier import TokenClassifier

    model = TokenClassifier()
    model.load_state_dict(torch.load(os.path.join(folder, "tokens.pt"), weights_only=True))
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(ids), torch.from_numpy(mask))
    return {k: v.numpy() for k, v in out.items()}


def int8_archive(int8_store: dict, artifact_id: str) -> str:
    """The path of one archive of the `int8_store` fixture, after asserting that it built and passed validation."""
    entry = int8_store["entries"][artifact_id]
    assert entry.passed, (artifact_id, entry.error)
    return entry.archive


# --- Open Inference Protocol requests (tests/integration/test_oip.py, test_oip_gateway.py) -------------------


def digits_x(store: dict, rows: int) -> np.ndarray:
    """The first `rows` digits samples of a store fixture (its "samples" file)."""
    return np.load(store["samples"])["x"][:rows]


def oip_tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> Any:
    """tritonclient's InferInput holding `array`, in the binary tensor extension or as JSON."""
    from tritonclient.http import InferInput

    tensor = InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def oip_post(url: str, auth: dict, body: bytes, header_length: Optional[int] = None) -> requests.Response:
    """POST a raw OIP body as a client would, with the Inference-Header-Content-Length of a binary one."""
    headers = dict(auth)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return requests.post(url, data=body, headers=headers)
