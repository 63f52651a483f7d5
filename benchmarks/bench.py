"""`make bench`: measure, in one run, the limit, tspack, a naive TorchServe, FastAPI and LitServe.

    .venv/bin/python -m benchmarks.bench [--quick] [--only tspack,limit] [--models light] [--duration S]

Every HTTP system gets the same request bytes from the same load generator (wrk, benchmarks/loadgen.py)
on 127.0.0.1, one system at a time. Each system is tried in a few configurations; each configuration is
a row per concurrency, and the best one (requests/s at concurrency 32) is marked. Writes
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
from dataclasses import dataclass, field, replace

if __package__ in (None, ""):  # run as `python benchmarks/bench.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.deploy.properties import ModelEntry  # noqa: E402
from benchmarks import artifacts, limit, loadgen, report, systems  # noqa: E402
from benchmarks.artifacts import MODELS, Variant  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
JSON, NPY = "application/json", "application/octet-stream"
SYSTEMS = ("limit", "tspack", "naive", "fastapi", "litserve")
# Every system is warmed the same way before its first measured run: long enough for TorchServe's JVM to
# compile its hot paths (a 1 s warm-up left tspack at 650 req/s where a warm frontend serves ~1,000), and at
# the highest concurrency, so every batch shape the runs will see has been run.
WARMUP_CONCURRENCY = 32


@dataclass
class Settings:
    quick: bool = False
    models: tuple[str, ...] = ("light", "heavy")
    systems: tuple[str, ...] = SYSTEMS
    duration_s: dict = field(default_factory=lambda: {"light": 4.0, "heavy": 8.0})
    warmup_s: float = 6.0
    concurrencies: tuple[int, ...] = (1, 8, 32)
    out_dir: str = os.path.join(BENCH_DIR, "results")
    markdown: str = os.path.join(os.path.dirname(BENCH_DIR), "BENCHMARKS.md")
    work: str = os.path.join(BENCH_DIR, "work", "serving")
    command: str = "make bench"

    def light_variants(self) -> list[Variant]:
        if self.quick:
            return [Variant("torchscript", 2, 1, 8, 1)]
        return [Variant("torchscript", 1, 2, 8, 1)] + [Variant("torchscript", 2, 1, 8, d) for d in (1, 2, 5)]

    def fastapi_configs(self) -> list[tuple[int, int]]:
        return [(2, 1)] if self.quick else [(1, 2), (2, 1)]

    def litserve_configs(self) -> list[tuple[int, float, int]]:
        return [(8, 0.005, 2)] if self.quick else [(b, t, n) for b, t in ((1, 0.0), (8, 0.005)) for n in (1, 2)]


@dataclass
class Step:
    name: str
    run: Callable[[Bench], None]


class Bench:
    """Runs the steps, holds the rows; one server at a time, always stopped before the next starts."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.rows: list[dict] = []
        self.failures: list[dict] = []
        self.cold_start_s: float | None = None  # one light archive, start() to the first 200
        self.cold_start_demo_s: float | None = None  # the demo deployment, `tspack serve start` to the first 200
        self.background = 0.0
        self.ctx: dict = {}
        self.bar = None

    def log(self, message: str) -> None:
        (self.bar.write if self.bar else print)(message)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        shown = f"c={row['concurrency']}" if row.get("concurrency") else f"in-process batch {row['batch_size']}"
        self.log(f"  {row['system']:<16} {row['model']:<5} {row['runtime']:<11} {row['config']:<30} {shown:<18} "
                 f"{row['requests_per_s']:>9.1f} req/s  p99 {row['p99_ms'] or 0:>8.1f} ms  errors {row['errors']}"
                 + (f"  (other load {row['other_cpu_share']:.0%})" if row.get("other_cpu_share", 0) > 0.1 else ""))

    def load(self, served: systems.Served, label: dict, body: str, content_type: str,
             concurrencies: tuple[int, ...]) -> None:
        """One warm-up per body format, then a measured run per concurrency, each after the queue drained."""
        duration = self.settings.duration_s[label["model"]]
        loadgen.run(served.url, body, content_type, WARMUP_CONCURRENCY, self.settings.warmup_s, served.authorization)
        for c in concurrencies:
            drain(served, body, content_type)
            with systems.RssPeak(served.pid) as rss, systems.CpuWatch(served.pid) as cpu:
                result = loadgen.run(served.url, body, content_type, c, duration, served.authorization)
                cpu.excluded_cpu_s = result.loadgen_cpu_s
            self.add({**label, "body": os.path.splitext(body)[1][1:], "concurrency": c, **result.as_dict(),
                      "peak_rss_mb": rss.peak_mb, "server_cpu_share": cpu.tree_share,
                      "other_cpu_share": cpu.other_share})

    def serve(self, start: Callable[[], systems.Served], label: dict, loads: list[tuple[str, str, tuple]],
              cold: bool = False) -> None:
        """Start a system, run each (body, content type, concurrencies) load against it, stop it."""
        t0 = time.monotonic()
        try:
            served = start()
        except Exception as exc:  # one system that does not start must not cost the others
            self.failures.append({**label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            self.log(f"  FAILED to start {label['system']} {label['config']}: {exc}")
            return
        try:
            if cold:
                self.cold_start_s = first_answer(served, loads[0][0], loads[0][1], t0)
                self.log(f"  cold start: {self.cold_start_s:.2f} s from start() to the first 200")
            for body, content_type, concurrencies in loads:
                self.load(served, label, body, content_type, concurrencies)
        except Exception as exc:
            self.failures.append({**label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            self.log(f"  FAILED {label['system']} {label['config']}: {exc}")
        finally:
            served.stop()

    def run(self, steps: list[Step]) -> dict:
        from tqdm import tqdm

        started = time.monotonic()
        self.background = systems.background_share()
        if self.background > 0.1:
            self.log(f"warning: {self.background:.0%} of the CPU is busy with other work before the benchmark starts; "
                     "numbers will be low and noisy")
        self.bar = tqdm(total=len(steps), desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True)
        for step in steps:
            self.bar.set_postfix_str(step.name)
            try:
                step.run(self)
            except Exception as exc:  # a failed build or limit costs its own rows, not the run
                error = f"{type(exc).__name__}: {exc}"[:2000]
                self.failures.append({"system": step.name, "config": "", "error": error})
                self.log(f"  FAILED {step.name}: {exc}")
            self.bar.update(1)
        self.bar.close()
        self.bar = None
        demo = self.cold_start_demo_s is not None
        return {"rows": self.rows, "failures": self.failures,
                "cold_start_s": self.cold_start_demo_s if demo else self.cold_start_s,
                "cold_start_light_s": self.cold_start_s,
                "cold_start_of": ("the demo deployment (digits 1.0 + image ONNX + image int8), `tspack serve start` "
                                  "to the first 200" if demo else "one light archive, server start to the first 200"),
                "elapsed_s": round(time.monotonic() - started, 1), "background_at_start": self.background}


def drain(served: systems.Served, body_file: str, content_type: str, timeout_s: float = 300) -> None:
    """Wait until the requests a previous wrk run left queued are answered: one request queues behind them."""
    with open(body_file, "rb") as f:
        systems.http_status(served.url, f.read(), content_type, served.authorization, timeout=timeout_s)


def first_answer(served: systems.Served, body_file: str, content_type: str, t0: float, timeout_s: float = 120) -> float:
    """Seconds from `t0` (just before start()) to the first 200 prediction."""
    with open(body_file, "rb") as f:
        body = f.read()
    while time.monotonic() - t0 < timeout_s:
        if systems.http_status(served.url, body, content_type, served.authorization) == 200:
            return round(time.monotonic() - t0, 3)
        time.sleep(0.05)
    raise RuntimeError(f"no 200 prediction within {timeout_s:.0f}s of start()")


def label(system: str, model: str, runtime: str, config: str, batch_size: int) -> dict:
    return {"system": system, "model": model, "runtime": runtime, "config": config, "batch_size": batch_size}


# -- steps ---------------------------------------------------------------------------------------------


def prepare(key: str, variants: list[Variant]) -> Step:
    def run(bench: Bench) -> None:
        model, work = MODELS[key], bench.settings.work
        store = os.path.join(work, "store")
        ctx = {"bodies": artifacts.bodies(model, work), "torchscript": artifacts.torchscript(model, work),
               "store": store, "names": artifacts.build_tspack(model, variants, work, store)}
        if "naive" in bench.settings.systems:
            ctx["naive"] = artifacts.build_naive(model, work, store)
        bench.ctx[key] = ctx

    return Step(f"build {key}", run)


def limit_step(key: str, runtime: str, batches: tuple[int, ...], threads: int) -> Step:
    def run(bench: Bench) -> None:
        model, ctx = MODELS[key], bench.ctx[key]
        variant = Variant(runtime, 1, threads, 8, 5)
        name = artifacts.build_tspack(model, [variant], bench.settings.work, ctx["store"])[variant]
        mar = os.path.join(ctx["store"], f"{name}_v1.0.mar")
        for batch in batches:
            with systems.RssPeak(os.getpid()) as rss, systems.CpuWatch(os.getpid()) as cpu:
                numbers = limit.measure(mar, batch, threads, bench.settings.duration_s[key] / 2)
            config = f"in-process, {numbers.pop('threads')} threads"
            bench.add({**label("limit", key, runtime, config, batch), "body": None, "concurrency": None, **numbers,
                       "peak_rss_mb": rss.peak_mb, "loadgen_cpu_share": None, "server_cpu_share": cpu.tree_share,
                       "other_cpu_share": cpu.other_share})

    return Step(f"limit {key} {runtime}", run)


def tspack_step(key: str, variant: Variant | Callable[[Bench], Variant], loads: list[tuple[str, tuple]],
                cold: bool = False) -> Step:
    """tspack serving one archive; `loads` are (body kind, concurrencies) run against the same server."""

    def run(bench: Bench) -> None:
        v = variant(bench) if callable(variant) else variant
        model, ctx = MODELS[key], bench.ctx[key]
        name = artifacts.build_tspack(model, [v], bench.settings.work, ctx["store"])[v]
        entry = ModelEntry(name=name, version="1.0", mar=f"{name}_v1.0.mar", workers=v.workers,
                                   batch_size=v.batch_size, max_batch_delay_ms=v.delay_ms)
        folder = os.path.join(bench.settings.work, "servers", name)
        bodies = [(ctx["bodies"][kind], JSON if kind == "json" else NPY, cs) for kind, cs in loads]
        bench.serve(lambda: systems.start_tspack(folder, ctx["store"], entry),
                    label("tspack", key, v.runtime, v.label, v.batch_size), bodies, cold=cold)

    shown = variant.label if isinstance(variant, Variant) else "best config"
    return Step(f"tspack {key} {shown}", run)


def unbatched_variants() -> list[Variant]:
    return [Variant(runtime, 1, 1, 1, 0) for runtime in ("torchscript", "onnx")]


def best_light_variant(runtime: str) -> Callable[[Bench], Variant]:
    def pick(bench: Bench) -> Variant:
        best = report.best_row(bench.rows, "tspack", "light", "torchscript", "json")
        variants = {v.label: v for v in bench.settings.light_variants()}
        chosen = variants.get(best["config"]) if best else None
        return replace(chosen or bench.settings.light_variants()[0], runtime=runtime)

    return pick


def naive_step(key: str, concurrencies: tuple[int, ...]) -> Step:
    def run(bench: Bench) -> None:
        ctx = bench.ctx[key]
        folder = os.path.join(bench.settings.work, "servers", ctx["naive"])
        config = f"TorchServe defaults: {os.cpu_count()}w, batch 1"
        bench.serve(lambda: systems.start_naive(folder, ctx["store"], ctx["naive"]),
                    label("naive-torchserve", key, "torchscript", config, 1),
                    [(ctx["bodies"]["json"], JSON, concurrencies)])

    return Step(f"naive torchserve {key}", run)


def peer_env(key: str, threads: int) -> dict:
    model = MODELS[key]
    return {"BENCH_THREADS": str(threads), "BENCH_SHAPE": json.dumps(list(model.shape)),
            "BENCH_TOP_K": str(model.top_k), "BENCH_LABELS": json.dumps(list(model.labels))}


def fastapi_step(key: str, workers: int, threads: int, concurrencies: tuple[int, ...], body: str = "json") -> Step:
    config = f"{workers} uvicorn workers x {threads}t"

    def run(bench: Bench) -> None:
        ctx = bench.ctx[key]
        env = {**peer_env(key, threads), "BENCH_MODEL": ctx["torchscript"]}
        log = os.path.join(bench.settings.work, "servers", f"fastapi-{key}-{workers}w.log")
        bench.serve(lambda: systems.start_peer("fastapi", bench.ctx["python"], [str(workers)], env, log),
                    label("fastapi", key, "torchscript", config, 1),
                    [(ctx["bodies"][body], JSON if body == "json" else NPY, concurrencies)])

    return Step(f"fastapi {key} {config}", run)


def litserve_step(key: str, max_batch: int, timeout_s: float, threads: int, concurrencies: tuple[int, ...],
                  body: str = "json") -> Step:
    batching = f"batch {max_batch}/{timeout_s * 1000:g}ms" if max_batch > 1 else "no batching"
    config = f"{batching}, 1 worker x {threads}t"

    def run(bench: Bench) -> None:
        ctx = bench.ctx[key]
        env = {**peer_env(key, threads), "BENCH_MODEL": ctx["torchscript"]}
        log = os.path.join(bench.settings.work, "servers", f"litserve-{key}-b{max_batch}-t{threads}.log")
        bench.serve(lambda: systems.start_peer("litserve", bench.ctx["python"], [str(max_batch), str(timeout_s)],
                                               env, log),
                    label("litserve", key, "torchscript", config, max_batch),
                    [(ctx["bodies"][body], JSON if body == "json" else NPY, concurrencies)])

    return Step(f"litserve {key} {config}", run)


def peers_env_step() -> Step:
    def run(bench: Bench) -> None:
        from benchmarks.peers import env

        bench.ctx["python"] = env.ensure()

    return Step("peers' venv", run)


def light_steps(s: Settings) -> list[Step]:
    cs, on = s.concurrencies, set(s.systems)
    steps = [prepare("light", s.light_variants() + ([] if s.quick else unbatched_variants()))]
    if "limit" in on:
        runtimes = ("torchscript",) if s.quick else ("torchscript", "onnx")
        steps += [limit_step("light", r, (8, 32), 2) for r in runtimes]
    if "tspack" in on:
        steps += [tspack_step("light", v, [("json", cs)], cold=i == 0) for i, v in enumerate(s.light_variants())]
        if not s.quick:
            steps.append(tspack_step("light", best_light_variant("onnx"), [("json", cs)]))
            # The c=1 floor without batching: TorchServe 0.12 cannot batch without a wait of >= 1 ms (a
            # maxBatchDelay of 0 falls back to its 100 ms default), so these rows show what that wait costs.
            steps += [tspack_step("light", v, [("json", (1,))]) for v in unbatched_variants()]
    if "naive" in on:
        steps.append(naive_step("light", (32,) if s.quick else cs))
    if "fastapi" in on:
        steps += [fastapi_step("light", w, t, (32,) if s.quick else cs) for w, t in s.fastapi_configs()]
    if "litserve" in on:
        steps += [litserve_step("light", b, t, n, (32,) if s.quick else cs) for b, t, n in s.litserve_configs()]
    return steps


def heavy_steps(s: Settings) -> list[Step]:
    on = set(s.systems)
    runtimes = ("torchscript", "onnx", "onnx-int8")
    steps = [prepare("heavy", [Variant(r, 1, 2, 8, 5) for r in runtimes])]
    if "limit" in on:
        steps += [limit_step("heavy", r, (8, 32), 2) for r in runtimes]
    if "tspack" in on:
        # .npy bodies against the limit; the JSON row is the one compared with the naive TorchServe.
        steps.append(tspack_step("heavy", Variant("torchscript", 1, 2, 8, 5),
                                 [("npy", s.concurrencies), ("json", (32,))]))
        steps.append(tspack_step("heavy", Variant("torchscript", 2, 1, 8, 5), [("npy", (1, 32))]))
        steps += [tspack_step("heavy", Variant(r, 1, 2, 8, 5), [("npy", (1, 32))]) for r in runtimes[1:]]
    if "naive" in on:
        steps.append(naive_step("heavy", (32,)))
    # Peers on the heavy model, fp32 TorchScript: FastAPI on the .npy bodies of tspack's heavy rows; LitServe
    # parses every body as JSON before its decode_request sees it, so it gets the JSON body of the naive row.
    if "fastapi" in on:
        steps.append(fastapi_step("heavy", 2, 1, (1, 32), body="npy"))
    if "litserve" in on:
        steps.append(litserve_step("heavy", 8, 0.005, 2, (32,), body="json"))
    return steps


def demo_cold_start_step() -> Step:
    def run(bench: Bench) -> None:
        from benchmarks.cold_start import demo_cold_start

        bench.cold_start_demo_s = demo_cold_start(bench.settings.work)
        bench.log(f"  cold start of the demo deployment: {bench.cold_start_demo_s:.2f} s from `tspack serve start` "
                  "to the first 200")

    return Step("cold start: demo deployment", run)


def plan(s: Settings) -> list[Step]:
    steps = [peers_env_step()] if {"fastapi", "litserve"} & set(s.systems) else []
    if "light" in s.models:
        steps += light_steps(s)
    if "heavy" in s.models:
        steps += heavy_steps(s)
    if "tspack" in s.systems and not s.quick:
        steps.append(demo_cold_start_step())
    return steps


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="light model only, fewer configs, shorter runs (~2 min)")
    parser.add_argument("--only", help=f"comma-separated systems among {','.join(SYSTEMS)}")
    parser.add_argument("--models", help="comma-separated: light,heavy")
    parser.add_argument("--duration", type=float, help="seconds per measured load run (all models)")
    parser.add_argument("--out", help="folder for latest.json and latest.png (default benchmarks/results)")
    parser.add_argument("--markdown", help="Markdown file whose serving section is rewritten (default BENCHMARKS.md)")
    parser.add_argument("--work", help="scratch folder for archives and server runs (default benchmarks/work/serving)")
    args = parser.parse_args(argv)
    s = Settings(quick=args.quick)
    if args.quick:
        s = replace(s, models=("light",), duration_s={"light": 3.0, "heavy": 5.0}, concurrencies=(1, 32),
                    warmup_s=3.0, command="make bench QUICK=1")
    if args.only:
        s = replace(s, systems=tuple(x.strip() for x in args.only.split(",") if x.strip()))
    if args.models:
        s = replace(s, models=tuple(x.strip() for x in args.models.split(",") if x.strip()))
    if args.duration:
        s = replace(s, duration_s={k: args.duration for k in s.duration_s}, warmup_s=min(s.warmup_s, args.duration))
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
