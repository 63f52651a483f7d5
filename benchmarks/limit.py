"""The limit: the archive's own code called in-process on full batches, with no HTTP and no TorchServe.

Two things are timed: the model alone (`runtime.run` on a ready batch), and decode + model (the handler's own
path, `Pipeline.process`, on the request bytes the served rows send: decode, validate, stack, run, encode the
answers). Each in the layouts a server may use on this host: one process running 2 threads, or 2 processes of 1
thread each running side by side (as two workers do). The limit of a row is the best layout.

Each process is a child (`python -m benchmarks.limit`) that loads the archive once and then answers commands on
stdin, so one pool serves every measurement of a run. The children of a layout start each measurement together.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = "benchmarks.limit"  # in every child's command line
KINDS = ("model", "decode")  # the model alone; decode + model
KIND_LABELS = {"model": "model alone", "decode": "decode + model"}


@dataclass(frozen=True)
class Layout:
    processes: int
    threads: int

    @property
    def label(self) -> str:
        return f"{self.processes}p x {self.threads}t"


def layouts(cores: int | None = None) -> list[Layout]:
    """One process with every core's thread, and one 1-thread process per core."""
    cores = cores or os.cpu_count() or 1
    return [Layout(1, cores)] + ([Layout(cores, 1)] if cores > 1 else [])


class LimitPool:
    """The children of one layout for one archive, kept loaded between measurements; use as a context manager."""

    def __init__(self, mar_path: str, layout: Layout, timeout_s: float = 300.0):
        self.mar_path, self.layout, self.timeout_s = mar_path, layout, timeout_s
        self.children: list[subprocess.Popen] = []

    def __enter__(self) -> LimitPool:
        for _ in range(self.layout.processes):
            self.children.append(subprocess.Popen(
                [sys.executable, "-m", CHILD, self.mar_path, str(self.layout.threads)], cwd=REPO,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1))
        for child in self.children:
            self._expect(child, "ready")
        return self

    def __exit__(self, *exc) -> None:
        for child in self.children:
            try:
                child.stdin.close()
                child.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                child.kill()
                child.wait()
        self.children = []

    def _expect(self, child: subprocess.Popen, word: str) -> dict:
        line = ""
        while not line.startswith("{"):  # a library may print to stdout; the protocol's lines are JSON objects
            line = child.stdout.readline()
            if not line:
                raise RuntimeError(f"limit child exited with {child.wait()} before '{word}' ({self.mar_path})")
        message = json.loads(line)
        if message.get("error"):
            raise RuntimeError(f"limit child failed: {message['error']}")
        return message

    def measure(self, kind: str, batch: int, seconds: float, body: str | None = None,
                content_type: str = "application/json") -> dict:
        """Samples/s summed over the children and per-batch latency percentiles, all children running at once."""
        command = {"kind": kind, "batch": batch, "seconds": seconds, "body": body, "content_type": content_type}
        for child in self.children:  # each warms up on the command, then waits for "go"
            child.stdin.write(json.dumps(command) + "\n")
        for child in self.children:
            self._expect(child, "armed")
        for child in self.children:
            child.stdin.write("go\n")
        results = [self._expect(child, "done") for child in self.children]
        samples = sum(r["samples"] for r in results)
        wall = max(r["wall_s"] for r in results)
        ms = np.asarray([v for r in results for v in r["latencies_ms"]])
        return {
            "requests": samples, "duration_s": round(wall, 3),
            "requests_per_s": round(sum(r["samples"] / r["wall_s"] for r in results), 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3), "errors": sum(r["errors"] for r in results),
        }


# -- the child ---------------------------------------------------------------------------------------------


def _work(pipeline, kind: str, batch: int, body: str | None, content_type: str):
    """The function one timed iteration calls, and how many of its answers were errors."""
    from handlers.base import write_answers
    from handlers.request import Request

    if kind == "model":
        rng, inputs = np.random.default_rng(0), {}
        for spec in pipeline.manifest.inputs:
            shape = tuple(1 if d == -1 else d for d in spec.shape)
            inputs[spec.name] = rng.random((batch, *shape)).astype(spec.dtype)
        return lambda: (pipeline.runtime.run(inputs), 0)[1]
    with open(body, "rb") as f:
        payload = f.read()

    def decode_and_run() -> int:
        # a fresh bytearray per request, as TorchServe's worker hands the handler each body
        requests = [Request(payload=bytearray(payload), content_type=content_type) for _ in range(batch)]
        answers = pipeline.process(requests)
        write_answers(answers, None)
        return sum(1 for a in answers if not a.ok)

    return decode_and_run


def _run(pipeline, command: dict) -> dict:
    step = _work(pipeline, command["kind"], command["batch"], command["body"], command["content_type"])
    for _ in range(2):
        step()
    print(json.dumps({"armed": True}), flush=True)
    if sys.stdin.readline().strip() != "go":
        raise RuntimeError("expected 'go'")
    latencies, errors = [], 0
    started = time.perf_counter()
    while time.perf_counter() - started < command["seconds"] or len(latencies) < 3:
        t0 = time.perf_counter()
        errors += step()
        latencies.append((time.perf_counter() - t0) * 1000.0)
    wall = time.perf_counter() - started
    return {"done": True, "samples": len(latencies) * command["batch"], "wall_s": wall, "errors": errors,
            "latencies_ms": [round(v, 3) for v in latencies]}


def child(mar_path: str, threads: int) -> None:
    """Load the archive, say ready, then answer one JSON command a line until stdin closes.

    The process keeps freed memory as the archive's workers do (handlers/allocator.py), so the limit is the
    model's own speed, not the C library's."""
    from archiver.package.archive import archive_info
    from handlers.allocator import freed_memory_wanted, keep_freed_memory
    from handlers.device import Placement
    from handlers.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="tspack-limit-") as folder:
        try:
            with zipfile.ZipFile(mar_path) as archive:
                archive.extractall(folder)
            kept = freed_memory_wanted(archive_info(mar_path)[2].get("handler") or {}) and keep_freed_memory()
            pipeline = Pipeline.load(folder, Placement(device="cpu", gpu_id=None, threads=threads))
        except Exception as exc:  # the parent shows it as the step's failure
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return
        print(json.dumps({"ready": True, "keep_freed_memory": kept, **pipeline.runtime.describe()}), flush=True)
        for line in sys.stdin:
            if line.strip():
                try:
                    print(json.dumps(_run(pipeline, json.loads(line))), flush=True)
                except Exception as exc:
                    print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)


if __name__ == "__main__":
    child(sys.argv[1], int(sys.argv[2]))
