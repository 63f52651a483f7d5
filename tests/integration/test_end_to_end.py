"""A real TorchServe on free ports: build, start, token-authenticated predictions, versions, batches."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import zipfile

import numpy as np
import pytest
import requests

from archiver.deploy.properties import entry_from_archive
from archiver.errors import ServerError
from archiver.operate.server import stop
from tests import support

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    """The session's archives plus one with a long batch delay, in a store of this module's own."""
    root = tmp_path_factory.mktemp("e2e-store")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    support.build_models(store, [support.digits_model(
        "batched", "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
        serving={"batch_size": 8, "max_batch_delay_ms": 400, "workers": 1})])
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("e2e-server"))
    handle = support.start_server(root, store, [entry_from_archive("digits_v1.0.mar", store),
                                                entry_from_archive("batched_v1.0.mar", store)])
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def keys(server) -> dict:
    with open(server.key_file) as f:
        return json.load(f)


def test_token_auth_is_on_and_ping_needs_the_inference_key(server):
    assert requests.get(server.inference_url + "/ping").status_code == 400
    wrong = requests.get(server.inference_url + "/ping", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 400
    right = requests.get(server.inference_url + "/ping",
                         headers={"Authorization": f"Bearer {keys(server)['inference']['key']}"})
    assert right.status_code == 200 and right.json()["status"] == "Healthy"
    body = json.dumps({"data": np.zeros((1, 8, 8)).tolist()})
    refused = requests.post(server.inference_url + "/predictions/digits", data=body,
                            headers={"Content-Type": "application/json"})
    assert refused.status_code == 400
    assert requests.get(server.management_url + "/models").status_code == 400


def test_predictions_equal_the_eager_model(client, digits_store):
    x = np.load(digits_store["samples"])["x"][:12]
    expected = support.softmax(support.eager_outputs(digits_store["weights"]["1.0"], x))
    for row, probabilities in zip(x, expected):
        response = client.predict("digits", {"data": row.tolist()}, version="1.0")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == "1.0"
        top = body["predictions"][0]
        assert top["index"] == int(probabilities.argmax())
        assert top["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_register_version_two_and_make_it_default(client, digits_store, server):
    client.register("digits_v2.0.mar")
    versions = {v["modelVersion"]: v for v in client.versions("digits")}
    assert set(versions) == {"1.0", "2.0"}
    assert all(w["status"] == "READY" for v in versions.values() for w in v["workers"])
    client.set_default("digits", "2.0")
    x = np.load(digits_store["samples"])["x"][:4]
    expected = support.eager_outputs(digits_store["weights"]["2.0"], x).argmax(1)
    for row, want in zip(x, expected):
        body = client.predict("digits", {"data": row.tolist()}).json()
        assert body["version"] == "2.0" and body["predictions"][0]["index"] == int(want)
    assert client.predict("digits", {"data": x[0].tolist()}, version="1.0").json()["version"] == "1.0"
    from archiver.operate.status import model_versions

    listed = {v["version"]: v for v in model_versions(client, "digits")}
    assert listed["2.0"]["default"] and not listed["1.0"]["default"]
    assert listed["2.0"]["built_at"] and listed["2.0"]["runtime"] == "torchscript"


def test_one_torchserve_batch_mixes_valid_and_malformed_requests(client, digits_store, server):
    x = np.load(digits_store["samples"])["x"][:5]
    bodies = [json.dumps({"data": row.tolist()}).encode() for row in x] + [
        b'{"data": [1, 2', json.dumps({"data": [[0.0] * 8] * 8}).encode(), b""]
    expected_status = [200] * 5 + [400, 422, 400]
    before = support.settled_metrics(client)
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = client.predict("batched", data=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == expected_status
    want = support.eager_outputs(digits_store["weights"]["1.0"], x).argmax(1)
    assert [r.json()["predictions"][0]["index"] for r in results[:5]] == want.tolist()
    assert [r.json()["type"] for r in results[5:]] == ["malformed_json", "shape_mismatch", "empty_body"]
    assert all(r.headers["content-type"] == "application/json" for r in results)
    wanted = {"runs": ("tspack_batches_total", {"ModelName": "batched"}),
              "rows": ("tspack_rows_total", {"ModelName": "batched"}),
              "batches": ("tspack_batch_size_count", {"ModelName": "batched"}),
              "requests": ("tspack_batch_size_sum", {"ModelName": "batched"})}
    wanted.update({kind: ("tspack_errors_total", {"ModelName": "batched", "ErrorType": kind})
                   for kind in ("malformed_json", "shape_mismatch", "empty_body")})
    deltas = support.wait_for_deltas(client, before, wanted, lambda d: d["rows"] >= 5 and d["empty_body"] >= 1)
    assert deltas == {"runs": 1, "rows": 5, "batches": 1, "requests": 8, "malformed_json": 1, "shape_mismatch": 1,
                      "empty_body": 1}, "the 8 concurrent requests should have formed one TorchServe batch"


def test_body_over_the_configured_size_gets_a_json_413(client):
    response = client.predict("digits", data=b"[" + b"0.5," * 20000 + b"0.5]", version="1.0")
    assert response.status_code == 413
    assert response.json()["type"] == "payload_too_large" and "at most 65536" in response.json()["error"]
    assert client.predict("digits", {"data": np.zeros((1, 8, 8)).tolist()}, version="1.0").status_code == 200


def test_served_handler_code_comes_from_the_archive(client, server):
    described = client.describe("digits", "1.0", customized=True)[0]["customizedMetadata"]
    described = json.loads(described) if isinstance(described, str) else described
    assert described["handler"]["code_dir"].startswith(server.tmp_dir)
    assert described["handler"]["keep_freed_memory"] is True and described["handler"]["read_ahead"] is True
    assert described["validation"]["passed"] is True


def test_worker_that_dies_at_start_fails_fast_with_its_error(store, server, tmp_path):
    """A tampered archive: the start fails within seconds naming the integrity error; the other server lives."""
    tampered_store = tmp_path / "store"
    tampered_store.mkdir()
    with zipfile.ZipFile(os.path.join(store, "digits_v1.0.mar")) as src, \
            zipfile.ZipFile(tampered_store / "digits_v1.0.mar", "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            dst.writestr(item, data + b"x" if item.filename == "model.pt" else data)
    started = time.monotonic()
    with pytest.raises(ServerError, match="IntegrityError: .*does not match"):
        support.start_server(str(tmp_path), str(tampered_store),
                             [entry_from_archive("digits_v1.0.mar", str(tampered_store))])
    assert time.monotonic() - started < 60
    assert server.client().ping()["status"] == "Healthy"


def test_workers_get_a_passive_omp_wait_policy_unless_one_is_set(client):
    """`tspack serve start` sets OMP_WAIT_POLICY=PASSIVE for workers; one already in its environment is kept
    (tests/integration/test_operate.py starts a server with one set)."""
    assert support.worker_environment(client, "digits")["OMP_WAIT_POLICY"] == os.environ.get("OMP_WAIT_POLICY",
                                                                                            "PASSIVE")
