"""`make reliability`: reliability, security and monitoring under load, faults and bad input (GitHub issue 8).

    .venv/bin/python -m benchmarks.reliability [--quick] [--only swap,crash] [--soak-s S] [--work DIR]

Builds real archives, starts a real TorchServe on free loopback ports (benchmarks/reliability_rig.py) and
runs each scenario against it: exact Prometheus counts, `tspack serve status`, the bad-input matrix,
security, a zero-downtime version swap, a killed worker, overload, a soak, and the known product issues
the matrix found. Writes benchmarks/results/reliability.json and RELIABILITY.md; exits 1 when a check
failed. tests/integration/test_reliability.py runs the same scenario functions with `Settings.ci()`.

Every load is bounded in clients, requests per client and seconds, and stops by itself. Timing bounds
(throughput back within 10 s, fast 503s) are asserted only when `Settings.strict_timing` (the make target);
the CI settings check recovery itself, with generous deadlines, because the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python benchmarks/reliability.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402

from archiver.deploy.properties import ARCHIVE_NAME, read_properties  # noqa: E402
from archiver.errors import ApiError  # noqa: E402
from archiver.operate.client import TorchServeClient  # noqa: E402
from archiver.operate.status import HISTORY_FILE, metric_sum, parse_prometheus, request_counts  # noqa: E402
from archiver.operate.swap import swap_version  # noqa: E402
from benchmarks import reliability_inputs as inputs  # noqa: E402
from benchmarks import reliability_report as report  # noqa: E402
from benchmarks.reliability_load import (  # noqa: E402
    MB,
    Background,
    Caller,
    Load,
    Outcome,
    RssSampler,
    Target,
    bearer,
    failures,
    frontend_pid,
    percentile,
    rate,
    run_load,
    status_counts,
    tree_rss,
    worker_processes,
)
from benchmarks.reliability_rig import (  # noqa: E402
    BATCH_SIZE,
    DIGITS_WORKERS,
    IMAGE,
    MODEL,
    SLOW,
    SLOW_QUEUE,
    Rig,
    default_version,
    prepare,
    worker_states,
)
from handlers.metrics import DECLARED  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of one run. `full()` for `make reliability`, `quick()` for QUICK=1, `ci()` for pytest."""

    name: str = "full"
    strict_timing: bool = True
    swap_clients: int = 16
    swap_before_s: float = 5.0
    swap_after_s: float = 5.0
    swap_drain_s: float = 2.0
    crash_clients: int = 8
    crash_baseline_s: float = 4.0
    crash_deadline_s: float = 60.0
    crash_after_s: float = 4.0
    overload_clients: int = 128
    overload_s: float = 15.0
    overload_requests_per_client: int = 40
    soak_s: float = 300.0
    soak_warmup_s: float = 30.0
    soak_clients: int = 4
    soak_rate_per_client: float = 10.0
    big_body_mb: int = 50
    known_issue_body_mb: int = 50
    skip_known: tuple[str, ...] = ()
    throughput_recovered: float = 0.8  # share of the pre-kill throughput that counts as "back"
    recovery_limit_s: float = 10.0
    fast_503_p99_ms: float = 500.0
    overload_rss_growth_mb: float = 512.0
    soak_growth_limit: float = 0.05

    @classmethod
    def full(cls) -> Settings:
        return cls()

    @classmethod
    def quick(cls) -> Settings:
        return cls(name="quick", soak_s=60.0, soak_warmup_s=15.0, overload_s=8.0, overload_requests_per_client=20)

    @classmethod
    def ci(cls) -> Settings:
        return cls(name="ci", strict_timing=False, swap_before_s=1.5, swap_after_s=1.5, swap_drain_s=1.0,
                   crash_baseline_s=2.0, crash_deadline_s=120.0, crash_after_s=1.5, overload_clients=120,
                   overload_s=6.0, overload_requests_per_client=10, soak_s=22.0, soak_warmup_s=6.0,
                   known_issue_body_mb=16, skip_known=())


