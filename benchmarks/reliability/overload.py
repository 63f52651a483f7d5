"""Overload: far more clients than a slow model's queue holds get fast 503s, memory stays bounded, and the
server is healthy once the load stops."""

from __future__ import annotations

import os
import re
import time

from benchmarks.reliability import inputs
from benchmarks.reliability.load import (
    MB,
    Caller,
    Load,
    Outcome,
    RssSampler,
    percentile,
    run_load,
    status_counts,
    tree_rss,
)
from benchmarks.reliability.result import Result, latency_figures
from benchmarks.reliability.rig import SLOW, SLOW_QUEUE, Rig
from benchmarks.reliability.settings import Settings


def access_log_offset(rig: Rig) -> int:
    path = os.path.join(rig.handle.log_dir, "access_log.log")
    return os.path.getsize(path) if os.path.exists(path) else 0


def access_log_ms(rig: Rig, offset: int, path_part: str, status: int, expected: int,
                  timeout_s: float = 15.0) -> list[float]:
    """Latencies (ms, as TorchServe measured them) of the access-log lines after `offset` for one path and
    status; the log is written asynchronously, so wait (up to `timeout_s`) for `expected` lines."""
    pattern = re.compile(r'"POST ' + re.escape(path_part) + r' HTTP/1\.1" ' + str(status) + r" (\d+)")
    deadline = time.monotonic() + timeout_s
    while True:
        with open(os.path.join(rig.handle.log_dir, "access_log.log"), "rb") as f:
            f.seek(offset)
            found = [float(m.group(1)) for m in pattern.finditer(f.read().decode("utf-8", "replace"))]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def overload_checks(result: Result, settings: Settings, outcomes: list[Outcome], server_503_ms: list[float]) -> None:
    counts = status_counts(outcomes)
    rejected = [o for o in outcomes if o.status == 503]
    served = [o for o in outcomes if o.ok]
    result.check("excess requests rejected with 503", rejected, counts)
    result.check("admitted requests served (200)", served, counts)
    result.check("nothing but 200 and 503 (no hang, no timeout, no 500)", set(counts) <= {"200", "503"}, counts)
    server_ms = server_503_ms
    p99 = percentile(server_ms, 99)
    result.check("every 503 in TorchServe's access log", len(server_ms) == len(rejected),
                 f"{len(server_ms)} logged, {len(rejected)} received")
    if settings.strict_timing:
        result.check(f"503s are fast: p99 in TorchServe <= {settings.fast_503_p99_ms:g} ms",
                     p99 is not None and p99 <= settings.fast_503_p99_ms, f"{p99} ms")
    messages = {str((o.body or {}).get("type") or o.error)[:80] for o in rejected}
    result.figures.update({"statuses": counts, "rejected_503": len(rejected), "served_200": len(served),
                           "latency_503_in_torchserve_ms": {"p50": percentile(server_ms, 50), "p99": p99,
                                                            "max": max(server_ms, default=None)},
                           "latency_503_at_client": latency_figures(rejected), "latency_200": latency_figures(served),
                           "503_types": sorted(messages)})


def scenario_overload(rig: Rig, settings: Settings) -> dict:
    load = Load(clients=settings.overload_clients, duration_s=settings.overload_s,
                max_requests=settings.overload_requests_per_client)
    result = Result("overload", f"Overload ({load.clients} clients vs a queue of {SLOW_QUEUE}, 1 slow worker)",
                    f"{load.clients} clients, closed loop")
    client = rig.client()
    time.sleep(0.5)
    before = tree_rss(rig.handle.pid)
    offset = access_log_offset(rig)
    with RssSampler(rig.handle.pid, interval_s=0.25) as sampler:
        outcomes = run_load(inputs.good_target(rig, f"/predictions/{SLOW}"), load, rig.handle.authorization())
    rejected = sum(1 for o in outcomes if o.status == 503)
    overload_checks(result, settings, outcomes, access_log_ms(rig, offset, f"/predictions/{SLOW}", 503, rejected))
    growth_mb = (sampler.peak_tree - before) / MB
    result.check(f"memory bounded: server tree peak RSS within +{settings.overload_rss_growth_mb:g} MB",
                 growth_mb <= settings.overload_rss_growth_mb, f"{before / MB:.0f} MB -> peak "
                 f"{sampler.peak_tree / MB:.0f} MB (+{growth_mb:.0f} MB)")
    healthy_at = time.monotonic()
    ping = client.ping().get("status")
    answer = Caller(rig.handle.authorization()).post(inputs.good_target(rig, f"/predictions/{SLOW}"))
    result.check("healthy once the load stops (ping Healthy, a normal request answers 200)",
                 ping == "Healthy" and answer.ok, f"ping {ping}, request {answer.status}")
    duration = max(o.end for o in outcomes) - min(o.start for o in outcomes) if outcomes else 0.0
    result["duration_s"] = round(duration, 1)
    result["requests"] = len(outcomes)
    result["failures"] = sum(1 for o in outcomes if o.status not in (200, 503))
    result["recovery"] = f"{time.monotonic() - healthy_at:.1f} s (first check)"
    result["load"] += f", {len(outcomes) / max(duration, 1e-9):.0f} req/s offered"
    result.figures.update({"tree_rss_before_mb": round(before / MB), "tree_rss_peak_mb": round(sampler.peak_tree / MB),
                           "tree_rss_after_mb": round(tree_rss(rig.handle.pid) / MB)})
    return result.done()
