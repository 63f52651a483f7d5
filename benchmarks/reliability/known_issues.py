"""The product issues this suite found (all fixed), replayed as regression probes, each followed by a wait until
the deployment serves normally again."""

from __future__ import annotations

import json
import os
import shutil
import time

from benchmarks.reliability import inputs
from benchmarks.reliability.bad_input import is_server_error, judge, send_case, wait_serving
from benchmarks.reliability.load import Caller
from benchmarks.reliability.metrics import BAD_TRAFFIC, send_known_traffic
from benchmarks.reliability.result import Result, ms
from benchmarks.reliability.rig import SLOW, Rig
from benchmarks.reliability.security import register_status
from benchmarks.reliability.settings import Settings
from benchmarks.reliability.status import seed_history, status_cli, wait_for_flush


def run_known_issue(rig: Rig, issue: inputs.KnownIssue, case: inputs.Case, timeout_s: float = 120.0) -> dict:
    """Send the request that shows `issue`; then wait until the deployment serves normally again."""
    caller = Caller(rig.handle.authorization(), timeout_s=timeout_s)
    outcome = send_case(caller, rig, case, issue.target)
    caller.close()
    ok, got = judge(issue.target, case.expect[issue.target], outcome)
    expect = case.expect[issue.target]
    return {"id": issue.id, "target": issue.target, "case": case.name, "where": issue.where, "summary": issue.summary,
            "expected": f"{expect.status} {expect.type or ''}".strip(), "got": got, "fixed": ok,
            "server_error": is_server_error(outcome), "latency_ms": ms(outcome.latency_s),
            "serving_again_after_s": wait_serving(rig, timeout_s)}


def probe_encoded_dots(rig: Rig, issue: inputs.KnownIssue) -> dict:
    """K9: with the model API on, register an archive outside the store through %2e%2e."""
    outside = os.path.join(rig.root, "outside")
    os.makedirs(outside, exist_ok=True)
    shutil.copy2(os.path.join(rig.store, f"{SLOW}_v1.0.mar"), os.path.join(outside, "k9.mar"))
    client = rig.client()
    status, message = register_status(client, f"file://{os.path.abspath(rig.store)}/%2e%2e/outside/k9.mar",
                                      model_name="k9-probe", initial_workers=1)
    if status == 200:
        client.unregister("k9-probe")
        message = "registered from outside the model store"
    return {"expected": "4xx refused", "got": f"HTTP {status} {message}".strip(), "fixed": 400 <= status < 500,
            "server_error": status >= 500}


def probe_status_rate(rig: Rig, issue: inputs.KnownIssue) -> dict:
    """K10: the status error rate after 7 good and 3 malformed predictions in its window."""
    seeded = seed_history(rig)
    outcomes = send_known_traffic(rig)
    wait_for_flush(rig, seeded + len(outcomes))
    _, out = status_cli(rig.handle.run_dir)
    traffic = json.loads(out).get("traffic") or {}
    want = len(BAD_TRAFFIC) / len(outcomes)
    got = traffic.get("error_rate", -1.0)
    return {"expected": f"error rate {want:.0%} ({len(BAD_TRAFFIC)}/{len(outcomes)})",
            "got": f"error rate {got:.1%} ({traffic.get('errors_4xx')}/{traffic.get('requests')})",
            "fixed": abs(got - want) < 1e-9, "server_error": False}


PROBES = {"K9": probe_encoded_dots, "K10": probe_status_rate}


def run_probe(rig: Rig, issue: inputs.KnownIssue) -> dict:
    started = time.monotonic()
    row = PROBES[issue.id](rig, issue)
    row.update({"id": issue.id, "target": issue.target, "case": issue.case, "where": issue.where,
                "summary": issue.summary, "latency_ms": ms(time.monotonic() - started),
                "serving_again_after_s": wait_serving(rig, 60.0)})
    return row


def scenario_known_issues(rig: Rig, settings: Settings) -> dict:
    cells = [(i, c) for i, c in inputs.known_cases(settings.known_issue_body_mb)
             if i.id not in settings.skip_known]
    result = Result("known_issues", "Issues found by this suite, fixed (regression probes)",
                    f"1 client, {len(cells)} probes")
    rows = [run_known_issue(rig, issue, case) if case else run_probe(rig, issue) for issue, case in cells]
    for row in rows:
        result.check(f"{row['id']} {row['case']} -> {row['target']}", row["fixed"],
                     f"expected {row['expected']}, got {row['got']} ({row['latency_ms']} ms)")
    recovered = [r["serving_again_after_s"] for r in rows]
    result.check("serving normally again after each", all(v is not None for v in recovered), recovered)
    result["requests"] = len(rows)
    result["failures"] = sum(1 for r in rows if not r["fixed"])
    slowest = max((r for r in rows if r["serving_again_after_s"] is not None), default=None,
                  key=lambda r: r["serving_again_after_s"])
    result["recovery"] = (f"all paths serving again within {slowest['serving_again_after_s']:.1f} s (slowest: "
                          f"{slowest['id']})" if slowest else "never")
    result.figures["rows"] = rows
    return result.done()