class Result:
    """One scenario's row: load, duration, requests, failures, recovery, pass/fail, and the checks behind it."""

    def __init__(self, key: str, title: str, load: str = ""):
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"key": key, "title": title, "load": load, "duration_s": None, "requests": 0,
                                     "failures": 0, "recovery": None, "passed": False, "checks": [], "figures": {}}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def figures(self) -> dict:
        return self.data["figures"]

    def check(self, name: str, ok: Any, detail: Any = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": str(detail)})
        return bool(ok)

    def done(self) -> dict:
        if self.data["duration_s"] is None:
            self.data["duration_s"] = round(time.monotonic() - self.started, 1)
        checks = self.data["checks"]
        self.data["passed"] = bool(checks) and all(c["ok"] for c in checks)
        return self.data


def failed_checks(result: dict) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["ok"]]


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 1)


def latency_figures(outcomes: list[Outcome]) -> dict:
    values = [o.latency_s for o in outcomes]
    return {"p50_ms": _ms(percentile(values, 50)), "p99_ms": _ms(percentile(values, 99)),
            "max_ms": _ms(max(values, default=None))}


def _good_target(rig: Rig, path: str = f"/predictions/{MODEL}") -> Target:
    return Target(rig.url(path), inputs.good_json())


# --- 7. monitoring --------------------------------------------------------------------------------------

BAD_TRAFFIC = ((b'{"data": [1, 2', 400, "malformed_json"),
               (json.dumps({"data": [[0.0] * 8] * 8}).encode(), 422, "shape_mismatch"),
               (b"", 400, "empty_body"))
GOOD_COUNT = 7


def send_known_traffic(rig: Rig) -> list[Outcome]:
    """7 good requests and 3 malformed ones, one at a time (so each is its own TorchServe batch)."""
    caller = Caller(bearer(rig.handle))
    url = rig.url(f"/predictions/{MODEL}")
    outcomes = [caller.post(Target(url, inputs.good_json())) for _ in range(GOOD_COUNT)]
    outcomes += [caller.post(Target(url, body)) for body, _, _ in BAD_TRAFFIC]
    caller.close()
    return outcomes


def expected_deltas(version: str) -> list[tuple[str, str, dict, int]]:
    """(label, metric, labels, expected increase) after `send_known_traffic`."""
    labels = {"ModelName": MODEL, "ModelVersion": version}
    bad = len(BAD_TRAFFIC)
    rows = [("requests Status=200", "tspack_requests_total", {**labels, "Status": "200"}, GOOD_COUNT)]
    for status in sorted({s for _, s, _ in BAD_TRAFFIC}):
        count = sum(1 for _, s, _ in BAD_TRAFFIC if s == status)
        rows.append((f"requests Status={status}", "tspack_requests_total", {**labels, "Status": str(status)}, count))
    for _, _, kind in BAD_TRAFFIC:
        rows.append((f"errors ErrorType={kind}", "tspack_errors_total", {**labels, "ErrorType": kind}, 1))
    rows += [("rows", "tspack_rows_total", labels, GOOD_COUNT),
             ("batches", "tspack_batches_total", labels, GOOD_COUNT),
             ("handler latency histogram count", "tspack_handler_latency_seconds_count", labels, GOOD_COUNT + bad),
             ("handler latency histogram +Inf bucket", "tspack_handler_latency_seconds_bucket",
              {**labels, "le": "+Inf"}, GOOD_COUNT + bad),
             # sent one at a time: every batch holds one request
             ("batch size histogram count", "tspack_batch_size_count", labels, GOOD_COUNT + bad),
             ("batch size histogram sum", "tspack_batch_size_sum", labels, GOOD_COUNT + bad),
             ("frontend ts_inference_requests_total", "ts_inference_requests_total", {"model_name": MODEL},
              GOOD_COUNT + bad),
             ("frontend Requests4XX (host)", "Requests4XX", {}, bad)]
    return rows


def metric_deltas(client: TorchServeClient, before: list, expected: list) -> dict[str, float]:
    after = parse_prometheus(client.metrics())
    return {label: metric_sum(after, name, **labels) - metric_sum(before, name, **labels)
            for label, name, labels, _ in expected}


def wait_for_counts(client: TorchServeClient, before: list, expected: list, timeout_s: float = 30.0) -> dict:
    """Poll until every expected delta is reached (worker metrics reach the frontend through its logs)."""
    deadline = time.monotonic() + timeout_s
    while True:
        deltas = metric_deltas(client, before, expected)
        if all(deltas[label] >= want for label, _, _, want in expected) or time.monotonic() > deadline:
            return deltas
        time.sleep(0.25)


