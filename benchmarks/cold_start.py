"""Cold starts: the demo deployment as a user meets it (`tspack serve start` to the first 200 prediction), and one
worker registered into a running server (register to READY), with the worker's peak RSS.

The deployment is the one `make demo` starts (digits 1.0, and digits 2.0 as image + ONNX and image + int8),
from the archives `make demo` builds into model_store/; when they are missing, the demo's own first steps
(train, distil, `tspack build --spec config/deploy.yaml`) build them. The server gets free ports and its own
run folder, so a running demo server is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE = os.path.join(ROOT, "model_store")
DEMO_WORK = os.path.join(STORE, "work")
DEMO_ARCHIVES = ("digits_v1.0.mar", "digits-image-onnx_v2.0.mar", "digits-image-int8_v2.0.mar")


def _tspack(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "archiver.cli", *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def ensure_demo_archives() -> None:
    """Build the demo's archives the way `make demo` does, unless they are already in model_store/."""
    if all(os.path.exists(os.path.join(STORE, name)) for name in DEMO_ARCHIVES):
        return
    quiet = {"cwd": ROOT, "check": True, "stdout": subprocess.DEVNULL}
    subprocess.run([sys.executable, "scripts/train_digits.py", "--out", DEMO_WORK], **quiet)
    subprocess.run([sys.executable, "scripts/distill_digits.py", "--work", DEMO_WORK], **quiet)
    _tspack("build", "--spec", "config/deploy.yaml", "--quiet")


def _first_200(url: str, body: bytes, key: str, t0: float, timeout_s: float) -> float:
    from benchmarks.systems import http_status

    while time.monotonic() - t0 < timeout_s:
        if http_status(url, body, "application/json", f"Bearer {key}") == 200:
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)
    raise RuntimeError(f"no 200 prediction within {timeout_s:.0f}s of `tspack serve start`")


def demo_cold_start(work: str, timeout_s: float = 180.0) -> float:
    """Seconds from launching `tspack serve start` for the demo deployment to its first 200 prediction."""
    import numpy as np

    from archiver.operate.server import free_ports, stop

    ensure_demo_archives()
    folder = os.path.join(work, "demo-cold-start")
    os.makedirs(folder, exist_ok=True)
    config, run_dir = os.path.join(folder, "config.properties"), os.path.join(folder, "run")
    ports = [str(p) for p in free_ports(6)]
    loads = [arg for name in DEMO_ARCHIVES for arg in ("--load", name)]
    _tspack("config", "--model-store", STORE, *loads, "--enable-model-api", "--inference-port", ports[0],
            "--management-port", ports[1], "--metrics-port", ports[2], "--grpc-ports", ports[3], ports[4],
            "--oip-port", ports[5], "--out", config)
    sample = np.load(os.path.join(DEMO_WORK, "heldout.npz"))["x"][0]
    body = json.dumps({"data": sample.tolist()}).encode()
    stop(run_dir, quiet=True)
    t0 = time.monotonic()
    try:
        _tspack("serve", "start", "--config", config, "--run-dir", run_dir, "--fresh")
        with open(os.path.join(run_dir, "key_file.json"), encoding="utf-8") as f:
            key = json.load(f)["inference"]["key"]
        return _first_200(f"http://127.0.0.1:{ports[0]}/predictions/digits", body, key, t0, timeout_s)
    finally:
        stop(run_dir, quiet=True)


def _workers(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True)
                if any("model_service_worker" in part for part in p.cmdline())]
    except psutil.Error:
        return []


def worker_cold_start(served, mar: str, body, load_s: float = 2.0, timeout_s: float = 30.0) -> dict:
    """Register `mar` (in the server's store) with one worker, synchronously: seconds to READY; then `load_s` of
    requests at c=8. `peak_rss_mb` is the worker process's peak over both; the model is unregistered after.

    `served`: a tspack server started with the model API on (systems.start_tspack(..., model_api=True)).
    """
    from archiver.operate import load as loadgen
    from benchmarks.systems import CpuWatch, RssPeak

    name = mar.removesuffix(".mar").rsplit("_v", 1)[0]
    client = served.handle.client(timeout=300)
    with RssPeak(served.pid, interval=0.1, match="model_service_worker") as rss, CpuWatch(served.pid) as cpu:
        t0 = time.monotonic()
        client.register(mar, model_name=name, initial_workers=1, synchronous=True)
        seconds = time.monotonic() - t0
        result = loadgen.run(f"{served.handle.inference_url}/predictions/{name}", body.file, body.content_type, 8,
                             load_s, served.authorization)
        cpu.excluded_cpu_s = result.loadgen_cpu_s
    client.unregister(name)
    deadline = time.monotonic() + timeout_s
    while _workers(served.pid) and time.monotonic() < deadline:  # the next registration's peak is its own
        time.sleep(0.1)
    return {"cold_start_s": round(seconds, 3), "peak_rss_mb": rss.peak_mb, "errors": result.errors,
            "server_cpu_share": cpu.tree_share, "other_cpu_share": cpu.other_share}
