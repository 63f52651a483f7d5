"""A text classifier built from a save_pretrained folder made here, served by a real TorchServe (issue 13).

Curl-style requests (JSON, text/plain, OIP v2 BYTES as JSON and, through tritonclient's HTTP client, in the
binary tensor extension) must equal the transformers model's in-process answers on the same texts; texts of
different lengths sent at once (TorchServe batches them) answer as if alone; bad input gets its own 4xx while the
requests sent with it are answered.
"""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import requests

pytest.importorskip("transformers")

from archiver.deploy.properties import entry_from_archive  # noqa: E402
from archiver.operate.server import stop  # noqa: E402
from archiver.optimize.pretrained import DEFAULT_TEXTS, load_pretrained  # noqa: E402
from archiver.zoo.text_classifier import untrained_folder  # noqa: E402
from tests import support  # noqa: E402

pytestmark = pytest.mark.integration

MAX_LENGTH = 24
TEXTS = ["good", "I loved this film, the acting was wonderful.", "Café au lait, s'il vous plaît!",
         "Terrible service; we waited an hour and the food was cold.", " ".join(DEFAULT_TEXTS)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return untrained_folder(str(tmp_path_factory.mktemp("hf")), DEFAULT_TEXTS * 4)


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("text-store"))
    support.build_models(store, [{
        "name": "sentiment", "version": "1.0", "source": {"pretrained": folder}, "frontend": "text",
        "text": {"max_length": MAX_LENGTH, "max_texts": 8}, "max_body_bytes": 4096,
        "serving": {"batch_size": 8, "max_batch_delay_ms": 300, "workers": 1},
        "artifacts": [{"format": "onnx"}]}])
    handle = support.start_server(str(tmp_path_factory.mktemp("text-server")), store,
                                  [entry_from_archive("sentiment_v1.0.mar", store)])
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def auth(server) -> dict:
    with open(server.key_file) as f:
        return {"Authorization": "Bearer " + json.load(f)["inference"]["key"]}


@pytest.fixture(scope="module")
def triton(server):
    httpclient = pytest.importorskip("tritonclient.http")
    client = httpclient.InferenceServerClient(server.inference_url.removeprefix("http://"))
    yield client
    client.close()


def bytes_input(texts: list[str], binary: bool = True, element: bytes | None = None):
    """tritonclient's BYTES input; `element` replaces every text's UTF-8 bytes (to send bytes that are not UTF-8)."""
    from tritonclient.http import InferInput

    tensor = InferInput("TEXT", [len(texts)], "BYTES")
    values = [element if element is not None else t.encode("utf-8") for t in texts]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def expected_logits(folder: str, texts: list[str]) -> np.ndarray:
    """transformers' own tokenizer and model, in this process."""
    from transformers import AutoTokenizer

    pretrained = load_pretrained(folder, max_length=MAX_LENGTH)
    tokens = AutoTokenizer.from_pretrained(folder, local_files_only=True)(
        texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    return pretrained.reference({n: tokens[n].astype(np.int64) for n in pretrained.input_names})["logits"]


def probabilities(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def test_json_text_plain_and_oip_answers_equal_the_transformers_model(client, folder):
    expected = expected_logits(folder, TEXTS)
    top = probabilities(expected)
    batch = client.predict("sentiment", {"texts": TEXTS})
    assert batch.status_code == 200, batch.text
    for row, p in zip(batch.json()["results"], top):
        assert row["predictions"][0]["index"] == int(p.argmax())
        assert row["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)
    assert batch.json()["results"][-1]["truncated"] is True
    plain = client.predict("sentiment", data=TEXTS[1].encode(), content_type="text/plain")
    assert plain.status_code == 200, plain.text
    assert plain.json()["predictions"][0]["probability"] == pytest.approx(float(top[1].max()), abs=1e-5)
    oip = client.predict("sentiment", {"id": "7", "inputs": [
        {"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}]})
    assert oip.status_code == 200, oip.text
    output = oip.json()["outputs"][0]
    assert oip.json()["id"] == "7" and output["name"] == "logits" and output["shape"] == [2, 2]
    np.testing.assert_allclose(np.reshape(output["data"], (2, 2)), expected[:2], atol=1e-4)


def test_texts_of_different_lengths_sent_together_get_their_own_answers_and_bad_ones_fail_alone(client, folder):
    bodies = [({"text": t}, None) for t in TEXTS] + [({"text": ""}, None), (None, b"caf\xe9"),
                                                     ({"texts": ["a"] * 9}, None)]
    answers: list = [None] * len(bodies)

    def send(i: int) -> None:
        body, raw = bodies[i]
        answers[i] = client.predict("sentiment", body, data=raw,
                                    content_type="text/plain" if raw else "application/json")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [a.status_code for a in answers] == [200] * len(TEXTS) + [400, 400, 413]
    assert [a.json()["type"] for a in answers[len(TEXTS):]] == ["empty_text", "not_utf8", "too_many_texts"]
    top = probabilities(expected_logits(folder, TEXTS))
    for answer, p in zip(answers, top):
        assert answer.json()["predictions"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-5)


def test_the_archive_ships_the_tokenizer_and_describes_its_text_spec(client):
    custom = client.describe("sentiment", "1.0", customized=True)[0]["customizedMetadata"]
    custom = json.loads(custom) if isinstance(custom, str) else custom
    assert custom["frontend"] == "text" and custom["text"]["max_length"] == MAX_LENGTH
    assert [i["name"] for i in custom["inputs"]] == ["input_ids", "attention_mask"]
    assert os.path.basename(custom["text"]["tokenizer"]) == "tokenizer.json"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_bytes_input_equals_the_transformers_model(triton, auth, folder, binary):
    from tritonclient.http import InferRequestedOutput

    texts = TEXTS[1:]
    outputs = None if binary else [InferRequestedOutput("logits", binary_data=False)]
    result = triton.infer("sentiment", [bytes_input(texts, binary)], outputs=outputs, request_id="t-1",
                          headers=dict(auth))  # a copy: infer() writes its header length into the dict
    np.testing.assert_allclose(result.as_numpy("logits"), expected_logits(folder, texts), atol=1e-4)
    response = result.get_response()
    assert response["id"] == "t-1" and response["model_name"] == "sentiment"
    assert response["parameters"]["truncated"] is True and response["parameters"]["truncated_rows"] == "3"


def test_bad_oip_text_requests_get_a_4xx_naming_the_problem(triton, server, auth):
    from tritonclient.http import InferenceServerClient, InferInput
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="element 0 is not UTF-8"):
        triton.infer("sentiment", [bytes_input(["x"], element=b"caf\xe9")], headers=dict(auth))
    numbers = InferInput("TEXT", [1], "FP32")
    numbers.set_data_from_numpy(np.zeros(1, np.float32))
    with pytest.raises(InferenceServerException, match="FP32; a text model takes BYTES"):
        triton.infer("sentiment", [numbers], headers=dict(auth))
    body, length = InferenceServerClient.generate_request_body([bytes_input(["good"])])
    cut = requests.post(f"{server.inference_url}/v2/models/sentiment/infer", data=body[:-1],
                        headers={**auth, "Inference-Header-Content-Length": str(length)})
    assert cut.status_code == 400 and cut.json()["type"] == "binary_size_mismatch", cut.text
    result = triton.infer("sentiment", [bytes_input(["good"])], headers=dict(auth))  # the worker still answers
    assert result.as_numpy("logits").shape == (1, 2)
