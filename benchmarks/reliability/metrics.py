"""Monitoring: after known traffic (7 good, 3 malformed requests), the Prometheus deltas are exact."""

from __future__ import annotations

import json
import time

from archiver.operate.client import TorchServeClient
from archiver.operate.status import metric_sum, parse_prometheus
from benchmarks.reliability import inputs
from benchmarks.reliability.load import Caller, Outcome, Target
from benchmarks.reliability.result import Result
from benchmarks.reliability.rig import MODEL, Rig, default_version
from benchmarks.reliability.settings import Settings
from handlers.metrics import DECLARED

BAD_TRAFFIC = ((b'{"data": [1, 2', 400, "malformed_json"),
               (json.dumps({"data": [[0.0] * 8] * 8}).encode(), 422, "shape_mismatch"),
               (b"", 400, "empty_body"))
GOOD_COUNT = 7


def send_known_traffic(rig: Rig) -> list[Outcome]:
    """7 good requests and 3 malformed ones, one at a time (so each is its own TorchServe batch)."""
    caller = Caller(rig.handle.authorization())
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
