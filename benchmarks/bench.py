"""`make bench`: tspack against the in-process limit, a naive TorchServe, FastAPI and LitServe, in interleaved rounds.

    .venv/bin/python -m benchmarks.bench [--quick] [--only tspack,limit] [--models light] [--duration S]
                                         [--rounds N] [--reruns N]

Per model, two phases. The sweep measures each configuration of tspack and LitServe once, one server at a time, and
keeps each system's best (requests/s at concurrency 32); on the light model `tspack tune` then runs on the default
deployment's spec. The comparison starts the chosen configurations at once (tspack's default deployment, and on the
light model zero-wait, tune's pick and `aoti` beside it; every FastAPI layout), keeps them all up, and measures them
in interleaved rounds (benchmarks/rounds.py): each headline figure is the median of its per-round ratios, with its
spread, and null when a row stayed disturbed by other work after its reruns (benchmarks/ratios.py). Every HTTP
system gets the same request bytes from the same load generator (wrk, benchmarks/loadgen.py) on 127.0.0.1. Writes
benchmarks/results/latest.json, latest.png and the serving section of BENCHMARKS.md (benchmarks/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

from archiver.deploy.properties import entry_from_archive
from archiver.operate import load as loadgen
from archiver.spec import DEFAULT_BATCH_DELAY_MS, DEFAULT_BATCHING
from benchmarks import artifacts, limit, report, systems
from benchmarks.artifacts import MODELS, Body, Variant
from benchmarks.ratios import DEFAULT, TUNED
from benchmarks.rounds import RERUNS, Contender, Rounds

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
SYSTEMS = ("limit", "tspack", "naive", "fastapi", "litserve")
# Every server is warmed the same way before its first measured run: long enough for TorchServe's JVM to compile
# its hot paths, and at the highest concurrency, so every batch shape the runs will see has been run. The JIT
# counts calls, so the time it needs grows as the request rate falls: a 1 s warm-up left the light model at 650
# req/s where a warm frontend serves ~1,000, and at ResNet-18's ~40 req/s the frontend's C2 compiler took 1.9 s
# of CPU in the first 10 s of load, 0.4 s in the next 10 and ~0.3 s after (2.6 ms of frontend CPU per request
# once warm, 9.4 ms in the first 10 s), so TorchServe systems get `jit_warmup_s`. Further bodies of a warm server
# get half.
WARMUP_CONCURRENCY = 32


def default_variant(runtime: str = "torchscript") -> Variant:
    """The serving `tspack build` writes when the spec says nothing of batching (archiver.spec's defaults: batch 8,
    DEFAULT_BATCHING), on 2 workers x 1 thread."""
    if DEFAULT_BATCHING == "zero_wait":
        return Variant(runtime, 2, 1, 8, batching="zero_wait")
    return Variant(runtime, 2, 1, 8, DEFAULT_BATCH_DELAY_MS)


@dataclass
class Settings:
    quick: bool = False
    models: tuple[str, ...] = ("light", "heavy")
    systems: tuple[str, ...] = SYSTEMS
    duration_s: dict = field(default_factory=lambda: {"light": 4.0, "heavy": 5.0})
    warmup_s: dict = field(default_factory=lambda: {"light": 6.0, "heavy": 6.0})
    jit_warmup_s: dict = field(default_factory=lambda: {"light": 6.0, "heavy": 24.0})  # TorchServe's JVM
    rounds: int = 3
    reruns: int = RERUNS
    out_dir: str = os.path.join(BENCH_DIR, "results")
    markdown: str = os.path.join(os.path.dirname(BENCH_DIR), "BENCHMARKS.md")
    work: str = os.path.join(BENCH_DIR, "work", "serving")
    command: str = "make bench"

    def variants(self, key: str) -> list[Variant]:
        """tspack's configurations of the sweep, TorchScript; the first is the quick run's only one."""
        default = default_variant()
        if self.quick:
            return [default]
        if key == "light":
            # Left out as measured slower here: a 5 ms delay, and one 2-thread worker (zero-wait or delay).
            others = [Variant("torchscript", 2, 1, 8, 1), Variant("torchscript", 2, 1, 8, batching="zero_wait")]
            return [default] + [v for v in others if v != default]
        # heavy: two 1-thread workers as FastAPI's best layout runs. Left out, as measured slower here: zero-wait
        # (35-38 against 39-41 req/s with a delay), one 2-thread worker (its OpenMP barriers lose to the frontend's
        # preemptions; the limit's 1p x 2t rows show the layout), and batch 1 (the model's speed per sample is the
        # same at batch 1 and 8 in two 1-thread processes, and the frontend then sends a message per request).
        return [default] + [v for v in (Variant("torchscript", 2, 1, 8, 5),) if v != default]

    def limit_batches(self, key: str) -> tuple[int, ...]:
        if self.quick:
            return (8,)
        return (8, 32) if key == "light" else (1, 8)

    def fastapi_configs(self, key: str) -> list[tuple[int, int, str]]:
        """(uvicorn workers, torch threads, runtime). Light: 1 worker x 2 threads served about half of 2 x 1 in every
        full run, so its place goes to FastAPI serving the AOTInductor package tspack compiled (issue 14: the
        runtime's share of tspack's aoti figure)."""
        if self.quick:
            return [(2, 1, "torchscript")]
        if key == "light":
            return [(2, 1, "torchscript"), (2, 1, "aoti")]
        return [(2, 1, "torchscript"), (1, 2, "torchscript")]

    def litserve_configs(self, key: str) -> list[tuple[int, float, int]]:
        """(max batch, batch timeout s, torch threads); LitServe runs one inference worker. Its 2-thread configs
        served half the 1-thread ones' requests on the light model (2 cores: the API server process needs one)."""
        if key == "heavy":
            return [(8, 0.005, 2)]
        return [(8, 0.005, 1)] if self.quick else [(8, 0.005, 1), (1, 0.0, 1)]

    def on(self, system: str) -> bool:
        return system in self.systems