def scenario_metrics(rig: Rig, settings: Settings) -> dict:
    result = Result("metrics", "Monitoring: exact Prometheus counts", "1 client, 7 good + 3 malformed, sequential")
    client = rig.client()
    version = default_version(client, MODEL)
    before_text = client.metrics()
    for name in DECLARED:
        result.check(f"{name} declared (# TYPE line)", f"# TYPE {name} " in before_text)
    before = parse_prometheus(before_text)
    outcomes = send_known_traffic(rig)
    want_status = [200] * GOOD_COUNT + [s for _, s, _ in BAD_TRAFFIC]
    result.check("answers 7x200, 400, 422, 400", [o.status for o in outcomes] == want_status,
                 [o.status for o in outcomes])
    expected = expected_deltas(version)
    started = time.monotonic()
    wait_for_counts(client, before, expected)
    result.figures["counts_visible_after_s"] = round(time.monotonic() - started, 2)
    time.sleep(1.5)  # a late flush would show here: the counts must be exact, not just reached
    deltas = metric_deltas(client, before, expected)
    for label, _, _, want in expected:
        result.check(f"{label} +{want}", deltas[label] == want, f"+{deltas[label]:g}")
    result["requests"] = len(outcomes)
    result["failures"] = sum(1 for o, w in zip(outcomes, want_status) if o.status != w)
    result.figures.update({"model": MODEL, "version": version, "deltas": deltas})
    return result.done()


# --- 7b. tspack serve status --------------------------------------------------------------------------


def status_cli(run_dir: str, as_json: bool = True) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "archiver.cli", "serve", "status", "--run-dir", run_dir] + (["--json"] if as_json
                                                                                             else [])
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
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


# --- 5. bad input ---------------------------------------------------------------------------------------


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
    caller = Caller(bearer(rig.handle), timeout_s=120.0)
    rows = []
    for case, target in cells:
        outcome = send_case(caller, rig, case, target)
        ok, got = judge(target, case.expect[target], outcome)
        expect = case.expect[target]
        rows.append({"case": case.name, "target": target, "expected": f"{expect.status} {expect.type or ''}".strip(),
                     "got": got, "ok": ok, "server_error": is_server_error(outcome),
                     "latency_ms": _ms(outcome.latency_s)})
    caller.close()
    return rows


def serving_check(rig: Rig) -> dict[str, bool]:
    """A good request on every path answers 200 (through the workflow: 200 without an error body)."""
    caller = Caller(bearer(rig.handle))
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


def run_known_issue(rig: Rig, issue: inputs.KnownIssue, case: inputs.Case, timeout_s: float = 120.0) -> dict:
    """Send the request that shows `issue`; then wait until the deployment serves normally again."""
    caller = Caller(bearer(rig.handle), timeout_s=timeout_s)
    outcome = send_case(caller, rig, case, issue.target)
    caller.close()
    ok, got = judge(issue.target, case.expect[issue.target], outcome)
    expect = case.expect[issue.target]
    return {"id": issue.id, "target": issue.target, "case": case.name, "where": issue.where, "summary": issue.summary,
            "expected": f"{expect.status} {expect.type or ''}".strip(), "got": got, "fixed": ok,
            "server_error": is_server_error(outcome), "latency_ms": _ms(outcome.latency_s),
            "serving_again_after_s": wait_serving(rig, timeout_s)}


def probe_encoded_dots(rig: Rig, issue: inputs.KnownIssue) -> dict:
    """K9: with the model API on, register an archive outside the store through %2e%2e."""
    outside = os.path.join(rig.root, "outside")
    os.makedirs(outside, exist_ok=True)
    shutil.copy2(os.path.join(rig.store, f"{SLOW}_v1.0.mar"), os.path.join(outside, "k9.mar"))
    client = rig.client()
    status, message = _register_status(client, f"file://{os.path.abspath(rig.store)}/%2e%2e/outside/k9.mar",
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
                "summary": issue.summary, "latency_ms": _ms(time.monotonic() - started),
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


# --- 6. security ----------------------------------------------------------------------------------------


def _status(method: str, url: str, token: Optional[str] = None, **kwargs: Any) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, url, headers=headers, timeout=30, **kwargs).status_code


