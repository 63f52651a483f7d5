"""A soak: steady paced load, no errors, no restarted worker, flat worker memory after the warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Optional

from benchmarks.reliability import inputs
from benchmarks.reliability.load import MB, Background, Load, RssSampler, failures, frontend_pid, status_counts
from benchmarks.reliability.result import Result, latency_figures
from benchmarks.reliability.rig import MODEL, Rig, default_version, ready_pids
from benchmarks.reliability.settings import Settings


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def rss_growth(sampler: RssSampler, pid: int, warm_until: float) -> dict:
    """RSS right after warm-up (mean of the first 5 samples) vs at the end (mean of the last 5)."""
    series = [(t, v) for t, v in sampler.series(pid) if t >= warm_until]
    if len(series) < 2:
        return {"pid": pid, "samples": len(series), "growth": None}
    start, end = _mean([v for _, v in series[:5]]), _mean([v for _, v in series[-5:]])
    return {"pid": pid, "samples": len(series), "after_warmup_mb": round(start / MB, 1), "end_mb": round(end / MB, 1),
            "peak_mb": round(max(v for _, v in series) / MB, 1), "growth": round(end / start - 1.0, 4)}


def run_soak(rig: Rig, settings: Settings, pids: list[int], progress: Optional[Callable[[float], None]]):
    per_client = settings.soak_rate_per_client
    load = Load(clients=settings.soak_clients, duration_s=settings.soak_s, rate_per_client=per_client,
                max_requests=int(settings.soak_s * per_client) + 10)
    java = frontend_pid(rig.handle.pid)
    with RssSampler(rig.handle.pid, lambda: pids + ([java] if java else []), interval_s=1.0) as sampler:
        background = Background(inputs.good_target(rig), load, rig.handle.authorization())
        while background.thread.is_alive():
            background.thread.join(1.0)
            if progress:
                progress(min(settings.soak_s, time.monotonic() - background.started))
        outcomes = background.finish()
    return outcomes, sampler, java


def scenario_soak(rig: Rig, settings: Settings, progress: Optional[Callable[[float], None]] = None) -> dict:
    client = rig.client()
    version = default_version(client, MODEL)
    pids = ready_pids(client, MODEL, version)
    rate_total = settings.soak_clients * settings.soak_rate_per_client
    result = Result("soak", f"Soak ({settings.soak_s:g} s steady load)",
                    f"{settings.soak_clients} clients, paced {rate_total:g} req/s")
    started = time.monotonic()
    outcomes, sampler, java = run_soak(rig, settings, pids, progress)
    warm_until = started + settings.soak_warmup_s
    bad = failures(outcomes)
    result.check("no errors", not bad, status_counts(bad))
    after = ready_pids(client, MODEL, version)
    result.check("no worker restarted (same PIDs, all READY)", sorted(after) == sorted(pids), f"{pids} -> {after}")
    growth = [rss_growth(sampler, pid, warm_until) for pid in pids]
    for g in growth:
        result.check(f"worker {g['pid']} RSS growth after warm-up <= {settings.soak_growth_limit:.0%}",
                     g["growth"] is not None and g["growth"] <= settings.soak_growth_limit,
                     f"{g.get('after_warmup_mb')} -> {g.get('end_mb')} MB ({_pct(g['growth'])})")
    duration = outcomes[-1].end - outcomes[0].start if outcomes else 0.0
    result["duration_s"] = round(duration, 1)
    result["requests"] = len(outcomes)
    result["failures"] = len(bad)
    result["load"] += f" (achieved {len(outcomes) / max(duration, 1e-9):.1f})"
    result.figures.update({"version": version, "warmup_s": settings.soak_warmup_s, "workers": growth,
                           "frontend": rss_growth(sampler, java, warm_until) if java else None,
                           **latency_figures(outcomes)})
    return result.done()


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"
