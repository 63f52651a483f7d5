"""The tspack OIP gateway (archiver/operate/oip_gateway.py) in front of a real TorchServe 0.12, with tritonclient's HTTP
client in its default binary mode and in JSON mode: probes without a token, metadata with it, infer equal to
/predictions for a tensor model, a two-input model and a text model, versioned infer, OIP errors for malformed
requests; and the gateway's life: `tspack serve start` starts it, `serve stop` ends it, and it exits when TorchServe
dies."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest
import requests

from archiver.deploy.properties import entry_from_archive
from archiver.operate import oip_process
from archiver.operate.server import ServerHandle, free_ports, start, stop
from tests import support
from tests.support import digits_x, oip_tensor

pytestmark = pytest.mark.integration
pytest.importorskip("tritonclient.http")

from tritonclient.http import InferenceServerClient, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
IDS = np.array([[5, 17, 99, 3, 8], [4, 4, 4, 0, 0]], dtype=np.int64)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
TEXTS = ["I loved this film, the acting was wonderful.", "Terrible service; we waited an hour."]


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    """The session's digits 1.0 and 2.0, a two-input model (input_ids, attention_mask -> logits, pooled) and, where
    transformers is installed, a text classifier built from a save_pretrained folder."""
    root = tmp_path_factory.mktemp("gateway-store")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    models = [support.token_model(str(root), [{"format": "onnx"}])]
    if HAS_TRANSFORMERS:
        from archiver.optimize.pretrained import DEFAULT_TEXTS
        from archiver.zoo.text_classifier import untrained_folder

        folder = untrained_folder(str(root / "hf"), DEFAULT_TEXTS * 4)
        models.append({"name": "sentiment", "version": "1.0", "source": {"pretrained": folder}, "frontend": "text",
                       "text": {"max_length": 24, "max_texts": 8},
                       "serving": {"batch_size": 8, "max_batch_delay_ms": 5, "workers": 1},
                       "artifacts": [{"format": "onnx"}]})
    support.build_models(store, models)
    return {"store": store, "root": str(root), "weights": digits_store["weights"], "samples": digits_store["samples"]}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    names = ["digits_v1.0.mar", "digits_v2.0.mar", "sequence_v1.0.mar"]  # digits 1.0 loads first: the default
    names += ["sentiment_v1.0.mar"] if HAS_TRANSFORMERS else []
    handle = support.start_server(str(tmp_path_factory.mktemp("gateway-server")), store["store"],
                                  [entry_from_archive(n, store["store"]) for n in names],
                                  oip_port=free_ports(1)[0])
    client = InferenceServerClient(handle.oip_url.removeprefix("http://"))
    # start() waits for each model's default version; the probe says when digits 2.0 is up too
    assert support.wait_until(lambda: client.is_model_ready("digits", "2.0"), timeout_s=120)
    client.close()
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def oip_url(server) -> str:
    """The gateway, not TorchServe: every OIP call of this module goes through it (`key`, `auth`, `triton`:
    tests/integration/conftest.py)."""
    return server.oip_url


def predictions(server, auth, model: str, body: dict, version: str = "") -> dict:
    """TorchServe's own /predictions answer, straight from its inference port."""
    path = f"{server.inference_url}/predictions/{model}" + (f"/{version}" if version else "")
    response = requests.post(path, json=body, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


def oip_body(**arrays: np.ndarray) -> dict:
    datatypes = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}
    return {"inputs": [{"name": n, "shape": list(a.shape), "datatype": datatypes[a.dtype], "data": a.ravel().tolist()}
                       for n, a in arrays.items()]}


# --- probes and metadata ----------------------------------------------------------------------------------