def check_production(result: Result, rig: Rig) -> None:
    prod = rig.start_production()
    props = read_properties(prod.config_path)
    result.check("config: token authorization on", props.get("disable_token_authorization") == "false")
    result.check("config: model API off", props.get("enable_model_api") == "false")
    store = os.path.abspath(rig.store)
    result.check("config: allowed_urls = the local model store only",
                 props.get("allowed_urls") == f"file://{re.escape(store)}/{ARCHIVE_NAME}", props.get("allowed_urls"))
    limit = int(props.get("max_request_size", "0"))
    result.check("config: max_request_size set (64 MiB)", 0 < limit <= 64 * MIB, limit)
    with open(prod.key_file, encoding="utf-8") as f:
        keys = json.load(f)
    inference, management = keys["inference"]["key"], keys["management"]["key"]
    body = {"data": inputs.good_json()}
    refused = {f"{what} {label}": _status(method, url, token, **kw)
               for label, token in (("without a token", None), ("with a wrong token", "not-the-key"))
               for what, method, url, kw in (("ping", "GET", prod.inference_url + "/ping", {}),
                                             ("predict", "POST", prod.inference_url + f"/predictions/{MODEL}", body),
                                             ("list models", "GET", prod.management_url + "/models", {}))}
    result.check("requests without or with a wrong token refused (400)", set(refused.values()) == {400}, refused)
    result.check("the right inference key is accepted", _status("GET", prod.inference_url + "/ping", inference) == 200)
    register = _status("POST", prod.management_url + "/models", management, params={"url": f"{MODEL}_v1.0.mar"})
    result.check("register refused: model API off (405)", register == 405, register)
    result.check("metrics port answers without a token", _status("GET", prod.metrics_url + "/metrics") == 200)
    result.figures["production"] = {"refused": refused, "register": register, "max_request_size": limit}
    result["requests"] += len(refused) + 3
    rig.stop_production()


class _EvilServer:
    """A loopback HTTP server offering evil.mar (a real archive), counting how often it is fetched."""

    def __init__(self, payload: bytes):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/evil.mar"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _register_status(client: TorchServeClient, url: str, **params: Any) -> tuple[int, str]:
    try:
        client.register(url, **params)
        return 200, ""
    except ApiError as exc:
        return exc.status, str(exc)[:200]


def check_allowed_urls(result: Result, rig: Rig) -> None:
    client = rig.client()
    with open(os.path.join(rig.store, f"{SLOW}_v1.0.mar"), "rb") as f:
        payload = f.read()  # a real archive (the 1-worker one, in case a check lets it through)
    evil = _EvilServer(payload)
    try:
        status, message = _register_status(client, evil.url, model_name="evil", initial_workers=0)
    finally:
        evil.close()
    result.check("model API on: registering http://127.0.0.1:<port>/evil.mar refused, never fetched",
                 400 <= status < 500 and not evil.hits, f"{status} {message}; fetched {len(evil.hits)}x")
    outside = os.path.join(rig.root, "outside")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "evil.mar"), "wb") as f:
        f.write(payload)
    status2, message2 = _register_status(client, f"file://{outside}/evil.mar", model_name="evil", initial_workers=0)
    result.check("registering a file outside the model store refused", 400 <= status2 < 500, f"{status2} {message2}")
    status4, message4 = _register_status(client, f"file://{os.path.abspath(rig.store)}/../outside/evil.mar",
                                         model_name="evil", initial_workers=0)
    result.check("registering <store>/../outside/evil.mar refused", 400 <= status4 < 500, f"{status4} {message4}")
    status5, message5 = _register_status(client, f"file://{os.path.abspath(rig.store)}/%2e%2e/outside/evil.mar",
                                         model_name="evil", initial_workers=0)
    result.check("registering <store>/%2e%2e/outside/evil.mar refused", 400 <= status5 < 500, f"{status5} {message5}")
    status3, message3 = _allowed_control(client, rig.store, payload)
    result.check("control: an archive in the model store is accepted", status3 == 200, f"{status3} {message3}")
    result["requests"] += 4
    result.figures["allowed_urls"] = {"http": [status, message], "outside_store": [status2, message2],
                                      "store": status3}


