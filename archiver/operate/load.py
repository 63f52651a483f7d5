"""The one load generator: `wrk` with a Lua script (POST, fixed body, headers), its numbers and its CPU share.

`tspack tune` and every HTTP system of the benchmarks are measured with this one function, so they differ only in
the server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

LUA = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
local auth = os.getenv("BENCH_AUTHORIZATION")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end
-- further headers, one "Name: value" a line (e.g. OIP's Inference-Header-Content-Length)
for name, value in string.gmatch(os.getenv("BENCH_HEADERS") or "", "([^:\n]+): ([^\n]*)") do
  wrk.headers[name] = value
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


class LoadGenError(RuntimeError):
    """wrk is missing and cannot be installed, or a run produced no numbers."""


@dataclass
class LoadResult:
    requests: int
    duration_s: float
    requests_per_s: float
    p50_ms: float | None  # None when no request completed
    p95_ms: float | None
    p99_ms: float | None
    errors: int
    loadgen_cpu_share: float
    loadgen_cpu_s: float

    def as_dict(self) -> dict:
        rounded = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}
        rounded["loadgen_cpu_share"] = round(self.loadgen_cpu_share, 5)
        del rounded["loadgen_cpu_s"]
        return rounded


def ensure_wrk() -> str:
    """The path of `wrk`; as root, install Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() != 0:
        raise LoadGenError("wrk is not installed: run `apt-get install -y wrk` as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "wrk"]):
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600, check=False)
        if shutil.which("wrk"):
            return shutil.which("wrk")
    raise LoadGenError("wrk is missing and `apt-get install -y wrk` did not install it")


def script_path() -> str:
    """The Lua script, written once per process into a private temp folder."""
    folder = os.path.join(tempfile.gettempdir(), f"tspack-bench-{os.getpid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, "post.lua")
    if not os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.write(LUA)
    return path


def run(url: str, body_file: str, content_type: str, concurrency: int, duration_s: float,
        authorization: str = "", cores: int | None = None, timeout_s: int = 30, script: str | None = None,
        env: dict | None = None, headers: dict | None = None) -> LoadResult:
    """POST `body_file` to `url` from `concurrency` connections for `duration_s` seconds.

    `headers`: more request headers (name -> value) beside Content-Type and Authorization.
    `script`: another Lua script (its own `request`, the same `done` as LUA) with extra `env` variables, for a
    workload whose bodies vary (benchmarks/cache_bench.py).

    One wrk thread (it keeps 32 connections busy with a few percent of a core); the CPU wrk used is
    read from its rusage, so its share of the machine is exact rather than sampled.
    """
    wrk = ensure_wrk()
    cores = cores or os.cpu_count() or 1
    cmd = [wrk, "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s}s",
           "-s", script or script_path(), url]
    env = dict(os.environ, BENCH_BODY=os.path.abspath(body_file), BENCH_CONTENT_TYPE=content_type,
               BENCH_AUTHORIZATION=authorization,
               BENCH_HEADERS="".join(f"{name}: {value}\n" for name, value in (headers or {}).items()), **(env or {}))
    with tempfile.TemporaryFile() as out:
        started = time.monotonic()
        process = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            process.kill()
            process.wait()
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        out.seek(0)
        text = out.read().decode("utf-8", "replace")
    return parse(text, usage.ru_utime + usage.ru_stime, wall * cores)


def parse(text: str, cpu_s: float, capacity_s: float) -> LoadResult:
    """wrk's output -> numbers; `cpu_s` is the CPU wrk used, `capacity_s` wall time x cores."""
    match = re.search(r"^BENCH_JSON (\{.*\})$", text, re.MULTILINE)
    if not match:
        raise LoadGenError(f"wrk printed no result: {text.strip()[-500:]}")
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    # requests/s counts the 2xx answers only; the others are in `errors`.
    ok = raw["requests"] - raw["status"]
    p50, p95, p99 = ((raw[k] / 1000 if raw["requests"] else None) for k in ("p50_us", "p95_us", "p99_us"))
    return LoadResult(requests=raw["requests"], duration_s=duration, requests_per_s=ok / duration, p50_ms=p50,
                      p95_ms=p95, p99_ms=p99, errors=errors, loadgen_cpu_share=cpu_s / capacity_s, loadgen_cpu_s=cpu_s)