def test_probes_take_no_token_and_metadata_takes_the_inference_key(triton, auth):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("digits") and triton.is_model_ready("digits", "2.0")
    assert triton.is_model_ready("sequence")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready("digits", "9.9")
    assert triton.get_server_metadata(headers=auth) == {"name": "tspack", "version": "0.1.0",
                                                        "extensions": ["binary_tensor_data"]}
    assert triton.get_model_metadata("digits", headers=auth)["versions"] == ["1.0", "2.0"]
    for call in (triton.get_server_metadata, lambda **kw: triton.get_model_metadata("digits", **kw)):
        with pytest.raises(InferenceServerException, match="Token Authorization failed"):
            call()
        with pytest.raises(InferenceServerException, match="Token Authorization failed"):
            call(headers={"Authorization": "Bearer wrong"})
    with pytest.raises(InferenceServerException, match="model 'nope' is not registered"):
        triton.get_model_metadata("nope", headers=auth)


def test_model_metadata_names_each_tensor_with_its_datatype_and_shape(triton, auth):
    digits = triton.get_model_metadata("digits", "2.0", headers=auth)
    assert digits == {"name": "digits", "versions": ["2.0"], "platform": "pytorch_libtorch",
                      "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
                      "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]}
    sequence = triton.get_model_metadata("sequence", headers=auth)
    assert sequence["platform"] == "onnxruntime_onnx"
    assert sequence["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
    assert sequence["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]},
                                   {"name": "pooled", "datatype": "FP32", "shape": [-1, 32]}]
    if HAS_TRANSFORMERS:
        sentiment = triton.get_model_metadata("sentiment", headers=auth)
        assert sentiment["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        assert sentiment["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]}]


def test_server_ready_waits_for_every_models_worker(server, triton):
    management = server.client()
    management.register("digits_v1.0.mar", model_name="idle")  # the archive's own model-config.yaml: 1 worker
    try:
        management.scale("idle", min_worker=0, max_worker=0)
        assert not triton.is_server_ready() and not triton.is_model_ready("idle")
        answer = requests.get(server.oip_url + "/v2/health/ready")
        assert answer.status_code == 400 and "idle" in answer.json()["error"], answer.text
    finally:
        management.unregister("idle")
    assert triton.is_server_ready()