@dataclass
class Deployment:
    """A system to start, and what to send it: (body, concurrencies every round, concurrencies in round 1 only)."""

    label: dict  # system, model, runtime, config, batch_size
    start: Callable[[], systems.Served]
    loads: list[tuple[Body, tuple, tuple]]
    cold: bool = False  # time start() to the first 200 (the light model's cold start)
    jvm: bool = False  # TorchServe: warmed up for its JIT (Settings.jit_warmup_s)


class Bench:
    """Runs the steps and holds the rows; the rows of a comparison come from servers kept up together."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.cold_start_s: float | None = None  # one light archive, start() to the first 200
        self.cold_start_demo_s: float | None = None  # the demo deployment, `tspack serve start` to the first 200
        self.background = 0.0
        self.tune: dict | None = None  # what `tspack tune` tried and chose (tune_step)
        self.step_seconds: dict[str, float] = {}
        self.ctx: dict = {}
        self.bar = None
        self.rounds = Rounds(self.add, reruns=settings.reruns, say=self.log)
        self.rounds.failures = self.failures

    def log(self, message: str) -> None:
        (self.bar.write if self.bar else print)(message)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        shown = f"c={row['concurrency']}" if row.get("concurrency") else f"batch {row['batch_size']}"
        where = f"{row.get('phase', '')} {row.get('round') or ''}".strip()
        value = row.get("requests_per_s")
        numbers = (f"{value:>9.1f} req/s  p99 {row['p99_ms'] or 0:>8.1f} ms  errors {row['errors']}"
                   if value is not None else f"{row.get('cold_start_s', 0):>6.2f} s  {row.get('peak_rss_mb')} MB")
        body = row.get("body") or "-"
        self.log(f"  {where:<9} {row['system']:<16} {row['model']:<5} {row['runtime']:<11} {body:<10} "
                 f"{row['config']:<34} {shown:<9} {numbers}"
                 + (f"  (other load {row['other_cpu_share']:.0%}, disturbed)" if row.get("disturbed") else ""))

    def fail(self, label: dict, exc: BaseException, what: str = "") -> None:
        self.failures.append({**label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
        self.log(f"  FAILED {what or label.get('system')} {label.get('config', '')}: {exc}")

    # -- opening what a phase measures; everything opened is closed by the caller's ExitStack ----------------

    def open_deployment(self, stack: ExitStack, deployment: Deployment) -> list[Contender]:
        """Start it, warm each body up, and return one contender per body; [] when it does not start."""
        t0 = time.monotonic()
        try:
            served = deployment.start()
        except Exception as exc:  # one system that does not start must not cost the others
            self.fail(deployment.label, exc, "to start")
            return []
        stack.callback(served.stop)
        stack.callback(served.resume)  # first: a paused process group would hold its SIGTERM
        model = deployment.label["model"]
        contenders = []
        try:
            if deployment.cold:
                self.cold_start_s = first_answer(served, deployment.loads[0][0], t0)
                self.log(f"  cold start: {self.cold_start_s:.2f} s from start() to the first 200")
            for index, (body, every, first) in enumerate(deployment.loads):
                warmup = (self.settings.jit_warmup_s if deployment.jvm else self.settings.warmup_s)[model]
                warmup /= 1 if index == 0 else 2
                loadgen.run(served.url_for(body.protocol), body.file, body.content_type, WARMUP_CONCURRENCY, warmup,
                            served.authorization, headers=dict(body.headers))
                drain(served, body)
                contenders.append(Contender({**deployment.label, "body": body.kind},
                                            http_measure(served, body, self.settings.duration_s[model]), every,
                                            first, served.pause, served.resume))
        except Exception as exc:
            self.fail(deployment.label, exc)
        return contenders

    def open_limits(self, stack: ExitStack, key: str, runtime: str, setups: list[tuple]) -> list[Contender]:
        """In-process contenders: `setups` are (layout, kind, batch); one pool of children per layout."""
        ctx = self.ctx[key]
        mar = ctx["mars"].get(runtime)
        if mar is None:  # its build failed, and said so
            return []
        pools: dict = {}
        contenders = []
        seconds = self.settings.duration_s[key] / 2
        for layout, kind, batch in setups:
            if layout not in pools:
                try:
                    pools[layout] = stack.enter_context(limit.LimitPool(mar, layout))
                except Exception as exc:
                    self.fail(label("limit", key, runtime, layout.label, batch), exc)
                    pools[layout] = None
            if pools[layout] is None:
                continue
            body = ctx["bodies"][ctx["limit_body"]] if kind == "decode" else None
            config = f"in-process, {layout.label}, {limit.KIND_LABELS[kind]}"
            contenders.append(Contender({**label("limit", key, runtime, config, batch),
                                         "body": body.kind if body else None},
                                        limit_measure(pools[layout], kind, batch, body, seconds), (None,)))
        return contenders

    def run(self, steps: list[Step]) -> dict:
        from tqdm import tqdm

        started = time.monotonic()
        self.background = systems.background_share()
        if self.background > 0.1:
            self.log(f"warning: {self.background:.0%} of the CPU is busy with other work before the benchmark starts; "
                     "rows measured while it lasts are rerun, and figures built on rows it still disturbs are null")
        self.bar = tqdm(total=len(steps), desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True)
        for step in steps:
            self.bar.set_postfix_str(step.name)
            step_started = time.monotonic()
            try:
                step.run(self)
            except Exception as exc:  # a failed build or limit costs its own rows, not the run
                self.fail({"system": step.name, "config": ""}, exc)
            self.step_seconds[step.name] = round(time.monotonic() - step_started, 1)
            self.bar.update(1)
        self.bar.close()
        self.bar = None
        demo = self.cold_start_demo_s is not None
        return {"rows": self.rows, "failures": self.failures,
                "cold_start_s": self.cold_start_demo_s if demo else self.cold_start_s,
                "cold_start_light_s": self.cold_start_s,
                "cold_start_of": ("the demo deployment (digits 1.0 + image ONNX + image int8), `tspack serve start` "
                                  "to the first 200" if demo else "one light archive, server start to the first 200"),
                "elapsed_s": round(time.monotonic() - started, 1), "background_at_start": self.background,
                "rounds": self.settings.rounds, "reruns": self.settings.reruns,
                "step_seconds": self.step_seconds, "tune": self.tune}


@dataclass
class Step:
    name: str
    run: Callable[[Bench], None]


def http_measure(served: systems.Served, body: Body, duration_s: float) -> Callable[[int | None], dict]:
    """One measured wrk run at a concurrency, after the requests a previous run left queued are answered."""

    def measure(concurrency: int | None) -> dict:
        drain(served, body)
        with systems.RssPeak(served.pid) as rss, systems.CpuWatch(served.pid) as cpu:
            result = loadgen.run(served.url_for(body.protocol), body.file, body.content_type, concurrency, duration_s,
                                 served.authorization, headers=dict(body.headers))
            cpu.excluded_cpu_s = result.loadgen_cpu_s
        # what wrk left queued runs now, not in the next system's turn (where it would count as other work)
        status = drain(served, body)
        answered = max(1, result.requests)
        # a row with errors says what one more request got, so a reader can tell refusals from broken answers
        errors = {"status_after": status} if result.errors else {}
        return {**result.as_dict(), **errors, "peak_rss_mb": rss.peak_mb, "server_cpu_share": cpu.tree_share,
                "other_cpu_share": cpu.other_share,
                **{f"{role}_cpu_ms_per_request": round(seconds * 1000.0 / answered, 3)
                   for role, seconds in cpu.cpu_s_by_role.items()}}

    return measure


def limit_measure(pool: limit.LimitPool, kind: str, batch: int, body: Body | None,
                  seconds: float) -> Callable[[int | None], dict]:
    def measure(_: int | None) -> dict:
        # only the limit's children: the servers a comparison keeps up are children of this process too
        with systems.RssPeak(os.getpid(), match=limit.CHILD) as rss, \
                systems.CpuWatch(os.getpid(), match=limit.CHILD) as cpu:
            numbers = pool.measure(kind, batch, seconds, body.file if body else None,
                                   body.content_type if body else "")
        return {**numbers, "peak_rss_mb": rss.peak_mb, "loadgen_cpu_share": None, "server_cpu_share": cpu.tree_share,
                "other_cpu_share": cpu.other_share}

    return measure


def drain(served: systems.Served, body: Body, timeout_s: float = 300) -> int:
    """Wait until the requests a previous wrk run left queued are answered: one request queues behind them.
    Returns its HTTP status (0: no answer)."""
    with open(body.file, "rb") as f:
        return systems.http_status(served.url_for(body.protocol), f.read(), body.content_type, served.authorization,
                                   timeout=timeout_s, extra_headers=dict(body.headers))


def first_answer(served: systems.Served, body: Body, t0: float, timeout_s: float = 120) -> float:
    """Seconds from `t0` (just before start()) to the first 200 answer."""
    with open(body.file, "rb") as f:
        data = f.read()
    while time.monotonic() - t0 < timeout_s:
        if systems.http_status(served.url_for(body.protocol), data, body.content_type, served.authorization,
                               extra_headers=dict(body.headers)) == 200:
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)
    raise RuntimeError(f"no 200 answer within {timeout_s:.0f}s of start()")


def label(system: str, model: str, runtime: str, config: str, batch_size: int) -> dict:
    return {"system": system, "model": model, "runtime": runtime, "config": config, "batch_size": batch_size}


# -- deployments ----------------------------------------------------------------------------------------------


def tspack_deployment(bench: Bench, key: str, variant: Variant, loads: list[tuple[str, tuple, tuple]],
                      cold: bool = False, tuned: bool = False, default: bool = False) -> Deployment:
    """tspack serving one archive (built on first use); `loads` are (body kind, every round, round 1 only).
    `tuned`: the configuration `tspack tune` chose, labelled as such and served from a folder of its own (it may
    equal another deployment of the same rounds). `default`: labelled as the deployment `tspack build` writes."""
    ctx = bench.ctx[key]
    name = variant.archive_name(MODELS[key])

    def start() -> systems.Served:
        artifacts.build_tspack(MODELS[key], [variant], bench.settings.work, ctx["store"])
        # workers and batching as `tspack config --load` reads them from the archive (zero-wait: batchSize 1)
        entry = entry_from_archive(f"{name}_v1.0.mar", os.path.abspath(ctx["store"]))
        folder = os.path.join(bench.settings.work, "servers", name + ("-tuned" if tuned else ""))
        return systems.start_tspack(folder, ctx["store"], entry)

    config = variant.label + (TUNED if tuned else "") + (DEFAULT if default else "")
    return Deployment(label("tspack", key, variant.runtime, config, variant.batch_size), start,
                      [(ctx["bodies"][kind], every, first) for kind, every, first in loads], cold, jvm=True)


def naive_deployment(bench: Bench, key: str, concurrencies: tuple) -> Deployment:
    ctx = bench.ctx[key]

    def start() -> systems.Served:
        name = artifacts.build_naive(MODELS[key], bench.settings.work, ctx["store"])
        return systems.start_naive(os.path.join(bench.settings.work, "servers", name), ctx["store"], name)

    config = f"TorchServe defaults: {os.cpu_count()}w, batch 1"
    return Deployment(label("naive-torchserve", key, "torchscript", config, 1), start,
                      [(ctx["bodies"]["json"], concurrencies, ())], jvm=True)


def peer_env(key: str, threads: int) -> dict:
    model = MODELS[key]
    return {"BENCH_THREADS": str(threads), "BENCH_SHAPE": json.dumps(list(model.shape)),
            "BENCH_TOP_K": str(model.top_k), "BENCH_LABELS": json.dumps(list(model.labels))}


def fastapi_config(workers: int, threads: int) -> str:
    return f"{workers} uvicorn workers x {threads}t"


def litserve_config(max_batch: int, timeout_s: float, threads: int) -> str:
    batching = f"batch {max_batch}/{timeout_s * 1000:g}ms" if max_batch > 1 else "no batching"
    return f"{batching}, 1 worker x {threads}t"


def fastapi_deployment(bench: Bench, key: str, workers: int, threads: int, runtime: str,
                       loads: list[tuple[str, tuple, tuple]]) -> Deployment:
    """FastAPI on the TorchScript file, or (runtime "aoti") on the package compiled for tspack's default as aoti."""
    ctx = bench.ctx[key]
    log = os.path.join(bench.settings.work, "servers", f"fastapi-{key}-{runtime}-{workers}w{threads}t.log")

    def start() -> systems.Served:
        model = ctx["torchscript"] if runtime == "torchscript" else artifacts.aoti_package(
            MODELS[key], default_variant(runtime), bench.settings.work, ctx["store"])
        env = {**peer_env(key, threads), "BENCH_MODEL": model}
        return systems.start_peer("fastapi", bench.ctx["python"], [str(workers)], env, log)

    return Deployment(label("fastapi", key, runtime, fastapi_config(workers, threads), 1), start,
                      [(ctx["bodies"][kind], every, first) for kind, every, first in loads])


