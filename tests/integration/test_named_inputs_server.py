"""A two-input, dict-output archive in a real TorchServe (issue 12): JSON by input name, OIP v2 and .npz requests
answer what the eager model answers, and a batch mixing a good request with one that lacks an input answers
200 + 422."""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest

from archiver.build import build
from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.spec import DeploySpec
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

IDS = np.array([[5, 17, 99, 3, 8], [4, 4, 4, 0, 0]], dtype=np.int64)
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("named-server")
    store = str(root / "store")
    # A long batch delay, so that concurrent requests share a batch.
    model = support.token_model(str(root), [{"format": "onnx"}],
                                serving={"batch_size": 8, "max_batch_delay_ms": 300, "workers": 1})
    result = build(parse(DeploySpec, {"model_store": store, "models": [model]}), progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    handle = support.start_server(str(root / "server"), store, [entry_from_archive("sequence_v1.0.mar", store)])
    yield {"handle": handle, "client": handle.client(), "root": str(root),
           "expected": support.token_eager(str(root), IDS, MASK)}
    stop(handle.run_dir)


def outputs_of(answer: dict) -> dict[str, np.ndarray]:
    return {name: np.array([row["outputs"][name] for row in answer["results"]]) for name in ("logits", "pooled")}


def test_json_by_name_equals_eager(served):
    response = served["client"].predict("sequence", {"input_ids": IDS.tolist(), "attention_mask": MASK.tolist()})
    assert response.status_code == 200, response.text
    for name, values in outputs_of(response.json()).items():
        np.testing.assert_allclose(values, served["expected"][name], rtol=1e-4, atol=1e-5)


def test_npz_body_equals_eager(served):
    buffer = io.BytesIO()
    np.savez(buffer, input_ids=IDS, attention_mask=MASK)
    response = served["client"].predict("sequence", data=buffer.getvalue(), content_type="application/octet-stream")
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(outputs_of(response.json())["logits"], served["expected"]["logits"], rtol=1e-4,
                               atol=1e-5)


def test_oip_v2_with_several_inputs_answers_every_output_with_its_name_shape_and_datatype(served):
    body = {"id": "req-7", "inputs": [
        {"name": "input_ids", "shape": list(IDS.shape), "datatype": "INT64", "data": IDS.ravel().tolist()},
        {"name": "attention_mask", "shape": list(MASK.shape), "datatype": "INT64", "data": MASK.ravel().tolist()}]}
    response = served["client"].request("inference", "POST", "/v2/models/sequence/infer", data=json.dumps(body),
                                        headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "req-7" and answer["model_name"] == "sequence"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["logits"]["shape"] == [2, 4] and outputs["logits"]["datatype"] == "FP32"
    assert outputs["pooled"]["shape"] == [2, 32]
    np.testing.assert_allclose(np.reshape(outputs["logits"]["data"], (2, 4)), served["expected"]["logits"],
                               rtol=1e-4, atol=1e-5)


def test_a_batch_mixing_a_good_request_and_one_without_an_input_answers_200_and_422(served):
    client = served["client"]
    good = {"input_ids": IDS[:1].tolist(), "attention_mask": MASK[:1].tolist()}
    bad = {"input_ids": IDS[:1].tolist()}
    answers: dict[str, object] = {}

    def send(name: str, body: dict) -> None:
        answers[name] = client.predict("sequence", body)

    threads = [threading.Thread(target=send, args=item) for item in (("good", good), ("bad", bad))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers["good"].status_code == 200, answers["good"].text
    assert answers["bad"].status_code == 422
    assert answers["bad"].json() == {"error": "input 'attention_mask' is missing; this model takes: input_ids, "
                                              "attention_mask", "type": "missing_input", "status": 422}
    np.testing.assert_allclose(outputs_of(answers["good"].json())["logits"], served["expected"]["logits"][:1],
                               rtol=1e-4, atol=1e-5)