# --- infer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tensor_infer_through_the_gateway_equals_predictions(triton, server, auth, store, binary):
    x = digits_x(store, 5)
    outputs = None if binary else [InferRequestedOutput("output", binary_data=False)]
    result = triton.infer("digits", [oip_tensor("input", x, "FP32", binary)], outputs=outputs, request_id="g-1",
                          headers=dict(auth))
    direct = predictions(server, auth, "digits", oip_body(input=x))["outputs"][0]
    np.testing.assert_allclose(result.as_numpy("output"), np.reshape(direct["data"], direct["shape"]), atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("output"), support.eager_outputs(store["weights"]["1.0"], x),
                               atol=1e-4)
    top1 = [row["predictions"][0]["index"] for row in predictions(server, auth, "digits", {"data": x.tolist()})[
        "results"]]
    assert result.as_numpy("output").argmax(1).tolist() == top1
    response = result.get_response()
    assert response["id"] == "g-1" and response["model_name"] == "digits" and response["model_version"] == "1.0"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_two_inputs_through_the_gateway_equal_predictions(triton, server, auth, store, binary):
    inputs = [oip_tensor("attention_mask", MASK, "INT64", binary), oip_tensor("input_ids", IDS, "INT64", binary)]
    result = triton.infer("sequence", inputs, outputs=[InferRequestedOutput(n, binary_data=binary)
                                                       for n in ("logits", "pooled")], headers=dict(auth))
    by_name = predictions(server, auth, "sequence", {"input_ids": IDS.tolist(), "attention_mask": MASK.tolist()})
    expected = support.token_eager(store["root"], IDS, MASK)
    for name in ("logits", "pooled"):
        served = np.array([row["outputs"][name] for row in by_name["results"]])
        np.testing.assert_allclose(result.as_numpy(name), served, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result.as_numpy(name), expected[name], rtol=1e-4, atol=1e-5)
    subset = triton.infer("sequence", inputs, outputs=[InferRequestedOutput("pooled")], headers=dict(auth))
    assert [o["name"] for o in subset.get_response()["outputs"]] == ["pooled"]


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the text fixture builds from a transformers save_pretrained folder")
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_text_through_the_gateway_equals_predictions(triton, server, auth, binary):
    texts = np.array([t.encode("utf-8") for t in TEXTS], dtype=np.object_)
    result = triton.infer("sentiment", [oip_tensor("TEXT", texts, "BYTES", binary)],
                          outputs=[InferRequestedOutput("logits", binary_data=binary)], headers=dict(auth))
    logits = result.as_numpy("logits")
    direct = predictions(server, auth, "sentiment", {"inputs": [
        {"name": "text", "shape": [len(TEXTS)], "datatype": "BYTES", "data": TEXTS}]})["outputs"][0]
    np.testing.assert_allclose(logits, np.reshape(direct["data"], direct["shape"]), atol=1e-5)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    for row, p in zip(predictions(server, auth, "sentiment", {"texts": TEXTS})["results"], probabilities):
        assert row["predictions"][0]["index"] == int(p.argmax())
        assert row["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_versioned_infer_picks_that_version(triton, auth, store):
    x = digits_x(store, 3)
    for version in ("2.0", "1.0"):
        result = triton.infer("digits", [oip_tensor("input", x, "FP32")], model_version=version,
                              headers=dict(auth))
        assert result.get_response()["model_version"] == version
        np.testing.assert_allclose(result.as_numpy("output"), support.eager_outputs(store["weights"][version], x),
                                   atol=1e-4)
    assert not np.allclose(support.eager_outputs(store["weights"]["1.0"], x),
                           support.eager_outputs(store["weights"]["2.0"], x), atol=1e-2)


# --- malformed requests ----------------------------------------------------------------------------------


def gateway_post(server, auth, path: str, body: bytes, header_length=None) -> requests.Response:
    return support.oip_post(server.oip_url + path, auth, body, header_length)


def binary_digits_body(store) -> tuple[bytes, int]:
    return InferenceServerClient.generate_request_body([oip_tensor("input", digits_x(store, 1), "FP32")])


BAD = {
    "binary sizes disagree with the payload": (
        "/v2/models/digits/infer", lambda store: (binary_digits_body(store)[0][:-4], binary_digits_body(store)[1]),
        400, "binary_size_mismatch", "binary"),
    "header length past the body": (
        "/v2/models/digits/infer", lambda store: (binary_digits_body(store)[0], 10_000), 400, "binary_size_mismatch",
        "Inference-Header-Content-Length"),
    "unknown datatype": (
        "/v2/models/digits/infer", lambda store: (json.dumps({"inputs": [
            {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP8", "data": [0] * 64}]}).encode(), None),
        400, "unsupported_datatype", "FP8"),
    "missing input": (
        "/v2/models/sequence/infer", lambda store: (json.dumps(oip_body(input_ids=IDS)).encode(), None), 422,
        "missing_input", "attention_mask"),
    "unknown model": (
        "/v2/models/nope/infer", lambda store: (json.dumps(oip_body(input=digits_x(store, 1))).encode(), None), 404,
        "ModelNotFoundException", "Model not found: nope"),
    "unknown version": (
        "/v2/models/digits/versions/9.9/infer",
        lambda store: (json.dumps(oip_body(input=digits_x(store, 1))).encode(), None), 404,
        "ModelVersionNotFoundException", "9.9"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_requests_get_a_4xx_with_an_oip_error_body(server, auth, store, case):
    path, make, status, kind, named = BAD[case]
    body, header_length = make(store)
    response = gateway_post(server, auth, path, body, header_length)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["type"] == kind and named in answer["error"], answer


def test_refusals_reach_tritonclient_and_the_connection_keeps_serving(triton, auth, store):
    with pytest.raises(InferenceServerException, match="must have shape"):
        triton.infer("digits", [oip_tensor("input", np.zeros((1, 8, 7), np.float32), "FP32")], headers=dict(auth))
    with pytest.raises(InferenceServerException, match="Token Authorization failed"):
        triton.infer("digits", [oip_tensor("input", digits_x(store, 1), "FP32")])
    x = digits_x(store, 1)
    result = triton.infer("digits", [oip_tensor("input", x, "FP32")], headers=dict(auth))
    np.testing.assert_allclose(result.as_numpy("output"), support.eager_outputs(store["weights"]["1.0"], x),
                               atol=1e-4)


def test_unknown_routes_and_methods_get_oip_errors(server, auth):
    missing = requests.get(server.oip_url + "/v2/repository/index", headers=auth)
    assert missing.status_code == 404 and missing.json()["type"] == "route_not_found", missing.text
    wrong = requests.get(server.oip_url + "/v2/models/digits/infer", headers=auth)
    assert wrong.status_code == 405 and "takes POST" in wrong.json()["error"], wrong.text


# --- the gateway's life ------------------------------------------------------------------------------------


def port_open(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, int(port))) == 0


def test_serve_start_runs_the_gateway_and_serve_stop_ends_it(store, tmp_path):
    work = str(tmp_path)
    model_store = shutil.copytree(store["store"], os.path.join(work, "store"))
    run_dir, config = os.path.join(work, "run"), os.path.join(work, "config.properties")
    ports = [str(p) for p in free_ports(6)]
    written = support.tspack("config", "--model-store", model_store, "--load", "digits_v1.0.mar",
                             "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2],
                             "--grpc-ports", ports[3], ports[4], "--oip-port", ports[5], "--out", config, cwd=work)
    assert written.returncode == 0, written.stderr
    assert f"OIP gateway: http://127.0.0.1:{ports[5]}" in written.stdout
    started = support.tspack("serve", "start", "--config", config, "--run-dir", run_dir, cwd=work)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        handle = ServerHandle.load(run_dir)
        assert f"OIP v2 gateway (pid {handle.oip_pid}): http://127.0.0.1:{ports[5]}/v2" in started.stdout
        assert oip_process.running(handle.oip_pid, handle.run_dir)
        assert requests.get(handle.oip_url + "/v2/health/ready").status_code == 200
        status = support.tspack("serve", "status", "--run-dir", run_dir, cwd=work)
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"OIP v2: POST {handle.oip_url}/v2/models/digits[/versions/VERSION]/infer" in status.stdout
        assert f"OIP v2 gateway {handle.oip_url} (pid {handle.oip_pid}): running" in status.stdout
        versions = support.tspack("versions", "digits", "--run-dir", run_dir, cwd=work)
        assert f"{handle.oip_url}/v2/models/digits[/versions/VERSION]/infer" in versions.stdout, versions.stderr
    finally:
        stopped = support.tspack("serve", "stop", "--run-dir", run_dir, cwd=work)
        stop(run_dir, quiet=True)
    assert stopped.returncode == 0 and "TorchServe stopped" in stopped.stdout, stopped.stderr
    assert not oip_process.running(handle.oip_pid, handle.run_dir)
    assert not port_open(handle.oip_url)


def frontend_pid(launcher: int) -> int:
    with open(f"/proc/{launcher}/task/{launcher}/children", encoding="ascii") as f:
        children = [int(p) for p in f.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"org.pytorch.serve" in f.read():
                return pid
    raise AssertionError(f"no Java frontend under the launcher {launcher}")


def test_the_gateway_exits_when_torchserve_dies_and_a_restart_gets_its_port_back(store, tmp_path):
    port = free_ports(1)[0]
    entries = [entry_from_archive("digits_v1.0.mar", store["store"])]
    handle = support.start_server(str(tmp_path), store["store"], entries, oip_port=port)
    try:
        assert oip_process.running(handle.oip_pid, handle.run_dir)
        os.kill(frontend_pid(handle.pid), signal.SIGKILL)  # an OOM kill, say: nobody runs `serve stop`
        assert support.wait_until(lambda: not oip_process.running(handle.oip_pid, handle.run_dir), timeout_s=30)
        assert support.wait_until(lambda: not port_open(handle.oip_url), timeout_s=10)
        again = start(os.path.join(str(tmp_path), "config.properties"), handle.run_dir, timeout_s=180)
        assert again.oip_url == handle.oip_url and again.oip_pid != handle.oip_pid
        assert requests.get(again.oip_url + "/v2/health/live").status_code == 200
    finally:
        stop(handle.run_dir, quiet=True)