def litserve_deployment(bench: Bench, key: str, max_batch: int, timeout_s: float, threads: int,
                        loads: list[tuple[str, tuple, tuple]]) -> Deployment:
    """LitServe parses every body as JSON before decode_request sees it, so it takes the JSON bodies only."""
    ctx = bench.ctx[key]
    env = {**peer_env(key, threads), "BENCH_MODEL": ctx["torchscript"]}
    log = os.path.join(bench.settings.work, "servers", f"litserve-{key}-b{max_batch}-t{threads}.log")
    return Deployment(label("litserve", key, "torchscript", litserve_config(max_batch, timeout_s, threads), max_batch),
                      lambda: systems.start_peer("litserve", bench.ctx["python"], [str(max_batch), str(timeout_s)],
                                                 env, log),
                      [(ctx["bodies"][kind], every, first) for kind, every, first in loads])


# -- steps ------------------------------------------------------------------------------------------------------


def prepare(key: str) -> Step:
    """Request bodies, the TorchScript file the peers load, and the sweep's archives (one build)."""

    def run(bench: Bench) -> None:
        s, model = bench.settings, MODELS[key]
        store = os.path.join(s.work, "store")
        ctx = bench.ctx[key] = {"bodies": artifacts.request_bodies(model, s.work), "store": store, "mars": {},
                                "torchscript": artifacts.torchscript(model, s.work),
                                "limit_body": "json" if key == "light" else "npy"}
        variants = s.variants(key)
        first, rest = variants[0], variants[1:] + [Variant(r, 1, 2, 8, 5) for r in runtimes(s, key)[1:]]
        artifacts.build_tspack(model, [first], s.work, store)
        for variant in rest:  # a configuration or runtime that fails to build costs its own rows only
            try:
                artifacts.build_tspack(model, [variant], s.work, store)
            except Exception as exc:
                bench.fail(label("tspack", key, variant.runtime, variant.label, variant.batch_size), exc, "to build")
        for variant in [first, *rest]:
            mar = os.path.join(store, f"{variant.archive_name(model)}_v1.0.mar")
            if os.path.exists(mar):
                ctx["mars"].setdefault(variant.runtime, mar)

    return Step(f"build {key}", run)


