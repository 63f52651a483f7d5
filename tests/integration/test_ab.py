"""A/B testing against a real TorchServe: the router archive (recommended) and the `.war` workflow."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from archiver.build import build
from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.spec import DeploySpec
from handlers.routing import RoutingPolicy, Variant
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

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
    before = support.settled_metrics(client)
    bad = {"data": [1, 2]}
    response = ask(client, "alice", body=bad)
    assert response.status_code == 422 and response.json()["type"] == "shape_mismatch"
    assert response.headers["X-Tspack-Variant"] in ("a", "b")
    too_long = ask(client, "x" * 300)
    assert too_long.status_code == 400 and too_long.json()["type"] == "invalid_route_key"
    # TorchServe's workflow executor always answers 200: the error comes in the body, with its status.
    via_workflow = ask(client, "alice", body=bad, workflow=True).json()
    assert via_workflow["type"] == "shape_mismatch" and via_workflow["status"] == 422
    wanted = {kind: ("tspack_errors_total", {"ModelName": "ab", "ErrorType": kind})
              for kind in ("shape_mismatch", "invalid_route_key")}
    deltas = support.wait_for_deltas(client, before, wanted, lambda d: all(v >= 1 for v in d.values()))
    assert deltas == {"shape_mismatch": 1, "invalid_route_key": 1}, "the router counts its own errors"


def test_shadow_runs_but_never_changes_the_answer(client, store):
    before = support.settled_metrics(client)
    chosen = {"a": 0, "b": 0}
    for i in range(30):
        body = ask(client, f"s{i}").json()
        chosen[body["variant"]] += 1
        assert body["predictions"][0]["index"] == expected_top1(store, body["version"])
        assert "shadow" not in json.dumps(body)
    wanted = {o: ("tspack_shadow_total", {"ModelName": "ab", "Outcome": o})
              for o in ("agree", "disagree", "error", "dropped")}
    wanted.update({v: ("tspack_requests_total", {"ModelName": "ab", "Variant": v, "Status": "200"}) for v in chosen})
    deltas = support.wait_for_deltas(client, before, wanted,
                                     lambda d: sum(d[o] for o in ("agree", "disagree", "error", "dropped")) >= 30)
    assert deltas["agree"] + deltas["disagree"] + deltas["error"] + deltas["dropped"] == 30, deltas
    assert {v: deltas[v] for v in chosen} == chosen


@pytest.fixture
def router_1_restored(client):
    """The swap test replaces router 1.0 by 2.0; put 1.0 back as the default for the tests that follow."""
    yield
    versions = {v["modelVersion"] for v in client.versions("ab")}
    if "1.0" not in versions:
        client.register("ab_v1.0.mar")
    client.set_default("ab", "1.0")
    if "2.0" in versions:
        client.unregister("ab", "2.0")


def test_variant_swap_to_a_new_version_while_serving(client, store, router_1_restored):
    """Router 2.0 replaces variant b (digits 2.0 -> 3.0) under load: no failed request, then b is 3.0."""
    keys = [f"swap-{i}" for i in range(40)]
    b_keys = [k for k in keys if ask(client, k).json()["variant"] == "b"]
    assert b_keys
    stop_flag, failures, versions, answered = threading.Event(), [], set(), []

    def load() -> None:
        while not stop_flag.is_set():
            for key in keys:
                response = ask(client, key)
                answered.append(response.status_code)
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
        assert support.wait_until(lambda: "3.0" in versions), "router 2.0 never answered after the switch"
        client.unregister("ab", "1.0")
        served = len(answered)
        assert support.wait_until(lambda: len(answered) >= served + 40), "no traffic after retiring 1.0"
    finally:
        stop_flag.set()
        for t in threads:
            t.join()
    assert failures == []
    assert versions == {"1.0", "2.0", "3.0"}
    after = ask(client, b_keys[0]).json()
    assert after["variant"] == "b" and after["version"] == "3.0"
    assert after["predictions"][0]["index"] == expected_top1(store, "3.0")
