"""Open Inference Protocol v2 against a real TorchServe 0.12, with real clients: tritonclient's HTTP client (binary
tensor extension, its default, and JSON mode) and the OIP gRPC service through archiver.operate.oip_grpc."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import requests

from archiver.deploy.properties import entry_from_archive, read_properties
from archiver.operate.server import stop
from tests import support
from tests.support import digits_x, oip_tensor

pytestmark = pytest.mark.integration
httpclient = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("grpc")

from tritonclient.http import InferenceServerClient, InferRequestedOutput  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from archiver.operate.oip_grpc import OipGrpcClient, OipGrpcError  # noqa: E402

PAIR_MODEL = textwrap.dedent("""
    import torch


    class Pair(torch.nn.Module):
        \"\"\"Two inputs, two outputs: enough to tell inputs and outputs apart by name.\"\"\"

        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(2, 3)

        def forward(self, a, b):
            mixed = self.a(a) + self.b(b)
            return mixed, mixed.sum(dim=1, keepdim=True)
""")


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    """The session's digits archives plus a two-input, two-output model built by the archiver."""
    import shutil

    import torch

    root = tmp_path_factory.mktemp("oip-store")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    module = root / "pair.py"
    module.write_text(PAIR_MODEL)
    namespace: dict = {}
    exec(compile(PAIR_MODEL, str(module), "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["Pair"]().state_dict(), root / "pair.pt")
    rng = np.random.default_rng(0)
    np.savez(root / "pair_samples.npz", a=rng.random((16, 4), dtype=np.float32),
             b=rng.random((16, 2), dtype=np.float32), y=rng.integers(0, 3, 16))
    support.build_models(store, [{
        "name": "pair", "version": "1.0", "source": {"model_class": f"{module}:Pair", "weights": str(root / "pair.pt")},
        "inputs": [{"name": "a", "shape": [4]}, {"name": "b", "shape": [2]}], "outputs": ["mixed", "total"],
        "output": {"kind": "raw"}, "samples": {"file": str(root / "pair_samples.npz")},
        "serving": {"batch_size": 4, "max_batch_delay_ms": 5, "workers": 1}}])
    return {"store": store, "pair_samples": str(root / "pair_samples.npz"), "pair_weights": str(root / "pair.pt"),
            "pair_module": namespace["Pair"]}


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("oip-server"))
    handle = support.start_server(root, store["store"], [entry_from_archive("digits_v1.0.mar", store["store"]),
                                                         entry_from_archive("pair_v1.0.mar", store["store"])])
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def oip_url(server) -> str:
    """TorchServe's own OIP routes, on its inference port (`key`, `auth`, `triton`: tests/integration/conftest.py)."""
    return server.inference_url


@pytest.fixture(scope="module")
def grpc_client(server, key):
    port = read_properties(os.path.join(os.path.dirname(server.run_dir), "config.properties"))["grpc_inference_port"]
    client = OipGrpcClient(f"127.0.0.1:{port}", token=key)
    yield client
    client.close()


def predictions_top1(server, auth, x: np.ndarray) -> list[int]:
    response = requests.post(server.inference_url + "/predictions/digits", json={"data": x.tolist()}, headers=auth)
    assert response.status_code == 200, response.text
    return [row["predictions"][0]["index"] for row in response.json()["results"]]


# --- health and metadata ---------------------------------------------------------------------------------


def test_server_health_and_metadata_take_the_inference_token(triton, auth):
    assert triton.is_server_live(headers=auth) and triton.is_server_ready(headers=auth)
    assert triton.get_server_metadata(headers=auth)["name"] == "Torchserve"
    # TorchServe guards every inference-port route, probes included (it answers 400)
    assert not triton.is_server_live() and not triton.is_server_ready()
    with pytest.raises(InferenceServerException, match="Token Authorization failed"):
        triton.get_server_metadata()


@pytest.mark.xfail(strict=True, reason="TorchServe 0.12 has no route for /v2/models/NAME[/ready]: 404 "
                                       "(needs a gateway or frontend plugin; see the issue 15 report)")
def test_model_ready_and_metadata_over_http(triton, auth):
    assert triton.is_model_ready("digits", headers=auth)
    assert triton.get_model_metadata("digits", headers=auth)["name"] == "digits"


def test_grpc_health_metadata_and_token(grpc_client, server):
    assert grpc_client.server_live() and grpc_client.server_ready() and grpc_client.model_ready("digits")
    assert grpc_client.model_metadata("digits")["versions"] == ["1.0"]
    anonymous = OipGrpcClient(grpc_client.target, token=None)
    with pytest.raises(grpc.RpcError) as refused:
        anonymous.server_live()
    anonymous.close()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --- infer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_predictions(triton, server, auth, digits_store, binary):
    x = digits_x(digits_store, 5)
    tensor = oip_tensor("input", x, "FP32", binary)
    outputs = None if binary else [InferRequestedOutput("output", binary_data=False)]
    result = triton.infer("digits", [tensor], outputs=outputs, request_id="r-1", headers=dict(auth))
    logits = result.as_numpy("output")
    expected = support.eager_outputs(digits_store["weights"]["1.0"], x)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert logits.argmax(1).tolist() == predictions_top1(server, auth, x)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_name"] == "digits" and response["model_version"] == "1.0"


def test_two_inputs_and_a_requested_output_subset(triton, auth, store):
    import torch

    samples = np.load(store["pair_samples"])
    a, b = samples["a"][:3], samples["b"][:3]
    # order is free: names count
    inputs = [oip_tensor("b", b, "FP32"), oip_tensor("a", a, "FP32", binary=False)]
    result = triton.infer("pair", inputs, outputs=[InferRequestedOutput("total")], parameters={"note": "kept"},
                          headers=dict(auth))
    model = store["pair_module"]()
    model.load_state_dict(torch.load(store["pair_weights"], weights_only=True))
    with torch.inference_mode():
        _, total = model(torch.from_numpy(a), torch.from_numpy(b))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["total"]
    np.testing.assert_allclose(result.as_numpy("total"), total.numpy(), atol=1e-5)
    assert result.get_response()["parameters"] == {"note": "kept"}


def test_grpc_infer_equals_predictions(grpc_client, server, auth, digits_store):
    x = digits_x(digits_store, 3)
    outputs = grpc_client.infer("digits", {"input": x}, request_id="g-1")
    np.testing.assert_allclose(outputs["output"], support.eager_outputs(digits_store["weights"]["1.0"], x),
                               atol=1e-4)
    assert outputs["output"].argmax(1).tolist() == predictions_top1(server, auth, x)


def test_versioned_infer_goes_through_predictions(server, auth, digits_store):
    """TorchServe 0.12 answers /v2/models/NAME/versions/V/infer with 501; /predictions/NAME/V takes the same body."""
    x = digits_x(digits_store, 2)
    body = {"id": "v", "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}
    versioned = requests.post(server.inference_url + "/v2/models/digits/versions/1.0/infer", json=body, headers=auth)
    assert versioned.status_code == 501
    answer = requests.post(server.inference_url + "/predictions/digits/1.0", json=body, headers=auth)
    assert answer.status_code == 200 and answer.json()["model_version"] == "1.0"


# --- malformed requests ----------------------------------------------------------------------------------


def raw_infer(server, auth, model: str, body: bytes, header_length=None) -> requests.Response:
    return support.oip_post(f"{server.inference_url}/v2/models/{model}/infer", auth, body, header_length)


def test_binary_sizes_that_disagree_with_the_payload_get_a_4xx(server, auth, digits_store):
    x = digits_x(digits_store, 1)
    body, length = InferenceServerClient.generate_request_body([oip_tensor("input", x, "FP32")])
    response = raw_infer(server, auth, "digits", body[:-4], length)
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "binary_size_mismatch"
    assert "binary" in response.json()["error"]


@pytest.mark.parametrize("model, inputs, status, kind", [
    ("digits", [{"name": "input", "shape": [1, 8, 8], "datatype": "FP8", "data": [0] * 64}], 400,
     "unsupported_datatype"),
    ("pair", [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}], 422, "missing_input"),
    ("pair", [{"name": "a", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4},
              {"name": "b", "shape": [1, 2], "datatype": "FP32", "data": [0.0] * 2},
              {"name": "c", "shape": [1], "datatype": "FP32", "data": [0.0]}], 422, "unknown_input"),
])
def test_malformed_json_requests_get_a_typed_4xx(server, auth, model, inputs, status, kind):
    response = raw_infer(server, auth, model, json.dumps({"inputs": inputs}).encode())
    assert response.status_code == status, response.text
    assert response.json()["type"] == kind and response.json()["error"]


def test_tritonclient_shows_the_error_message(triton, auth):
    tensor = oip_tensor("input", np.zeros((1, 8, 7), np.float32), "FP32")
    with pytest.raises(InferenceServerException, match="must have shape"):
        triton.infer("digits", [tensor], headers=auth)


def test_grpc_refusal_keeps_the_worker_alive(grpc_client, digits_store):
    """TorchServe's gRPC bridge crashes the worker on an answer without id/outputs; ours carries an error output."""
    with pytest.raises(OipGrpcError, match="shape"):
        grpc_client.infer("digits", {"input": np.zeros((1, 8, 7), np.float32)})
    x = digits_x(digits_store, 1)
    np.testing.assert_allclose(grpc_client.infer("digits", {"input": x})["output"],
                               support.eager_outputs(digits_store["weights"]["1.0"], x), atol=1e-4)
