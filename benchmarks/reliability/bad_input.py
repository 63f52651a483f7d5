"""Bad input: every case of the matrix (inputs.py) on every path answers its JSON 4xx, and no worker dies."""

from __future__ import annotations

import time
from typing import Optional

import requests

from archiver.errors import ApiError
from benchmarks.reliability import inputs
from benchmarks.reliability.load import Caller, Outcome, Target
from benchmarks.reliability.result import Result, ms
from benchmarks.reliability.rig import Rig, worker_states
from benchmarks.reliability.settings import Settings


def send_case(caller: Caller, rig: Rig, case: inputs.Case, target: str) -> Outcome:
    target_spec = Target(rig.url(inputs.TARGETS[target]), case.body(target), case.content_type(target),
                         dict(case.headers))
    return caller.post(target_spec, keep_body=True)


def judge(target: str, expect: inputs.Expect, outcome: Outcome) -> tuple[bool, str]:
    """Does the answer match? Through the workflow the HTTP status is 200 and the body carries the 4xx."""
    body = outcome.body if isinstance(outcome.body, dict) else {}
    got = f"HTTP {outcome.status} {body.get('status', '')} {body.get('type', '') or outcome.error[:80]}".strip()
    if expect.status == 200:
        return outcome.status == 200 and "error" not in body, got
    http = 200 if target == "workflow" else expect.status
    shaped = {"error", "type", "status"} <= set(body) and isinstance(body.get("error"), str) and body["error"]
    ok = outcome.status == http and shaped and body["status"] == expect.status
    return bool(ok and (expect.type is None or body["type"] == expect.type)), got


def is_server_error(outcome: Outcome) -> bool:
    body_status = outcome.body.get("status") if isinstance(outcome.body, dict) else None
    return outcome.status is None or outcome.status >= 500 or (isinstance(body_status, int) and body_status >= 500)


def run_matrix(rig: Rig, cells: list[tuple[inputs.Case, str]]) -> list[dict]:
    caller = Caller(rig.handle.authorization(), timeout_s=120.0)
    rows = []
    for case, target in cells:
        outcome = send_case(caller, rig, case, target)
        ok, got = judge(target, case.expect[target], outcome)
        expect = case.expect[target]
        rows.append({"case": case.name, "target": target, "expected": f"{expect.status} {expect.type or ''}".strip(),
                     "got": got, "ok": ok, "server_error": is_server_error(outcome),
                     "latency_ms": ms(outcome.latency_s)})
    caller.close()
    return rows


def serving_check(rig: Rig) -> dict[str, bool]:
    """A good request on every path answers 200 (through the workflow: 200 without an error body)."""
    caller = Caller(rig.handle.authorization())
    answers = {}
    for target in inputs.MATRIX_TARGETS:
        outcome = caller.post(Target(rig.url(inputs.TARGETS[target]), inputs.good_body(target),
                                     inputs.good_type(target)), keep_body=True)
        answers[target] = outcome.ok and "error" not in (outcome.body or {})
    caller.close()
    return answers


def all_ready(states: dict) -> bool:
    return all(status == "READY" for workers in states.values() for _, status, _ in workers) and bool(states)


def matrix_cells(big_mb: int) -> list[tuple[inputs.Case, str]]:
    return [(case, target) for case in inputs.cases(big_mb) for target in inputs.MATRIX_TARGETS
            if target in case.expect and not inputs.known(target, case.name, big_mb)]


def scenario_bad_input(rig: Rig, settings: Settings) -> dict:
    cells = matrix_cells(settings.big_body_mb)
    result = Result("bad_input", "Bad input matrix (tensor, image, router, workflow)",
                    f"1 client, {len(cells)} requests")
    client = rig.client()
    before = worker_states(client)
    rows = run_matrix(rig, cells)
    for row in rows:
        result.check(f"{row['case']} -> {row['target']}", row["ok"], f"expected {row['expected']}, got {row['got']}")
    result.check("no 5xx anywhere", not any(r["server_error"] for r in rows),
                 [f"{r['case']}/{r['target']}" for r in rows if r["server_error"]])
    after = worker_states(client)
    result.check("every worker READY after the matrix", all_ready(after), after)
    pids = {m: sorted(p for _, _, p in w) for m, w in before.items()}
    result.check("no worker died or restarted (same PIDs)", pids == {m: sorted(p for _, _, p in w)
                                                                     for m, w in after.items()})
    answers = serving_check(rig)
    result.check("a good request answers on every path", all(answers.values()), answers)
    result["requests"] = len(rows)
    result["failures"] = sum(1 for r in rows if not r["ok"])
    result.figures.update({"rows": rows, "known_issue_cells": len(inputs.KNOWN_ISSUES)})
    return result.done()


def wait_serving(rig: Rig, timeout_s: float) -> Optional[float]:
    """Seconds until every worker is READY and every path answers a good request; None past `timeout_s`."""
    started = time.monotonic()
    client = rig.client()
    while time.monotonic() - started < timeout_s:
        try:
            if all_ready(worker_states(client)) and all(serving_check(rig).values()):
                return round(time.monotonic() - started, 2)
        except (ApiError, requests.RequestException):
            pass
        time.sleep(0.5)
    return None