def _allowed_control(client: TorchServeClient, store: str, payload: bytes) -> tuple[int, str]:
    """Register an archive placed directly in the model store, by its name (how tspack registers), then clean up."""
    path = os.path.join(os.path.abspath(store), "allowed-probe.mar")
    with open(path, "wb") as f:
        f.write(payload)
    status, message = _register_status(client, "allowed-probe.mar", model_name="allowed-probe", initial_workers=0)
    if status == 200:
        client.unregister("allowed-probe")
    if os.path.exists(path):
        os.remove(path)
    return status, message


def archive_limits(store: str, max_request_size: int) -> list[dict]:
    """For every tspack manifest in every archive: the recorded SHA-256 matches the weights, limits are set."""
    found = []
    for name in sorted(os.listdir(store)):
        if not name.endswith(".mar"):
            continue
        with zipfile.ZipFile(os.path.join(store, name)) as archive:
            for member in archive.namelist():
                if not member.endswith("tspack-manifest.json"):
                    continue
                manifest = json.loads(archive.read(member))
                folder = member[: -len("tspack-manifest.json")]
                weights = archive.read(folder + manifest["runtime"]["file"])
                image = manifest.get("image") or {}
                found.append({"archive": name, "manifest": member, "format": manifest["runtime"]["format"],
                              "sha256_matches": _sha256(weights) == manifest["runtime"]["sha256"],
                              "max_body_bytes": manifest.get("max_body_bytes"),
                              "image_max_bytes": image.get("max_bytes"),
                              "limits_below_frontend_cap": 0 < manifest.get("max_body_bytes", 0) < max_request_size
                              and image.get("max_bytes", 1) < max_request_size})
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scenario_security(rig: Rig, settings: Settings) -> dict:
    result = Result("security", "Security: token auth, model API, allowed_urls, size limits, weights",
                    "1 client, sequential")
    check_production(result, rig)
    check_allowed_urls(result, rig)
    limit = int(read_properties(rig.handle.config_path).get("max_request_size", "0"))
    archives = archive_limits(rig.store, limit)
    result.check("every archive records the SHA-256 of its weights (and it matches)",
                 archives and all(a["sha256_matches"] for a in archives), archives)
    result.check("every archive sets per-model limits below the frontend cap",
                 all(a["limits_below_frontend_cap"] for a in archives), archives)
    result.figures.update({"archives": archives, "integrity_refusal": "tests/integration/test_end_to_end.py::"
                           "test_worker_that_dies_at_start_fails_fast_with_its_error (a tampered model.pt: the "
                           "worker refuses to load with IntegrityError)",
                           "static_checks": "tests/unit/test_security.py"})
    return result.done()


# --- 1. zero-downtime swap ------------------------------------------------------------------------------


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
    background = Background(_good_target(rig), load, bearer(handle))
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


# --- 2. worker crash ------------------------------------------------------------------------------------


def ready_pids(client: TorchServeClient, model: str, version: str) -> list[int]:
    try:
        described = client.describe(model, version)
    except (ApiError, requests.RequestException):
        return []
    return [w["pid"] for d in described for w in d.get("workers", []) if w.get("status") == "READY"]


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
    background = Background(_good_target(rig), load, bearer(rig.handle))
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


# --- 3. overload ----------------------------------------------------------------------------------------


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
        outcomes = run_load(_good_target(rig, f"/predictions/{SLOW}"), load, bearer(rig.handle))
    rejected = sum(1 for o in outcomes if o.status == 503)
    overload_checks(result, settings, outcomes, access_log_ms(rig, offset, f"/predictions/{SLOW}", 503, rejected))
    growth_mb = (sampler.peak_tree - before) / MB
    result.check(f"memory bounded: server tree peak RSS within +{settings.overload_rss_growth_mb:g} MB",
                 growth_mb <= settings.overload_rss_growth_mb, f"{before / MB:.0f} MB -> peak "
                 f"{sampler.peak_tree / MB:.0f} MB (+{growth_mb:.0f} MB)")
    healthy_at = time.monotonic()
    ping = client.ping().get("status")
    answer = Caller(bearer(rig.handle)).post(_good_target(rig, f"/predictions/{SLOW}"))
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


# --- 4. soak --------------------------------------------------------------------------------------------


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
        background = Background(_good_target(rig), load, bearer(rig.handle))
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


# --- the run --------------------------------------------------------------------------------------------

# --- restart: a crash of the frontend, and `tspack serve start` brings back the recorded deployment ---------


def _tspack(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "archiver.cli", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=REPO)