def runtimes(s: Settings, key: str) -> tuple[str, ...]:
    """The runtimes of the sweep and the limit: TorchScript first (the one every system runs)."""
    if s.quick or key == "light":
        return ("torchscript",)
    return ("torchscript", "onnx-int8")  # ONNX fp32 served no faster than TorchScript here (38 vs 39 req/s)


def limit_sweep(key: str) -> Step:
    """The limit in every layout and batch, model alone and decode + model (TorchScript; the other runtimes of the
    heavy model: model alone only, for their own ratio)."""

    def run(bench: Bench) -> None:
        s = bench.settings
        for runtime in runtimes(s, key):
            kinds = limit.KINDS if runtime == "torchscript" else ("model",)
            batches = s.limit_batches(key) if runtime == "torchscript" else (8,)
            setups = [(layout, kind, batch) for layout in limit.layouts() for kind in kinds for batch in batches]
            with ExitStack() as stack:
                contenders = bench.open_limits(stack, key, runtime, setups)
                bench.rounds.run(contenders, 1, f"{key} sweep", phase="sweep")

    return Step(f"limit {key}", run)


def sweep(key: str) -> Step:
    """Each configuration of each system once, one server at a time."""

    def run(bench: Bench) -> None:
        s = bench.settings
        for deployment in sweep_deployments(bench, key):
            with ExitStack() as stack:
                bench.rounds.run(bench.open_deployment(stack, deployment), 1, f"{key} sweep", phase="sweep")
        if s.on("tspack") and key == "light":
            # The c=1 floor without batching: TorchServe 0.12 cannot batch without a wait of >= 1 ms (a maxBatchDelay
            # of 0 falls back to its 100 ms default), so this row shows what zero-wait and a wait cost a lone client.
            unbatched = tspack_deployment(bench, key, Variant("torchscript", 1, 1, 1, 0), [("json", (1,), ())])
            with ExitStack() as stack:
                bench.rounds.run(bench.open_deployment(stack, unbatched), 1, f"{key} sweep", phase="sweep")

    return Step(f"sweep {key}", run)


