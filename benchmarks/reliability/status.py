"""Monitoring: `tspack serve status` reports health, versions, workers and the error rate of its window."""

from __future__ import annotations

import json
import os
import re
import time

from archiver.operate.status import HISTORY_FILE, request_counts
from benchmarks.reliability.metrics import BAD_TRAFFIC, send_known_traffic
from benchmarks.reliability.result import Result
from benchmarks.reliability.rig import IMAGE, MODEL, SLOW, Rig, tspack
from benchmarks.reliability.settings import Settings


def status_cli(run_dir: str, as_json: bool = True) -> tuple[int, str]:
    done = tspack("serve", "status", "--run-dir", run_dir, *(["--json"] if as_json else []), timeout_s=120)
    return done.returncode, done.stdout


def seed_history(rig: Rig, age_s: float = 61.0) -> float:
    """Record the current counters as a snapshot `age_s` old, as an earlier `serve status` would have.

    Returns the number of answers the snapshot holds."""
    time.sleep(2.5)  # let the handlers flush their counters (every second) before taking the snapshot
    counts = request_counts(rig.client())
    with open(os.path.join(rig.handle.run_dir, HISTORY_FILE), "w", encoding="utf-8") as f:
        json.dump([{"t": time.time() - age_s, "counts": counts}], f)
    return sum(counts.values())


def wait_for_flush(rig: Rig, answers: float, timeout_s: float = 30.0) -> None:
    """Until the handlers' counters (flushed every second) hold at least `answers` answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and sum(request_counts(rig.client()).values()) < answers:
        time.sleep(0.2)


def _check_status_models(result: Result, status: dict) -> None:
    models = status.get("models", {})
    for model in (MODEL, SLOW, IMAGE, "ab"):
        versions = models.get(model) or []
        ready = [v for v in versions if v.get("ready_workers")]
        result.check(f"status lists {model} with ready workers", ready, [v.get("workers") for v in versions])
    digits = models.get(MODEL) or [{}]
    result.check("status shows the default version and build figures",
                 any(v.get("default") and v.get("built_at") and v.get("runtime") for v in digits), digits)


def scenario_status(rig: Rig, settings: Settings) -> dict:
    result = Result("status", "Monitoring: `tspack serve status`", "1 client, 7 good + 3 malformed")
    code, out = status_cli(rig.handle.run_dir)
    first = json.loads(out)
    result.check("exit 0 and healthy", code == 0 and first.get("healthy") is True, f"exit {code}")
    result.check("ping Healthy", first.get("ping") == "Healthy", first.get("ping"))
    _check_status_models(result, first)
    seeded = seed_history(rig)
    outcomes = send_known_traffic(rig)
    wait_for_flush(rig, seeded + len(outcomes))
    code, out = status_cli(rig.handle.run_dir)
    traffic = json.loads(out).get("traffic") or {}
    window = re.match(r"last (\d+)s$", traffic.get("window", ""))
    result.check("window is the last minute (the 61 s old snapshot)", window and 61 <= int(window.group(1)) < 300,
                 traffic.get("window"))
    result.check("4xx in the window = the 3 malformed requests", traffic.get("errors_4xx") == len(BAD_TRAFFIC),
                 traffic.get("errors_4xx"))
    result.check("no 5xx in the window", traffic.get("errors_5xx") == 0, traffic.get("errors_5xx"))
    counted = traffic.get("requests", 0)
    result.check("every request sent is counted", counted >= len(outcomes), counted)
    rate_ok = abs(traffic.get("error_rate", -1) - len(BAD_TRAFFIC) / max(counted, 1)) < 1e-9
    result.check("error rate = errors / requests in the window", rate_ok and traffic["error_rate"] > 0, traffic)
    code, text = status_cli(rig.handle.run_dir, as_json=False)
    result.check("text summary names health, models, error rate",
                 code == 0 and "healthy" in text and MODEL in text and "error rate" in text, text[:300])
    result["requests"] = len(outcomes)
    result.figures.update({"traffic": traffic, "inference_requests_sent": len(outcomes),
                           "other_api_calls_counted": counted - len(outcomes), "text": text.strip().splitlines()})
    return result.done()