def _restart_clients(handle_dir: str, stop: threading.Event, clients: int) -> list[tuple[float, str, str]]:
    """Closed-loop clients that read the server's key file on every call (keys change at a restart):
    (end time, status or error class, answered version) per request."""
    from archiver.operate.server import ServerHandle

    body = {"data": good_sample_list()}
    results: list[list[tuple[float, str, str]]] = [[] for _ in range(clients)]

    def run(index: int) -> None:
        client = ServerHandle.load(handle_dir).client(timeout=10)
        while not stop.is_set() and len(results[index]) < 20_000:
            try:
                response = client.predict(MODEL, body)
                version = response.json().get("version", "") if response.status_code == 200 else ""
                results[index].append((time.monotonic(), str(response.status_code), version))
            except Exception as exc:  # the server is down: connection refused, a key file being rewritten
                results[index].append((time.monotonic(), type(exc).__name__, ""))
                stop.wait(0.05)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop.wait()
    for thread in threads:
        thread.join(30)
    return sorted(r for rows in results for r in rows)


def good_sample_list() -> list:
    from benchmarks.reliability_rig import good_sample

    return good_sample().tolist()


def scenario_restart(rig: Rig, settings: Settings) -> dict:
    """digits 1.0 at start, 2.0 registered and made the default with the CLI; clients run while the java frontend
    is killed (-9) and `tspack serve start` restores the record: every answer after readiness must be 2.0."""
    from archiver.operate.server import free_ports, stop

    clients = 4
    result = Result("restart", "Restart after a frontend crash (kill -9): the recorded default comes back",
                    f"{clients} clients, closed loop, key file re-read per request")
    folder = os.path.join(rig.root, "restart")
    shutil.rmtree(folder, ignore_errors=True)
    store, run_dir = os.path.join(folder, "store"), os.path.join(folder, "run")
    os.makedirs(store)
    for name in (f"{MODEL}_v1.0.mar", f"{MODEL}_v2.0.mar"):
        shutil.copy2(os.path.join(rig.store, name), store)
    ports = [str(p) for p in free_ports(5)]
    config = os.path.join(folder, "config.properties")
    steps = [("config", "--load", f"{MODEL}_v1.0.mar", "--enable-model-api", "--model-store", store, "--out", config,
              "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2],
              "--grpc-ports", ports[3], ports[4]),
             ("serve", "start", "--config", config, "--run-dir", run_dir, "--fresh"),
             ("register", os.path.join(store, f"{MODEL}_v2.0.mar"), "--set-default", "--run-dir", run_dir)]
    try:
        for step in steps:
            done = _tspack(*step)
            if not result.check(f"tspack {step[0]} {step[1]}", done.returncode == 0, done.stderr.strip()[-300:]):
                return result.done()
        from archiver.operate.server import ServerHandle

        server_pid = ServerHandle.load(run_dir).pid
        stop_clients = threading.Event()
        collected: list = []
        worker = threading.Thread(target=lambda: collected.extend(_restart_clients(run_dir, stop_clients, clients)),
                                  daemon=True)
        worker.start()
        time.sleep(settings.swap_before_s)
        java = frontend_pid(server_pid)
        killed_at = time.monotonic()
        os.kill(java, signal.SIGKILL)
        restart = _tspack("serve", "start", "--config", config, "--run-dir", run_dir)
        ready_at = time.monotonic()
        time.sleep(settings.swap_after_s)
        stop_clients.set()
        worker.join(60)
    finally:
        stop(run_dir, quiet=True)
    result.check("tspack serve start after the crash exits 0", restart.returncode == 0,
                 (restart.stdout + restart.stderr).strip()[-400:])
    result.check("it says what it restored", "digits 2.0 (default)" in restart.stdout, restart.stdout.strip()[-300:])
    before = [r for r in collected if r[0] < killed_at]
    after = [r for r in collected if r[0] > ready_at]
    down = [r for r in collected if killed_at <= r[0] <= ready_at]
    result.check("before the crash: 2.0 answers", before and all(r[1:] == ("200", "2.0") for r in before),
                 status_counts_of(before))
    result.check("after readiness: every request answered 200 by 2.0 (the recorded default)",
                 after and all(r[1:] == ("200", "2.0") for r in after), status_counts_of(after))
    result["requests"] = len(collected)
    result["failures"] = sum(1 for r in after if r[1:] != ("200", "2.0"))
    result["recovery"] = f"{ready_at - killed_at:.1f} s from kill -9 to ready"
    result["duration_s"] = round((collected[-1][0] - collected[0][0]) if collected else 0.0, 1)
    result.figures.update({"restart_s": round(ready_at - killed_at, 2), "before": status_counts_of(before),
                           "during_downtime": status_counts_of(down), "after": status_counts_of(after)})
    return result.done()


