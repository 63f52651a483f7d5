"""A/B testing against a real TorchServe: the router archive (recommended) and the `.war` workflow."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from archiver.build import build
from archiver.cli import entry_from_archive
from archiver.server import stop
from archiver.spec import DeploySpec
from archiver.status import metric_sum, parse_prometheus
from handlers.routing import RoutingPolicy, Variant
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

METRICS_SETTLE_S = 2.5  # HandlerMetrics flushes counters every second
SAMPLE = {"data": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8).tolist()}


def ab_entry(version: str, b_archive: str, shadow: bool = True) -> dict:
    entry = {"name": "ab", "version": version,
             "variants": [{"name": "a", "archive": "digits_v1.0.mar", "weight": 0.5},
                          {"name": "b", "archive": b_archive, "weight": 0.5}],
             "sticky": {"header": "X-Request-Key", "field": "user"},
             "serving": {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 1}}
    if shadow:
        entry["shadow"] = {"name": "shadow", "archive": "digits-onnx_v2.0.mar"}
    return entry


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    weights3 = support.digits_weights(str(root), seed=3)
    models = [support.digits_model("digits", "2.0", digits_store["weights"]["2.0"], digits_store["samples"],
                                   artifacts=[{"format": "onnx", "id": "onnx"}]),
              support.digits_model("digits", "3.0", weights3, digits_store["samples"])]
    spec = parse(DeploySpec, {"model_store": store, "models": models,
                              "ab": [ab_entry("1.0", "digits_v2.0.mar"),
                                     ab_entry("2.0", "digits_v3.0.mar", shadow=False)]})
    result = build(spec, progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return {"store": store, "weights": {**digits_store["weights"], "3.0": weights3}}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    handle = support.start_server(str(tmp_path_factory.mktemp("ab-server")), store["store"],
                                  [entry_from_archive("ab_v1.0.mar", store["store"])])
    handle.client().register_workflow("ab_v1.0.war")
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def expected_top1(store, version: str) -> int:
    return int(support.eager_outputs(store["weights"][version], np.array(SAMPLE["data"], np.float32)[None])[0].argmax())


def ask(client, key=None, path="ab", body=SAMPLE, workflow=False):
    headers = {"X-Request-Key": key} if key is not None else {}
    if workflow:
        return client.workflow_predict(path, body, headers=headers)
    return client.predict(path, body, headers=headers)


def test_answer_names_variant_and_version_and_matches_that_variant(client, store):
    response = ask(client, "alice")
    assert response.status_code == 200
    body = response.json()
    variant = body["variant"]
    assert response.headers["X-Tspack-Variant"] == variant
    assert response.headers["X-Tspack-Model-Version"] == body["version"] == {"a": "1.0", "b": "2.0"}[variant]
    assert body["predictions"][0]["index"] == expected_top1(store, body["version"])


def test_split_over_many_keys_and_stickiness(client):
    policy = RoutingPolicy(variants=(Variant("a", 0.5), Variant("b", 0.5)), salt="ab")
    keys = [f"user-{i}" for i in range(400)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        first = list(pool.map(lambda k: ask(client, k).json()["variant"], keys))
        again = list(pool.map(lambda k: ask(client, k).json()["variant"], keys))
    assert first == again, "the same key must reach the same variant"
    assert first == [policy.choose(k).name for k in keys], "served routing = the library's stable hash"
    assert first.count("a") / len(first) == pytest.approx(0.5, abs=0.08)
    field_keyed = client.predict("ab", {**SAMPLE, "user": "user-7"}).json()["variant"]
    assert field_keyed == first[7]


def test_requests_without_a_key_reach_both_variants(client):
    seen = {ask(client).json()["variant"] for _ in range(40)}
    assert seen == {"a", "b"}


def test_workflow_routes_like_the_router(client):
    for key in ("alice", "bob", "carol", "dave"):
        via_router = ask(client, key).json()
        via_workflow = ask(client, key, workflow=True).json()
        assert via_workflow["variant"] == via_router["variant"]
        assert via_workflow["predictions"][0]["index"] == via_router["predictions"][0]["index"]


def test_bad_input_through_the_router_and_the_workflow(client):
    bad = {"data": [1, 2]}
    response = ask(client, "alice", body=bad)
    assert response.status_code == 422 and response.json()["type"] == "shape_mismatch"
    assert response.headers["X-Tspack-Variant"] in ("a", "b")
    too_long = ask(client, "x" * 300)
    assert too_long.status_code == 400 and too_long.json()["type"] == "invalid_route_key"
    # TorchServe's workflow executor always answers 200: the error comes in the body, with its status.
    via_workflow = ask(client, "alice", body=bad, workflow=True).json()
    assert via_workflow["type"] == "shape_mismatch" and via_workflow["status"] == 422


def test_shadow_runs_but_never_changes_the_answer(client, server, store):
    time.sleep(METRICS_SETTLE_S)  # counters reach Prometheus at the handler's next flush
    before = parse_prometheus(client.metrics())
    for i in range(30):
        body = ask(client, f"s{i}").json()
        assert body["predictions"][0]["index"] == expected_top1(store, body["version"])
        assert "shadow" not in json.dumps(body)
    time.sleep(METRICS_SETTLE_S)
    after = parse_prometheus(client.metrics())
    compared = sum(metric_sum(after, "tspack_shadow_total", ModelName="ab", Outcome=o)
                   - metric_sum(before, "tspack_shadow_total", ModelName="ab", Outcome=o)
                   for o in ("agree", "disagree", "dropped"))
    assert compared == 30
    for variant in ("a", "b"):
        assert metric_sum(after, "tspack_requests_total", ModelName="ab", Variant=variant, Status="200") > 0
    assert metric_sum(after, "tspack_errors_total", ModelName="ab", ErrorType="shape_mismatch") >= 1


def test_variant_swap_to_a_new_version_while_serving(client, store):
    """Router 2.0 replaces variant b (digits 2.0 -> 3.0) under load: no failed request, then b is 3.0."""
    keys = [f"swap-{i}" for i in range(40)]
    b_keys = [k for k in keys if ask(client, k).json()["variant"] == "b"]
    assert b_keys
    stop_flag, failures, versions = threading.Event(), [], set()

    def load() -> None:
        while not stop_flag.is_set():
            for key in keys:
                response = ask(client, key)
                if response.status_code != 200:
                    failures.append(response.status_code)
                else:
                    versions.add(response.json()["version"])

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        client.register("ab_v2.0.mar")
        client.set_default("ab", "2.0")
        time.sleep(1.0)
        client.unregister("ab", "1.0")
        time.sleep(0.5)
    finally:
        stop_flag.set()
        for t in threads:
            t.join()
    assert failures == []
    assert versions == {"1.0", "2.0", "3.0"}
    after = ask(client, b_keys[0]).json()
    assert after["variant"] == "b" and after["version"] == "3.0"
    assert after["predictions"][0]["index"] == expected_top1(store, "3.0")