def sweep_deployments(bench: Bench, key: str) -> list[Deployment]:
    s = bench.settings
    body = "json" if key == "light" else "npy"
    found = []
    if s.on("tspack"):
        c1 = (1,) if key == "light" else ()  # the light model's c=1 p50 of every batching configuration
        found += [tspack_deployment(bench, key, v, [(body, (32, *c1), ())]) for v in s.variants(key)]
        found += [tspack_deployment(bench, key, Variant(r, 1, 2, 8, 5), [("npy", (32,), ())])
                  for r in runtimes(s, key)[1:]]
    if s.on("litserve") and key == "light":
        found += [litserve_deployment(bench, key, b, t, n, [("json", (32,), ())])
                  for b, t, n in s.litserve_configs(key)]
    return found


def best_config(bench: Bench, system: str, key: str, runtime: str = "torchscript", body: str | None = None,
                phase: str = "sweep") -> str | None:
    """The config label of the system's most requests/s at c=32 in the sweep (None when it has no row)."""
    body = body or ("json" if key == "light" else "npy")
    rows = [r for r in bench.rows if r.get("phase") == phase and r["system"] == system and r["model"] == key
            and r["runtime"] == runtime and r.get("body") == body and r.get("concurrency") == 32]
    return max(rows, key=lambda r: r["requests_per_s"])["config"] if rows else None


