"""Zero-wait batching in a real TorchServe (issue 14): per-request answers in a mixed burst, batches that form under
concurrency, lone requests that run alone, describe, gRPC, keep-alive, and a frontend that forgets answered jobs.

Batch sizes are read from the handler's `tspack_batch_size` histogram on the metrics port (count: model runs the
handler batched, sum: requests in them), polled for, never slept on.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse

import numpy as np
import pytest

from archiver.deploy.properties import entry_from_archive, read_properties
from archiver.operate.server import stop
from archiver.package.archive import archive_info
from tests import support

pytestmark = pytest.mark.integration

MODEL = "digits-zw"
BATCH = {"batches": ("tspack_batch_size_count", {"ModelName": MODEL}),
         "requests": ("tspack_batch_size_sum", {"ModelName": MODEL}),
         "runs": ("tspack_batches_total", {"ModelName": MODEL})}


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("zero-wait") / "store")
    support.build_models(store, [support.digits_model(
        MODEL, "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
        serving={"batch_size": 8, "batching": "zero_wait", "workers": 1})])
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    handle = support.start_server(str(tmp_path_factory.mktemp("zero-wait-server")), store,
                                  [entry_from_archive(f"{MODEL}_v1.0.mar", store)])
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 8, 8), dtype=np.float32)


def test_archive_asks_torchserve_for_the_async_worker(store):
    _, _, config = archive_info(os.path.join(store, f"{MODEL}_v1.0.mar"))
    assert config["asyncCommunication"] is True and config["batchSize"] == 1, "the frontend must not batch or wait"
    assert config["handler"]["zero_wait"] == {"max_batch": 8, "max_pending": 100}


def own_client(server):
    """A client per thread: a requests.Session is not meant to be shared between threads."""
    return server.client()


def test_mixed_burst_is_answered_per_request(server, digits_store):
    """24 concurrent requests, a third of them bad: each gets its own status and body, in any batch."""
    good = {i: x(i) for i in range(24) if i % 3}
    bad = {0: (b'{"data": [1,', "malformed_json", 400), 1: (b"", "empty_body", 400),
           2: (json.dumps({"data": np.zeros((1, 8, 7)).tolist()}).encode(), "shape_mismatch", 422)}
    bodies = [json.dumps({"data": good[i].tolist()}).encode() if i in good else bad[(i // 3) % 3][0]
              for i in range(24)]
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        own = own_client(server)
        barrier.wait()
        results[i] = own.predict(MODEL, data=bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    eager = {i: support.eager_outputs(digits_store["weights"]["1.0"], v[None]).argmax(1)[0] for i, v in good.items()}
    for i, response in enumerate(results):
        if i in good:
            assert response.status_code == 200, response.text
            assert response.json()["predictions"][0]["index"] == eager[i], f"request {i} got another's answer"
        else:
            _, kind, status = bad[(i // 3) % 3]
            assert (response.status_code, response.json()["type"]) == (status, kind), (i, response.text)
        assert response.headers["content-type"] == "application/json"


def test_batches_form_under_concurrency(server, client):
    before = support.settled_metrics(client)
    body = json.dumps({"data": x(7).tolist()}).encode()
    senders, each = 16, 4
    barrier = threading.Barrier(senders)
    statuses: list[int] = []

    def send() -> None:
        own = own_client(server)
        barrier.wait()
        for _ in range(each):
            statuses.append(own.predict(MODEL, data=body).status_code)

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * senders * each
    deltas = support.wait_for_deltas(client, before, BATCH, lambda d: d["requests"] >= senders * each)
    assert deltas["requests"] == senders * each, "every request is counted in exactly one batch"
    assert deltas["runs"] == deltas["batches"], "one model run per batch"
    assert deltas["batches"] < senders * each, f"16 concurrent clients never shared a model run: {deltas}"


def test_lone_request_runs_alone_at_once(client):
    """One client, one request at a time: each is a batch of its own, answered without waiting for company (with
    the frontend's batching it would first wait maxBatchDelay; here TorchServe does not batch at all)."""
    before = support.settled_metrics(client)
    for seed in range(6):
        assert client.predict(MODEL, {"data": x(seed).tolist()}).status_code == 200
    deltas = support.wait_for_deltas(client, before, BATCH, lambda d: d["requests"] >= 6)
    assert deltas == {"batches": 6, "requests": 6, "runs": 6}
    assert client.describe(MODEL)[0]["batchSize"] == 1


def test_describe_says_how_the_worker_batches(client):
    described = client.describe(MODEL, customized=True)[0]["customizedMetadata"]
    batching = (json.loads(described) if isinstance(described, str) else described)["batching"]
    assert batching["mode"] == "zero_wait" and batching["max_batch"] == 8 and batching["batches"] >= 1


def test_keep_alive_connection_carries_answers_in_order(server):
    """The frontend gets each answer plus an empty end-of-stream twin (handlers/zero_wait.py:release_jobs); nothing
    of the twin may reach the client, or the next answer on the same connection would be corrupt."""
    key = json.load(open(server.key_file))["inference"]["key"]
    url = urllib.parse.urlparse(server.inference_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        for seed in range(3):
            connection.request("POST", f"/predictions/{MODEL}", body=json.dumps({"data": x(seed).tolist()}),
                               headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200 and int(response.getheader("content-length")) == len(body)
            assert json.loads(body)["model"] == MODEL
            assert response.getheader("ts_stream_next") is None
    finally:
        connection.close()


def test_grpc_infer_works_in_zero_wait_mode(server, client):
    grpc = pytest.importorskip("grpc")  # noqa: F841
    from archiver.operate.oip_grpc import OipGrpcClient

    port = read_properties(os.path.join(os.path.dirname(server.run_dir), "config.properties"))["grpc_inference_port"]
    key = json.load(open(server.key_file))["inference"]["key"]
    grpc_client = OipGrpcClient(f"127.0.0.1:{port}", token=key)
    try:
        for seed in range(3):
            outputs = grpc_client.infer(MODEL, {"input": x(seed)[None]})
            assert outputs["output"].shape == (1, 10)
    finally:
        grpc_client.close()
    assert client.predict(MODEL, {"data": x(0).tolist()}).status_code == 200, "the worker survived the gRPC calls"


def live_jobs(java_pid: int) -> int:
    """RestJob objects alive in the frontend's heap (`jmap -histo:live` runs a full GC first)."""
    out = subprocess.run(["jmap", "-histo:live", str(java_pid)], capture_output=True, text=True, timeout=120).stdout
    match = re.search(r"^\s*\d+:\s+(\d+)\s+\d+\s+org\.pytorch\.serve\.job\.RestJob\s*$", out, re.MULTILINE)
    return int(match.group(1)) if match else 0


def test_frontend_forgets_answered_requests(server, client):
    """TorchServe 0.12 keeps every job it gave an async worker until an answer ends a stream; without the twin
    answers each request (its body included) would stay in the frontend's heap: one RestJob per request."""
    if shutil.which("jmap") is None:
        pytest.skip("jmap (JDK) is not installed")
    import psutil

    java = [p.pid for p in psutil.Process(server.pid).children(recursive=True) if "java" in p.name()]
    java_pid = java[0] if java else server.pid
    before = live_jobs(java_pid)
    bodies = [json.dumps({"data": x(i).tolist()}).encode() for i in range(150)] + [b'{"data": [1,'] * 50
    for body in bodies:
        assert client.predict(MODEL, data=body).status_code in (200, 400)
    assert live_jobs(java_pid) - before < 20, "answered requests stay in the frontend's heap"
