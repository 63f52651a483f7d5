"""A zero-downtime version swap (v1.0 -> v2.0) under closed-loop load: no failed request, answers by time."""

from __future__ import annotations

import time
from typing import Optional

from archiver.operate.client import TorchServeClient
from archiver.operate.swap import swap_version
from benchmarks.reliability import inputs
from benchmarks.reliability.load import Background, Load, Outcome, failures, status_counts
from benchmarks.reliability.result import Result, latency_figures
from benchmarks.reliability.rig import DIGITS_WORKERS, MODEL, Rig
from benchmarks.reliability.settings import Settings


class TimedClient(TorchServeClient):
    """The product's client, noting when the default version is switched (to judge answers by time)."""

    switch_called: Optional[float] = None
    switch_done: Optional[float] = None

    def set_default(self, model: str, version: str) -> dict:
        self.switch_called = time.monotonic()
        try:
            return super().set_default(model, version)
        finally:
            self.switch_done = time.monotonic()


def swap_checks(result: Result, outcomes: list[Outcome], registered_from: float, switch_called: float,
                swap_returned: float) -> None:
    bad = failures(outcomes)
    result.check("zero non-2xx answers", not [o for o in bad if o.status is not None], status_counts(bad))
    result.check("zero connection errors", not [o for o in bad if o.status is None], [o.error for o in bad][:3])
    before = [o for o in outcomes if o.ok and o.end < switch_called]
    after = [o for o in outcomes if o.ok and o.start > swap_returned]
    around = [o for o in outcomes if o.ok and o.end >= switch_called and o.start <= swap_returned]
    result.check("before the switch: only v1.0", before and all(o.version == "1.0" for o in before),
                 status_versions(before))
    result.check("after the swap returned: only v2.0", after and all(o.version == "2.0" for o in after),
                 status_versions(after))
    result.check("around the switch: v1.0 or v2.0", all(o.version in ("1.0", "2.0") for o in around),
                 status_versions(around))
    registering = [o for o in outcomes if o.ok and registered_from <= o.start < switch_called]
    result.figures.update({"answers_before_switch": status_versions(before),
                           "answers_around_switch": status_versions(around),
                           "answers_after_swap": status_versions(after),
                           "latency_of_requests_sent_while_v2_registers": latency_figures(registering),
                           "stalled_over_1s": sum(1 for o in outcomes if o.ok and o.latency_s > 1.0),
                           "latency_around_switch": latency_figures(around),
                           "latency_after_swap": latency_figures(after)})


def status_versions(outcomes: list[Outcome]) -> dict:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[str(o.version)] = counts.get(str(o.version), 0) + 1
    return counts


def scenario_swap(rig: Rig, settings: Settings) -> dict:
    load = Load(clients=settings.swap_clients, duration_s=settings.swap_before_s + settings.swap_after_s + 300.0,
                max_requests=50_000)
    result = Result("swap", "Zero-downtime version swap (v1.0 -> v2.0)", f"{load.clients} clients, closed loop")
    handle = rig.handle
    client = TimedClient(handle.inference_url, handle.management_url, handle.metrics_url, handle.key_file)
    registered = [d["modelVersion"] for d in client.versions(MODEL)]
    result.check("starts with v1.0 only", registered == ["1.0"], registered)
    background = Background(inputs.good_target(rig), load, handle.authorization())
    time.sleep(settings.swap_before_s)
    swap_started = time.monotonic()
    try:
        swap = swap_version(client, MODEL, f"{MODEL}_v2.0.mar", "2.0", workers=DIGITS_WORKERS,
                            drain_s=settings.swap_drain_s)
        result.figures["steps"] = swap.steps
    finally:
        swap_returned = time.monotonic()
        time.sleep(settings.swap_after_s)
        outcomes = background.finish()
    swap_checks(result, outcomes, swap_started, client.switch_called or swap_started, swap_returned)
    remaining = [d["modelVersion"] for d in client.versions(MODEL)]
    result.check("v1.0 retired, v2.0 registered", remaining == ["2.0"], remaining)
    duration = outcomes[-1].end - outcomes[0].start if outcomes else 0.0
    result["duration_s"] = round(duration, 1)
    result["requests"] = len(outcomes)
    result["failures"] = len(failures(outcomes))
    result["load"] += f", {len(outcomes) / max(duration, 1e-9):.0f} req/s"
    result.figures.update({"swap_s": round(swap_returned - swap_started, 2), **latency_figures(outcomes),
                           "statuses": status_counts(outcomes)})
    return result.done()