def chosen_variant(bench: Bench, key: str) -> Variant:
    """The sweep's best tspack configuration (the first one when the sweep did not run)."""
    variants = {v.label: v for v in bench.settings.variants(key)}
    rows = [r for r in bench.rows if r.get("phase") == "sweep" and r["system"] == "tspack" and r["model"] == key
            and r["runtime"] == "torchscript" and r.get("concurrency") == 32 and r["config"] in variants]
    best = max(rows, key=lambda r: r["requests_per_s"])["config"] if rows else None
    return variants.get(best, next(iter(variants.values())))


def chosen_limits(bench: Bench, key: str) -> list[tuple]:
    """(layout, kind, batch) of the best limit per kind in the sweep; all of them when there was no sweep."""
    rows = [r for r in bench.rows if r.get("phase") == "sweep" and r["system"] == "limit" and r["model"] == key
            and r["runtime"] == "torchscript"]
    chosen = []
    for kind in limit.KINDS:
        mine = [r for r in rows if r["config"].endswith(limit.KIND_LABELS[kind])]
        if mine:
            best = max(mine, key=lambda r: r["requests_per_s"])
            layout = next(x for x in limit.layouts() if f", {x.label}, " in best["config"])
            chosen.append((layout, kind, best["batch_size"]))
    return chosen


def comparison(key: str) -> Step:
    """Every system's best configuration up at once, measured in interleaved rounds."""

    def run(bench: Bench) -> None:
        s = bench.settings
        with ExitStack() as stack:
            contenders = []
            if s.on("limit"):
                contenders += bench.open_limits(stack, key, "torchscript", chosen_limits(bench, key))
            for deployment in comparison_deployments(bench, key):
                contenders += bench.open_deployment(stack, deployment)
            bench.rounds.run(contenders, s.rounds, key)

    return Step(f"compare {key}", run)


