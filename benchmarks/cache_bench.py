"""`make bench-cache`: the response cache (issue 21) under a workload where half the requests repeat an input.

    .venv/bin/python -m benchmarks.cache_bench [--seconds S] [--rounds N] [--concurrency C]

One TorchServe serves the light model of the serving benchmark (MnistCNN, TorchScript, 1 worker x 2 threads,
batch 8 / 1 ms) under two names built from the same weights: `...-cache-off` and `...-cache-on`
(`serving.cache`). wrk (benchmarks/loadgen.py) sends JSON 1x28x28 requests from C connections: each request is
a new input with probability 1/2, else a uniformly drawn input this run already sent. A new input differs from
the others in one pixel's value, so it costs a full decode and inference while never sharing a key. The runs
interleave off and on (alternating which goes first) so that a neighbour's load on a shared machine falls on
both. Then one input sent over and over (every request after the first a hit) gives the latency of a hit, next
to the same request computed by the uncached model. The hit rate each mixed run achieved is read from
`tspack_cache_total` on the metrics port. Writes benchmarks/results/cache.json.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from archiver.deploy.properties import ModelEntry, ServerConfig, write_config
from archiver.operate import load as loadgen
from archiver.operate.server import ServerHandle, free_ports, start, stop
from archiver.operate.status import metric_sum, parse_prometheus
from benchmarks import artifacts
from benchmarks.artifacts import MODELS, Variant
from handlers.metrics import CACHE

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
VARIANT = Variant("torchscript", workers=1, threads=2, batch_size=8, delay_ms=1)
# Large enough that no input of a whole run is evicted: the workload's repeats may reach back to its start.
CACHE_SETTINGS = {"max_entries": 200_000, "max_mb": 256}
JSON = "application/json"
# Two pixels a new input writes: the round (so rounds never share inputs) and a per-round counter.
ROUND_MARK, COUNTER_MARK = 12345.0, 54321.0

LUA = r"""
local prefix, middle, suffix = [==[PREFIX]==], [==[MIDDLE]==], [==[SUFFIX]==]
local round = tonumber(os.getenv("BENCH_ROUND"))
local repeat_share = tonumber(os.getenv("BENCH_REPEAT"))
local auth = os.getenv("BENCH_AUTHORIZATION")
local sent = 0
math.randomseed(7919 * round + 17)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end

-- input k of this round: distinct pixel values (1e-6 apart in [0, 1), float32 keeps them apart)
local function body(k)
  return prefix .. round .. middle .. string.format("0.%06d", k) .. suffix
end

request = function()
  local k
  if sent > 0 and math.random() < repeat_share then
    k = math.random(sent)
  else
    sent = sent + 1
    k = sent
  end
  return wrk.format(nil, nil, nil, body(k))
end
"""


def mixed_script(folder: str) -> str:
    """The Lua script of the mixed workload: the serving benchmark's sample with two pixels left as holes."""
    model = MODELS["light"]
    sample = np.random.default_rng(1).random(model.shape, dtype=np.float32)
    sample.flat[0], sample.flat[1] = ROUND_MARK, COUNTER_MARK
    text = json.dumps({"data": sample.tolist()}, separators=(",", ":"))
    prefix, rest = text.split(repr(ROUND_MARK), 1)
    middle, suffix = rest.split(repr(COUNTER_MARK), 1)
    done = loadgen.LUA[loadgen.LUA.index("function done"):]
    lua = LUA.replace("PREFIX", prefix).replace("MIDDLE", middle).replace("SUFFIX", suffix) + done
    path = os.path.join(folder, "mixed.lua")
    with open(path, "w", encoding="utf-8") as f:
        f.write(lua)
    return path


def build(work: str, store: str) -> dict[str, str]:
    """Two archives of the light model, the same but for `serving.cache`: {"off": name, "on": name}."""
    from archiver.build import build as build_specs
    from archiver.spec import DeploySpec
    from handlers.spec import parse

    model = MODELS["light"]
    weights = artifacts.weights(model, work)
    names = {kind: f"{VARIANT.archive_name(model)}-cache-{kind}" for kind in ("off", "on")}
    specs = []
    for kind, name in names.items():
        spec = artifacts.model_spec(model, VARIANT, weights)
        spec["name"] = name
        if kind == "on":
            spec["serving"] = {**spec["serving"], "cache": CACHE_SETTINGS}
        if not os.path.exists(os.path.join(store, f"{name}_v1.0.mar")):
            specs.append(spec)
    if specs:
        result = build_specs(parse(DeploySpec, {"models": specs, "model_store": store}), progress=False)
        if result.failed:
            raise RuntimeError("build failed: " + "; ".join(f"{e.name}: {e.error}" for e in result.failed))
    return names


def serve(folder: str, store: str, names: dict[str, str]) -> ServerHandle:
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    entries = tuple(ModelEntry(name=n, version="1.0", mar=f"{n}_v1.0.mar", workers=VARIANT.workers,
                               batch_size=VARIANT.batch_size, max_batch_delay_ms=VARIANT.delay_ms)
                    for n in names.values())
    config = ServerConfig(model_store=store, inference_port=inference, management_port=management,
                          metrics_port=metrics, grpc_inference_port=grpc_inference,
                          grpc_management_port=grpc_management, models=entries)
    path = write_config(config, os.path.join(folder, "config.properties"))
    return start(path, os.path.join(folder, "run"), timeout_s=240)


