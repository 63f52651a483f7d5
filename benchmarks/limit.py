"""The limit: the archive's own runtime called in-process on full batches, no HTTP, no decoding.

The model file is the one inside the tspack archive, loaded by the same runtime class the worker
uses (`handlers.runtimes.load_runtime`), with the torch / ONNX Runtime thread count given.
"""

from __future__ import annotations

import gc
import tempfile
import time
import zipfile

import numpy as np


def measure(mar_path: str, batch: int, threads: int, duration_s: float, warmup: int = 2, min_runs: int = 3) -> dict:
    """Samples/s and per-batch latency percentiles of `runtime.run` on random batches of `batch` samples."""
    from handlers.device import Placement
    from handlers.runtimes import load_runtime
    from handlers.spec import ArtifactManifest

    with tempfile.TemporaryDirectory(prefix="tspack-limit-") as folder:
        with zipfile.ZipFile(mar_path) as archive:
            archive.extractall(folder)
        manifest = ArtifactManifest.load(folder)
        runtime = load_runtime(manifest, folder, Placement(device="cpu", gpu_id=None, threads=threads))
        spec = manifest.inputs[0]
        shape = tuple(1 if d == -1 else d for d in spec.shape)
        x = {spec.name: np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
        for _ in range(warmup):
            runtime.run(x)
        latencies = []
        started = time.perf_counter()
        while time.perf_counter() - started < duration_s or len(latencies) < min_runs:
            t0 = time.perf_counter()
            runtime.run(x)
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
        description = runtime.describe()
        del runtime
        gc.collect()
    ms = np.asarray(latencies) * 1000.0
    return {
        "requests": len(latencies) * batch, "duration_s": round(wall, 3),
        "requests_per_s": round(len(latencies) * batch / wall, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3), "errors": 0,
        "threads": description.get("intra_op_threads", threads),
    }