def comparison_deployments(bench: Bench, key: str) -> list[Deployment]:
    s = bench.settings
    found = []
    litserve = {litserve_config(*config): config for config in s.litserve_configs(key)}
    if s.on("tspack"):
        if key == "light":
            # The deployment `tspack build` writes by default, whatever won the sweep (issue 14), with every body;
            # beside it zero-wait batching, what `tspack tune` chose, and the default as aoti, in the same rounds.
            default = s.variants(key)[0]
            found.append(tspack_deployment(bench, key, default, [("json", (32, 1), ()), ("npy", (32,), ()),
                                                                 ("oip-json", (32,), ()), ("oip-binary", (32,), ())],
                                           cold=True, default=True))
            zero_wait = next((v for v in s.variants(key) if v.batching == "zero_wait" and v != default), None)
            if zero_wait is not None:
                found.append(tspack_deployment(bench, key, zero_wait, [("json", (32, 1), ())]))
            tuned = bench.ctx[key].get("tuned")
            if tuned is not None:  # issue 14: what `tspack tune` chose, beside the default
                found.append(tspack_deployment(bench, key, tuned, [("json", (32,), (1,))], tuned=True))
            if not s.quick:  # issue 12: the same deployment with format aoti (compiled once, then cached)
                found.append(tspack_deployment(bench, key, replace(default, runtime="aoti"),
                                               [("json", (32,), (1,))], default=True))
        else:  # heavy: the sweep's best configuration
            found.append(tspack_deployment(bench, key, chosen_variant(bench, key),
                                           [("npy", (32,), (1,)), ("json", (32,), (1,))]))
    if s.on("fastapi"):
        # Every FastAPI layout in every round, so each round's FastAPI figure is its best layout of that round (a
        # sweep picked one layout from a single run, and 2 uvicorn workers swing with how the kernel spreads the
        # connections). The first gets every body and c=1 too.
        bodies = [("json", (32,), (1,))] if key == "light" else [("npy", (32,), (1,)), ("json", (32,), (1,))]
        for index, (w, t, runtime) in enumerate(s.fastapi_configs(key)):
            found.append(fastapi_deployment(bench, key, w, t, runtime, bodies if index == 0 else bodies[:1]))
    if s.on("litserve"):
        b, t, n = litserve.get(best_config(bench, "litserve", key) or "", s.litserve_configs(key)[0])
        found.append(litserve_deployment(bench, key, b, t, n, [("json", (32,), (1,))]))
    if s.on("naive"):
        found.append(naive_deployment(bench, key, (32,)))
    return found


def cold_start_measure(served: systems.Served, mar: str, body: Body) -> Callable[[int | None], dict]:
    from benchmarks.cold_start import worker_cold_start

    return lambda _: worker_cold_start(served, mar, body)


def worker_cold_start_step(key: str = "light") -> Step:
    """Issue 12: one worker of the chosen light deployment registered (to READY) as torchscript and as aoti, in
    alternating rounds, with the worker process's peak RSS over registering and 2 s of load."""

    def run(bench: Bench) -> None:
        s, ctx = bench.settings, bench.ctx[key]
        best = chosen_variant(bench, key)
        variants = [replace(best, runtime=r, workers=1) for r in ("torchscript", "aoti")]
        artifacts.build_tspack(MODELS[key], variants, s.work, ctx["store"])
        folder = os.path.join(s.work, "servers", "worker-cold-start")
        served = systems.start_tspack(folder, ctx["store"], None, model_api=True)
        try:
            contenders = [Contender({**label("tspack", key, v.runtime, f"{v.label}, register 1 worker", v.batch_size),
                                     "body": None},
                                    cold_start_measure(served, f"{v.archive_name(MODELS[key])}_v1.0.mar",
                                                       ctx["bodies"]["json"]), (None,))
                          for v in variants]
            bench.rounds.run(contenders, s.rounds, "cold", phase="cold")
        finally:
            served.stop()

    return Step("worker cold start", run)


TUNE_BUDGET_S = 60.0


def tune_step(key: str = "light") -> Step:
    """Issue 14: `tspack tune` on the spec of the default deployment (SLO p99 50 ms, 1 and 32 clients, TUNE_BUDGET_S
    seconds); the configuration it chose joins the comparison's rounds beside the default."""

    def run(bench: Bench) -> None:
        import yaml

        from archiver.operate.tune.search import TuneSettings
        from archiver.operate.tune.session import tune

        s, ctx, model = bench.settings, bench.ctx[key], MODELS[key]
        default = s.variants(key)[0]
        folder = os.path.join(s.work, "tune")
        os.makedirs(folder, exist_ok=True)
        spec_path = os.path.join(folder, f"{model.name}.yaml")
        spec = {"models": [artifacts.model_spec(model, default, artifacts.weights(model, s.work))],
                "model_store": os.path.abspath(ctx["store"])}
        with open(spec_path, "w", encoding="utf-8") as f:
            yaml.safe_dump(spec, f, sort_keys=False)
        result = tune(TuneSettings(spec_path, default.archive_name(model), concurrency=(1, 32),
                                   budget_s=TUNE_BUDGET_S, duration_s=3.0, report_dir=os.path.join(folder, "report"),
                                   progress=False))
        bench.tune = {"budget_s": TUNE_BUDGET_S, "slo_p99_ms": 50.0, "concurrency": [1, 32],
                      "trials": len(result.trials), "verdict": result.verdict,
                      "winner": result.winner.config.describe() if result.winner else None}
        bench.log(f"  tspack tune, {len(result.trials)} configurations in {TUNE_BUDGET_S:.0f} s: {result.verdict}")
        if result.winner is not None:
            ctx["tuned"] = tuned_variant(default.runtime, result.winner.config)

    return Step(f"tune {key}", run)