def cache_outcomes(handle: ServerHandle, name: str) -> dict[str, float]:
    samples = parse_prometheus(handle.client().metrics())
    return {o: metric_sum(samples, CACHE, ModelName=name, Outcome=o) for o in ("hit", "miss", "evicted")}


def settled_outcomes(handle: ServerHandle, name: str, timeout_s: float = 10.0) -> dict[str, float]:
    """The cache counters once they stop moving: the worker flushes them once a second."""
    deadline = time.monotonic() + timeout_s
    last = cache_outcomes(handle, name)
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = cache_outcomes(handle, name)
        if now == last:
            return now
        last = now
    return last


def row(result: loadgen.LoadResult, **extra) -> dict:
    return {**extra, **result.as_dict()}


def run(args: argparse.Namespace) -> dict:
    load_before = os.getloadavg()[0]
    work = os.path.join(BENCH_DIR, "work", "cache")
    store = os.path.join(work, "store")
    names = build(work, store)
    folder = tempfile.mkdtemp(prefix="tspack-cache-bench-")
    script = mixed_script(folder)
    bodies = artifacts.bodies(MODELS["light"], work)
    handle = serve(folder, store, names)
    try:
        auth = handle.authorization()
        url = {kind: f"{handle.inference_url}/predictions/{name}" for kind, name in names.items()}
        for kind in ("off", "on"):  # warm the JVM's hot paths and every batch shape, on each model
            loadgen.run(url[kind], bodies["json"], JSON, args.concurrency, args.warmup, auth)
        mixed = []
        for r in range(args.rounds):
            for kind in (("off", "on") if r % 2 == 0 else ("on", "off")):
                before = settled_outcomes(handle, names["on"]) if kind == "on" else None
                result = loadgen.run(url[kind], bodies["json"], JSON, args.concurrency, args.seconds, auth,
                                     script=script, env={"BENCH_ROUND": str(r + 1), "BENCH_REPEAT": "0.5"})
                extra = {"cache": kind, "round": r + 1}
                if before is not None:
                    after = settled_outcomes(handle, names["on"])
                    extra.update({o: after[o] - before[o] for o in ("hit", "miss", "evicted")})
                mixed.append(row(result, **extra))
                print(f"round {r + 1} cache {kind:>3}: {result.requests_per_s:8.1f} req/s  p50 {result.p50_ms:.2f} ms"
                      f"  p99 {result.p99_ms:.2f} ms  errors {result.errors}"
                      + (f"  hits {extra['hit']:.0f} / misses {extra['miss']:.0f}" if kind == "on" else ""),
                      flush=True)
        repeated = []
        for concurrency in (1, args.concurrency):  # one input again and again: on the cached model, all hits
            for kind in ("off", "on"):
                result = loadgen.run(url[kind], bodies["json"], JSON, concurrency, args.hit_seconds, auth)
                repeated.append(row(result, cache=kind, concurrency=concurrency))
                print(f"one input, c={concurrency:<2} cache {kind:>3}: {result.requests_per_s:8.1f} req/s"
                      f"  p50 {result.p50_ms:.2f} ms", flush=True)
    finally:
        stop(handle.run_dir, quiet=True)
    return {**summarize(args, mixed, repeated), "load_before": load_before}


def summarize(args: argparse.Namespace, mixed: list[dict], repeated: list[dict]) -> dict:
    def median(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in mixed if r["cache"] == kind)

    on = [r for r in mixed if r["cache"] == "on"]
    hit_rate = sum(r["hit"] for r in on) / max(1.0, sum(r["hit"] + r["miss"] for r in on))
    hits = {(r["cache"], r["concurrency"]): r for r in repeated}
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "make bench-cache", "cores": os.cpu_count(),
        "model": f"{MODELS['light'].name} (light, TorchScript), {VARIANT.label}",
        "workload": f"c={args.concurrency}, 50% of requests repeat an earlier input of the run, "
                    f"{args.rounds} interleaved rounds of {args.seconds:g} s per setting",
        "mixed": mixed, "repeated": repeated,
        "requests_per_s": {"off": median("off", "requests_per_s"), "on": median("on", "requests_per_s")},
        "speedup": median("on", "requests_per_s") / median("off", "requests_per_s"),
        "p50_ms": {"off": median("off", "p50_ms"), "on": median("on", "p50_ms")},
        "hit_rate": hit_rate,
        "hit_p50_ms": {f"c={c}": hits[("on", c)]["p50_ms"] for c in (1, args.concurrency)},
        "uncached_same_request_p50_ms": {f"c={c}": hits[("off", c)]["p50_ms"] for c in (1, args.concurrency)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="each mixed run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved off/on pairs")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--hit-seconds", type=float, default=5.0, help="each one-input run (hit latency)")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "cache.json"))
    args = parser.parse_args(argv)
    result = run(args)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    rps = result["requests_per_s"]
    print(f"\nrequests/s at c={args.concurrency}, median of {args.rounds}: cache off {rps['off']:.0f}, "
          f"on {rps['on']:.0f} ({result['speedup']:.2f}x); hit rate {result['hit_rate']:.1%}")
    print("p50 of a hit: " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in result["hit_p50_ms"].items())
          + "  (same request uncached: " + ", ".join(f"{c} {ms:.2f} ms" for c, ms in
                                                   result["uncached_same_request_p50_ms"].items()) + ")")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