def status_counts_of(rows: list[tuple[float, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, status, version in rows:
        key = f"{status} {version}".strip()
        counts[key] = counts.get(key, 0) + 1
    return counts


SCENARIOS: dict[str, Callable[..., dict]] = {
    "metrics": scenario_metrics, "status": scenario_status, "bad_input": scenario_bad_input,
    "security": scenario_security, "swap": scenario_swap, "crash": scenario_crash, "overload": scenario_overload,
    "soak": scenario_soak, "known_issues": scenario_known_issues, "restart": scenario_restart,
}


def run_scenario(name: str, rig: Rig, settings: Settings, bar: Any = None) -> dict:
    """Run one scenario; an exception becomes a failed row naming it, so the other scenarios still run."""
    try:
        if name == "soak" and bar is not None:
            return scenario_soak(rig, settings, progress=lambda s: bar.set_postfix_str(f"soak {s:.0f}/"
                                                                                        f"{settings.soak_s:g} s"))
        return SCENARIOS[name](rig, settings)
    except Exception as exc:  # a broken scenario is a failed row, not a lost report
        result = Result(name, name)
        result.check("scenario ran to the end", False, f"{type(exc).__name__}: {exc}")
        result.figures["traceback"] = traceback.format_exc().splitlines()[-8:]
        return result.done()


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened soak (60 s) and overload")
    parser.add_argument("--only", help=f"comma-separated scenarios, of: {','.join(SCENARIOS)}")
    parser.add_argument("--soak-s", type=float, help="soak duration in seconds")
    parser.add_argument("--work", default=os.path.join(BENCH_DIR, "work", "reliability"))
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "reliability.json"))
    parser.add_argument("--markdown", default=os.path.join(REPO, "RELIABILITY.md"))
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings.full()
    if args.soak_s:
        settings = replace(settings, soak_s=args.soak_s, soak_warmup_s=min(settings.soak_warmup_s, args.soak_s / 4))
    names = [n.strip() for n in args.only.split(",")] if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}", file=sys.stderr)
        return 2
    started, stamp = time.monotonic(), _dt.datetime.now(_dt.timezone.utc)
    bar = tqdm(total=len(names) + 1, desc="reliability", unit="step")
    bar.set_postfix_str("build archives, start TorchServe")
    rig = prepare(args.work)
    setup_s = time.monotonic() - started
    bar.update(1)
    results = []
    try:
        for name in names:
            bar.set_postfix_str(name)
            results.append(run_scenario(name, rig, settings, bar))
            row = results[-1]
            bar.write(f"{'PASS' if row['passed'] else 'FAIL'}  {row['title']}: {row['requests']} requests, "
                      f"{row['failures']} failures" + "".join(f"\n      - {c}" for c in failed_checks(row)))
            bar.update(1)
    finally:
        rig.stop()
        bar.close()
    doc = {"date": stamp.isoformat(timespec="seconds"), "command": _command(args), "machine": report.machine(),
           "settings": asdict(settings), "setup_s": round(setup_s, 1),
           "total_s": round(time.monotonic() - started, 1), "scenarios": results,
           "known_issues": [asdict(i) for i in inputs.KNOWN_ISSUES],
           "unit_issues": [asdict(i) for i in inputs.UNIT_ISSUES],
           "swap_issues": [asdict(i) for i in inputs.SWAP_ISSUES],
           "passed": all(r["passed"] for r in results)}
    report.write(doc, args.out, args.markdown)
    print(f"wrote {args.out} and {args.markdown} ({doc['total_s']:.0f} s)")
    return 0 if doc["passed"] else 1


def _command(args: argparse.Namespace) -> str:
    if args.only or args.soak_s:
        return "python -m benchmarks.reliability " + " ".join(sys.argv[1:])
    return "make reliability" + (" QUICK=1" if args.quick else "")


if __name__ == "__main__":
    sys.exit(main())