def tuned_variant(runtime: str, config) -> Variant:
    """The bench's Variant of a `tspack tune` configuration (archiver.operate.tune.space.Config)."""
    if config.batch_size == 1:
        return Variant(runtime, config.workers, config.threads, 1, 0)
    if config.batching == "zero_wait":
        return Variant(runtime, config.workers, config.threads, config.batch_size, batching="zero_wait")
    return Variant(runtime, config.workers, config.threads, config.batch_size, config.delay_ms)


def demo_cold_start_step() -> Step:
    def run(bench: Bench) -> None:
        from benchmarks.cold_start import demo_cold_start

        bench.cold_start_demo_s = demo_cold_start(bench.settings.work)
        bench.log(f"  cold start of the demo deployment: {bench.cold_start_demo_s:.2f} s from `tspack serve start` "
                  "to the first 200")

    return Step("cold start: demo deployment", run)


def peers_env_step() -> Step:
    def run(bench: Bench) -> None:
        from benchmarks.peers import env

        bench.ctx["python"] = env.ensure()

    return Step("peers' venv", run)


def plan(s: Settings) -> list[Step]:
    steps = [peers_env_step()] if s.on("fastapi") or s.on("litserve") else []
    for key in s.models:
        steps.append(prepare(key))
        if s.on("limit"):
            steps.append(limit_sweep(key))
        if not s.quick:
            steps.append(sweep(key))
            if key == "light" and s.on("tspack"):
                steps.append(tune_step(key))
        steps.append(comparison(key))
    if s.on("tspack") and not s.quick:
        if "light" in s.models:
            steps.append(worker_cold_start_step())
        steps.append(demo_cold_start_step())
    return steps


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="light model only, one configuration per system, 2 shorter rounds (~2-3 min)")
    parser.add_argument("--only", help=f"comma-separated systems among {','.join(SYSTEMS)}")
    parser.add_argument("--models", help="comma-separated: light,heavy")
    parser.add_argument("--duration", type=float, help="seconds per measured load run (all models)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds per comparison (default 3; --quick 2)")
    parser.add_argument("--reruns", type=int, help=f"reruns of a row disturbed by other work (default {RERUNS})")
    parser.add_argument("--out", help="folder for latest.json and latest.png (default benchmarks/results)")
    parser.add_argument("--markdown", help="Markdown file whose serving section is rewritten (default BENCHMARKS.md)")
    parser.add_argument("--work", help="scratch folder for archives and server runs (default benchmarks/work/serving)")
    args = parser.parse_args(argv)
    s = Settings(quick=args.quick)
    if args.quick:
        s = replace(s, models=("light",), duration_s={"light": 3.0, "heavy": 5.0},
                    warmup_s={"light": 3.0, "heavy": 3.0}, jit_warmup_s={"light": 3.0, "heavy": 12.0}, rounds=2,
                    command="make bench QUICK=1")
    if args.only:
        s = replace(s, systems=tuple(x.strip() for x in args.only.split(",") if x.strip()))
    if args.models:
        s = replace(s, models=tuple(x.strip() for x in args.models.split(",") if x.strip()))
    if args.duration:
        s = replace(s, duration_s={k: args.duration for k in s.duration_s},
                    warmup_s={k: min(v, args.duration) for k, v in s.warmup_s.items()},
                    jit_warmup_s={k: min(v, args.duration) for k, v in s.jit_warmup_s.items()})
    if args.rounds:
        s = replace(s, rounds=max(1, args.rounds))
    if args.reruns is not None:
        s = replace(s, reruns=max(0, args.reruns))
    return replace(s, out_dir=args.out or s.out_dir, markdown=args.markdown or s.markdown, work=args.work or s.work)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    unknown = set(s.systems) - set(SYSTEMS) or set(s.models) - set(MODELS)
    if unknown:
        print(f"unknown: {sorted(unknown)}", file=sys.stderr)
        return 2
    loadgen.ensure_wrk()
    shutil.rmtree(os.path.join(s.work, "store"), ignore_errors=True)  # archives carry handlers/: rebuild each run
    results = Bench(s).run(plan(s))
    paths = report.write_all(results, s)
    print(report.summary(results, paths))
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
