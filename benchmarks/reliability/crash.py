"""A worker crash (kill -9 of one of 2 workers) under load: at most its batch fails, and it comes back."""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

from archiver.operate.client import TorchServeClient
from benchmarks.reliability import inputs
from benchmarks.reliability.load import (
    Background,
    Load,
    Outcome,
    failures,
    rate,
    status_counts,
    worker_processes,
)
from benchmarks.reliability.result import Result
from benchmarks.reliability.rig import BATCH_SIZE, DIGITS_WORKERS, MODEL, Rig, default_version, ready_pids
from benchmarks.reliability.settings import Settings


def wait_replacement(client: TorchServeClient, version: str, victim: int, deadline_s: float) -> Optional[float]:
    """Seconds from now until the model has all its workers READY again, none of them `victim`."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        pids = ready_pids(client, MODEL, version)
        if len(pids) >= DIGITS_WORKERS and victim not in pids:
            return time.monotonic()
        time.sleep(0.2)
    return None


def throughput_back(outcomes: list[Outcome], kill_at: float, baseline: float, share: float,
                    not_before: float) -> Optional[float]:
    """End of the first 1-s window starting at or after `not_before` with >= share x baseline answers/s."""
    t = not_before
    last = max((o.end for o in outcomes), default=kill_at)
    while t + 1.0 <= last:
        if rate(outcomes, t, t + 1.0) >= share * baseline:
            return t + 1.0
        t += 0.1
    return None


def lowest_rate(outcomes: list[Outcome], start: float, end: float) -> Optional[float]:
    """The lowest answers/s over 1-s windows (0.1 s apart) within [start, end]."""
    windows = [rate(outcomes, start + 0.1 * i, start + 0.1 * i + 1.0) for i in range(int((end - start - 1.0) * 10) + 1)]
    return round(min(windows), 1) if windows else None


def crash_figures(result: Result, settings: Settings, outcomes: list[Outcome], kill_at: float,
                  worker_back: Optional[float]) -> None:
    baseline = rate(outcomes, kill_at - settings.crash_baseline_s + 0.5, kill_at)
    serving_again = throughput_back(outcomes, kill_at, baseline, settings.throughput_recovered, kill_at)
    full = throughput_back(outcomes, kill_at, baseline, settings.throughput_recovered, worker_back) \
        if worker_back else None
    lost = failures(outcomes)
    figures = {"baseline_rps": round(baseline, 1), "failed_requests": len(lost),
               "failed_statuses": status_counts(lost), "failed_examples": [o.error or o.body for o in lost][:3],
               "worker_back_s": round(worker_back - kill_at, 2) if worker_back else None,
               "throughput_back_s": round(serving_again - kill_at, 2) if serving_again else None,
               "full_capacity_back_s": round(full - kill_at, 2) if full else None,
               "rps_during_restart": round(rate(outcomes, kill_at, worker_back or kill_at), 1),
               "lowest_1s_rps_after_kill": lowest_rate(outcomes, kill_at, (worker_back or kill_at) + 1.0)}
    result.figures.update(figures)
    recovery = figures["full_capacity_back_s"]
    result["recovery"] = (f"throughput {figures['throughput_back_s']} s; worker restarted {figures['worker_back_s']} "
                          f"s; both workers serving {recovery} s" if recovery is not None else "not recovered")
    result.check(f"failures limited to the killed worker's in-flight batch (<= {BATCH_SIZE})",
                 len(lost) <= BATCH_SIZE, f"{len(lost)} failed: {status_counts(lost)}")
    result.check("TorchServe restarted the worker", worker_back is not None, figures["worker_back_s"])
    after = [o for o in outcomes if worker_back and o.start > worker_back]
    result.check("requests succeed again after the restart", after and all(o.ok for o in after),
                 status_counts(after))
    if settings.strict_timing:
        back = figures["throughput_back_s"]
        result.check(f"throughput back (a 1-s window >= {settings.throughput_recovered:.0%} of before) within "
                     f"{settings.recovery_limit_s:g} s", back is not None and back <= settings.recovery_limit_s, back)


def pick_victim(result: Result, rig: Rig, version: str) -> Optional[int]:
    pids = ready_pids(rig.client(), MODEL, version)
    workers = set(worker_processes(rig.handle.pid))
    result.check(f"{MODEL} has {DIGITS_WORKERS} READY workers, all model_service_worker.py children of the server",
                 len(pids) == DIGITS_WORKERS and set(pids) <= workers, f"{pids} in {sorted(workers)}")
    return pids[0] if pids else None


def scenario_crash(rig: Rig, settings: Settings) -> dict:
    load = Load(clients=settings.crash_clients, duration_s=settings.crash_baseline_s + settings.crash_deadline_s + 30,
                max_requests=100_000)
    result = Result("crash", "Worker crash (kill -9 one of 2 workers)", f"{load.clients} clients, closed loop")
    client = rig.client()
    version = default_version(client, MODEL)
    victim = pick_victim(result, rig, version)
    if victim is None:
        return result.done()
    background = Background(inputs.good_target(rig), load, rig.handle.authorization())
    time.sleep(settings.crash_baseline_s)
    kill_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    try:
        worker_back = wait_replacement(client, version, victim, settings.crash_deadline_s)
        time.sleep(settings.crash_after_s)
    finally:
        outcomes = background.finish()
    result.figures.update({"victim_pid": victim, "version": version})
    crash_figures(result, settings, outcomes, kill_at, worker_back)
    duration = outcomes[-1].end - outcomes[0].start if outcomes else 0.0
    result["duration_s"] = round(duration, 1)
    result["requests"] = len(outcomes)
    result["failures"] = len(failures(outcomes))
    result["load"] += f", {len(outcomes) / max(duration, 1e-9):.0f} req/s"
    return result.done()
