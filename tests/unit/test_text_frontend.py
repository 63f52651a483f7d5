"""The text front end on a real save_pretrained folder: tokenization, truncation, padding, bad input.

The model is a tiny untrained BERT with a WordPiece tokenizer trained here on real sentences; the "runtime" is the
transformers model itself, so padding invariance is checked on the model's own answers.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("transformers")

from archiver.optimize.pretrained import DEFAULT_TEXTS, load_pretrained  # noqa: E402
from archiver.zoo.text_classifier import untrained_folder  # noqa: E402
from handlers.frontends.text import TextFrontend  # noqa: E402
from handlers.pipeline import Pipeline  # noqa: E402
from handlers.request import Decoded, Request  # noqa: E402
from handlers.spec import ArtifactManifest, RuntimeSpec  # noqa: E402
from handlers.text import TextHandler  # noqa: E402

MAX_LENGTH = 16
MAX_TEXTS = 4
MAX_BODY = 2000
TEXTS = ("good", "I loved this film, the acting was wonderful.", "Café au lait, s'il vous plaît!",
         "Terrible service; we waited an hour and the food was cold.")
LONG = " ".join(DEFAULT_TEXTS)  # well over MAX_LENGTH tokens


class EagerRuntime:
    """Runs the transformers model on named arrays: the reference the exported runtimes are validated against."""

    name = "eager"

    def __init__(self, pretrained):
        self.pretrained = pretrained

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.pretrained.reference(inputs)

    def describe(self) -> dict:
        return {"runtime": self.name}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return untrained_folder(str(tmp_path_factory.mktemp("hf")), DEFAULT_TEXTS * 4)


@pytest.fixture(scope="module")
def pretrained(folder):
    return load_pretrained(folder, max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def manifest(pretrained):
    from dataclasses import replace

    return ArtifactManifest(
        name="sentiment", version="1.0", frontend="text",
        runtime=RuntimeSpec(format="onnx", file="model.onnx", sha256="0" * 64),
        inputs=pretrained.input_specs(), outputs=pretrained.output_names, output=pretrained.output_spec(top_k=2),
        text=replace(pretrained.text, max_texts=MAX_TEXTS), max_body_bytes=MAX_BODY)


@pytest.fixture(scope="module")
def frontend(manifest, folder):
    return TextFrontend(manifest, folder)


@pytest.fixture(scope="module")
def pipeline(manifest, frontend, pretrained):
    return Pipeline(manifest, frontend, EagerRuntime(pretrained))


def request(body, content_type="application/json") -> Request:
    raw = json.dumps(body).encode() if not isinstance(body, (bytes, str)) else body
    return Request(payload=raw, content_type=content_type)


def logits(pretrained, decoded: Decoded) -> np.ndarray:
    return pretrained.reference(decoded.inputs)["logits"]


def oip_binary(texts, shape=None, outputs=None, request_id="", element=None) -> Request:
    """An OIP request as tritonclient's HTTP client sends it by default: BYTES in the binary tensor extension.

    element: raw bytes for every element instead of the texts' UTF-8 (to send bytes that are not UTF-8).
    """
    from tritonclient.http import InferenceServerClient, InferInput

    values = [element if element is not None else t.encode("utf-8") for t in texts]
    array = np.array(values, dtype=np.object_).reshape(shape or [len(values)])
    tensor = InferInput("TEXT", list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    body, length = InferenceServerClient.generate_request_body([tensor], outputs=outputs, request_id=request_id)
    return Request(payload=body, headers={"inference-header-content-length": str(length)})


def raw_oip(data: bytes, shape=(1,)) -> Request:
    """A binary OIP request written by hand: one BYTES input whose binary data is `data`, as is."""
    header = json.dumps({"inputs": [{"name": "t", "shape": list(shape), "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return Request(payload=header + data, headers={"inference-header-content-length": str(len(header))})


def oip_result(answer):
    """tritonclient's own reading of an answer (binary or JSON outputs)."""
    from tritonclient.http import InferenceServerClient

    length = answer.headers.get("Inference-Header-Content-Length")
    return InferenceServerClient.parse_response_body(answer.raw, header_length=int(length) if length else None)


# --- tokenization -------------------------------------------------------------------------------------------


def test_tokenization_equals_transformers_tokenizer_on_the_same_files(frontend, folder):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    texts = [*TEXTS, LONG, "  spaces\tand\nnewlines  ", "ÉMOJI 🙂 and ü"]
    expected = reference(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    inputs, truncated = frontend.encoder.encode(texts)
    assert set(inputs) == {"input_ids", "attention_mask"} and truncated == [False] * 4 + [True, False, False]
    for name in inputs:
        np.testing.assert_array_equal(inputs[name], expected[name])
        assert inputs[name].dtype == np.int64


def test_a_request_is_padded_to_its_own_longest_text_not_to_max_length(frontend):
    decoded = frontend.decode(request({"texts": ["good", "not bad at all"]}))
    ids, mask = decoded.inputs["input_ids"], decoded.inputs["attention_mask"]
    assert ids.shape[1] == int(mask.sum(1).max()) < MAX_LENGTH
    assert ids[0, mask[0] == 0].tolist() == [frontend.spec.pad_id] * int((mask[0] == 0).sum())


# --- truncation ---------------------------------------------------------------------------------------------


def test_long_text_is_truncated_to_max_length_keeping_the_closing_token(frontend, folder):
    from transformers import AutoTokenizer

    sep = AutoTokenizer.from_pretrained(folder, local_files_only=True).sep_token_id
    decoded = frontend.decode(request({"texts": [LONG, "good"]}))
    assert decoded.meta["truncated"] == [True, False]
    assert decoded.inputs["input_ids"].shape[1] == MAX_LENGTH
    assert decoded.inputs["input_ids"][0, -1] == sep


def test_the_answer_says_truncated_only_for_the_truncated_text(pipeline):
    (batch, single, short) = pipeline.process([request({"texts": ["good", LONG]}), request({"text": LONG}),
                                               request({"text": "good"})])
    assert [a.status for a in (batch, single, short)] == [200, 200, 200]
    assert "truncated" not in batch.body["results"][0] and batch.body["results"][1]["truncated"] is True
    assert single.body["truncated"] is True
    assert "truncated" not in short.body


# --- padding ------------------------------------------------------------------------------------------------


def test_same_text_alone_and_inside_a_padded_batch_gets_the_same_answer(frontend, pretrained):
    items = [frontend.decode(request({"text": t})) for t in TEXTS] + [frontend.decode(request({"texts": [LONG]}))]
    lengths = [item.inputs["input_ids"].shape[1] for item in items]
    batch = frontend.encoder.pad([item.inputs for item in items])
    assert batch["input_ids"].shape == (len(items), max(lengths)) and len(set(lengths)) > 2
    together = pretrained.reference(batch)["logits"]
    alone = np.concatenate([logits(pretrained, item) for item in items])
    assert np.ptp(alone, axis=0).max() > 1e-2  # the texts get different answers, so the check below has teeth
    np.testing.assert_allclose(together, alone, atol=1e-5)
    padded_to_max = frontend.encoder.pad([item.inputs for item in items], length=MAX_LENGTH)
    np.testing.assert_allclose(pretrained.reference(padded_to_max)["logits"], alone, atol=1e-5)


def test_collate_pads_each_run_to_its_own_longest_row_and_answers_as_if_alone(frontend, pretrained):
    texts = ["good", "ok", "not bad", "fine", TEXTS[1], "great", "bad", "meh", "nice", TEXTS[2]]
    items = [frontend.decode(request({"text": t})) for t in texts] + [frontend.decode(request({"texts": [LONG] * 4}))]
    runs = frontend.collate(items)
    assert len(runs) > 1  # short texts beside many long rows run apart: the check below covers several runs
    assert sorted(i for positions, _ in runs for i in positions) == list(range(len(items)))
    for positions, batch in runs:
        lengths = [items[i].inputs["input_ids"].shape[1] for i in positions]
        assert batch["input_ids"].shape == (sum(items[i].rows for i in positions), max(lengths))
        alone = np.concatenate([logits(pretrained, items[i]) for i in positions])
        np.testing.assert_allclose(pretrained.reference(batch)["logits"], alone, atol=1e-5)


@pytest.mark.parametrize("lengths, rows, run_cost, expected", [
    ([5, 5, 5], [1, 1, 1], 64, [[0, 1, 2]]),                 # one length: one run
    ([30, 4, 5, 31], [1, 1, 1, 1], 64, [[1, 2, 0, 3]]),       # splitting saves 52 tokens, a run costs 64
    ([30, 4, 5, 31], [1, 1, 1, 1], 16, [[1, 2], [0, 3]]),     # ... and is worth it when a run costs 16
    ([100, 128], [1, 16], 64, [[0, 1]]),                      # a slightly shorter row pads along
    ([8, 128], [16, 1], 64, [[0], [1]]),                      # many short rows run apart from a long one
    ([3, 2, 1], [1, 1, 1], 0, [[2], [1], [0]]),               # free runs: one per length, shortest first
    ([], [], 64, []),
])
def test_length_runs_split_where_the_padding_saved_outweighs_a_run(lengths, rows, run_cost, expected):
    from handlers.frontends.text import length_runs

    assert length_runs(lengths, rows, run_cost) == expected


def test_length_runs_are_as_cheap_as_the_best_split_found_by_trying_them_all():
    import itertools

    from handlers.frontends.text import length_runs

    def cost(runs, lengths, rows, run_cost):
        return sum(run_cost + sum(rows[i] for i in run) * max(lengths[i] for i in run) for run in runs)

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 7))
        lengths, rows = rng.integers(1, 60, n).tolist(), rng.integers(1, 5, n).tolist()
        run_cost = int(rng.integers(0, 100))
        order = sorted(range(n), key=lambda i: lengths[i])
        best = min(cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, n))], lengths, rows, run_cost)
                   for k in range(n) for cuts in itertools.combinations(range(1, n), k))
        runs = length_runs(lengths, rows, run_cost)
        assert sorted(i for run in runs for i in run) == list(range(n))
        assert cost(runs, lengths, rows, run_cost) == best


def test_collate_pads_to_max_length_when_asked_for_the_benchmark(manifest, folder, pretrained):
    frontend = TextFrontend(manifest, folder)
    frontend.pad_to_max_length = True
    items = [frontend.decode(request({"text": t})) for t in TEXTS[:2]]
    [(_, batch)] = frontend.collate(items)
    assert batch["input_ids"].shape == (2, MAX_LENGTH)
    alone = np.concatenate([logits(pretrained, item) for item in items])
    np.testing.assert_allclose(pretrained.reference(batch)["logits"], alone, atol=1e-5)


def test_collate_pads_with_the_pad_id_and_a_zero_mask(frontend):
    items = [frontend.decode(request({"text": "good"})), frontend.decode(request({"text": TEXTS[3]}))]
    [(_, batch)] = frontend.collate(items)
    short = int(items[0].inputs["attention_mask"].sum())
    assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (batch["input_ids"].shape[1] - short)
    assert set(batch["input_ids"][0, short:].tolist()) == {frontend.spec.pad_id}


# --- answers and transports ---------------------------------------------------------------------------------


def test_every_transport_of_the_same_text_gets_the_same_top_k(pipeline, pretrained):
    text = TEXTS[1]
    oip = {"id": "r1", "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    answers = pipeline.process([
        request({"text": text}), request({"texts": [text]}), request(text.encode(), "text/plain"),
        Request(payload=text, content_type="text/plain"),           # decoded by TorchServe (default config)
        Request(payload={"text": text}, content_type="application/json"), request(json.dumps(text).encode(), ""),
        request(oip),
    ])
    assert [a.status for a in answers] == [200] * 7
    expected = pretrained.reference(pipeline.frontend.tokenize([text], True, "json").inputs)["logits"][0]
    probabilities = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    single = answers[0].body
    assert single["model"] == "sentiment" and [p["label"] for p in single["predictions"]] == [
        pretrained.labels[i] for i in np.argsort(-probabilities)]
    assert single["predictions"][0]["probability"] == pytest.approx(float(probabilities.max()), abs=1e-6)
    # Batch-mates change float rounding (not the answer): compare labels exactly, probabilities within 1e-6.
    for rows in [a.body["predictions"] for a in answers[2:6]] + [answers[1].body["results"][0]["predictions"]]:
        assert [p["label"] for p in rows] == [p["label"] for p in single["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in rows], [p["probability"] for p in single["predictions"]],
                                   atol=1e-6)
    out = json.loads(answers[6].raw)
    assert out["id"] == "r1" and out["outputs"][0]["name"] == "logits" and out["outputs"][0]["shape"] == [1, 2]
    np.testing.assert_allclose(out["outputs"][0]["data"], expected, atol=1e-6)


def test_example_input_runs(frontend, pretrained):
    example = frontend.example_input()
    assert example.single and logits(pretrained, example).shape == (1, len(pretrained.labels))


def test_load_refuses_a_missing_tokenizer_and_inputs_the_tokenizer_cannot_fill(manifest, folder, tmp_path):
    from dataclasses import replace

    from handlers.errors import ModelLoadError, SpecError
    from handlers.spec import InputSpec

    with pytest.raises(ModelLoadError, match="tokenizer file .*tokenizer.json not found"):
        TextFrontend(manifest, str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a Hugging Face tokenizers file"):
        TextFrontend(manifest, str(tmp_path))
    extra = replace(manifest, inputs=(*manifest.inputs, InputSpec(shape=(-1,), dtype="int64", name="token_type_ids")))
    with pytest.raises(SpecError, match="fills attention_mask, input_ids .*the model takes .*token_type_ids"):
        TextFrontend(extra, folder)


# --- OIP v2 through the shared codec (handlers/oip.py) -------------------------------------------------------


def test_oip_binary_bytes_input_answers_like_the_model_with_binary_logits(pipeline, pretrained):
    texts = [TEXTS[0], LONG, "ÉMOJI 🙂 and ü"]
    [answer] = pipeline.process([oip_binary(texts, request_id="b-1")])
    assert answer.status == 200 and answer.content_type == "application/octet-stream", answer.body
    result = oip_result(answer)
    expected = logits(pretrained, pipeline.frontend.tokenize(texts, False, "json"))
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "b-1" and response["model_name"] == "sentiment"
    assert response["parameters"] == {"binary_data_output": True, "truncated": True, "truncated_rows": "1"}


def test_oip_json_and_binary_and_grpc_forms_of_the_same_texts_agree(pipeline, pretrained):
    import base64

    from tritonclient.http import InferRequestedOutput

    texts = [TEXTS[1], TEXTS[3]]
    json_oip = {"inputs": [{"name": "t", "shape": [2, 1], "datatype": "BYTES", "data": [[texts[0]], [texts[1]]]}],
                "outputs": [{"name": "logits"}]}
    encoded = [base64.b64encode(t.encode()).decode() for t in texts]
    grpc_body = {"model_name": "sentiment", "id": "g",
                 "inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": encoded}]}
    answers = pipeline.process([
        request(json_oip), Request(payload=json_oip),  # raw bytes, and a dict TorchServe already parsed
        oip_binary(texts, shape=[2, 1], outputs=[InferRequestedOutput("logits", binary_data=False)]),
        Request(payload=json.dumps(grpc_body).encode(), headers={}),  # TorchServe's gRPC bridge: no headers
    ])
    assert [a.status for a in answers] == [200] * 4, [a.body for a in answers]
    expected = logits(pretrained, pipeline.frontend.tokenize(texts, False, "json"))
    for answer in answers:
        np.testing.assert_allclose(oip_result(answer).as_numpy("logits"), expected, atol=1e-6)
    assert answers[2].content_type == "application/json" and json.loads(answers[3].raw)["id"] == "g"


def test_a_binary_oip_request_answers_on_a_real_context_beside_json_ones(manifest, pipeline, folder, pretrained):
    from ts.context import Context

    from handlers.metrics import HandlerMetrics
    from tests import support

    context = Context("sentiment", folder, {"model": {"modelName": "sentiment", "handler": "text.py"}}, 3, None,
                      "0.12.0", model_yaml_config={})
    handler = TextHandler()
    handler.context, handler.model_dir, handler.pipeline = context, folder, pipeline
    handler.metrics = HandlerMetrics(context, manifest)
    handler.initialized = True
    good, bad = oip_binary([TEXTS[1], TEXTS[0]]), oip_binary(["caf"], element=b"caf\xe9")
    data = support.torchserve_batch(context, [
        (b'{"text": "I loved it"}', "application/json"), (good.payload, ""), (bad.payload, "")],
        headers=[{}, {"Inference-Header-Content-Length": good.headers["inference-header-content-length"]},
                 {"Inference-Header-Content-Length": bad.headers["inference-header-content-length"]}])
    bodies = handler.handle(data, context)
    assert support.statuses(context, 3) == [200, 200, 400]
    length = context.get_response_headers(1)["Inference-Header-Content-Length"]
    from tritonclient.http import InferenceServerClient

    result = InferenceServerClient.parse_response_body(bodies[1], header_length=int(length))
    expected = logits(pretrained, pipeline.frontend.tokenize([TEXTS[1], TEXTS[0]], False, "json"))
    np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=1e-6)
    assert json.loads(bodies[2])["type"] == "not_utf8" and "element 0" in json.loads(bodies[2])["error"]


# --- bad input ----------------------------------------------------------------------------------------------

BAD = [
    (request({"text": ""}), 400, "empty_text", "empty"),
    (request({"text": "  \n"}), 400, "empty_text", "empty"),
    (request({"texts": ["good", ""]}), 400, "empty_text", "text 1 is empty"),
    (request({"texts": []}), 400, "empty_text", "no texts"),
    (request(b"", "text/plain"), 400, "empty_text", "empty"),
    (request(b"caf\xe9 latte", "text/plain"), 400, "not_utf8", "byte 3"),
    (request(b'{"text": "caf\xe9"}'), 400, "not_utf8", "UTF-8"),
    (request(b"x" * (MAX_BODY + 1), "text/plain"), 413, "payload_too_large", str(MAX_BODY)),
    (request({"texts": ["good"] * (MAX_TEXTS + 1)}), 413, "too_many_texts", f"at most {MAX_TEXTS}"),
    (request({"text": 5}), 422, "not_text", "'text' must be a string, got a number"),
    (request({"text": ["a", "b"]}), 422, "not_text", "'texts'"),
    (request({"texts": "good"}), 422, "not_text", "'texts' must be a list of strings, got a string"),
    (request({"texts": ["good", None]}), 422, "not_text", r"'texts'\[1\] must be a string, got null"),
    (request(7), 422, "not_text", "got a number"),
    (request([["nested"]]), 422, "not_text", r"list\[0\] must be a string, got a list"),
    (request({"sentence": "good"}), 400, "malformed_json", '"text"'),
    (request(b'{"text": "good"'), 400, "malformed_json", "malformed JSON"),
    (request(b"\x89PNG\r\n", "image/png"), 415, "unsupported_media_type", "text/plain"),
    (request({"inputs": [{"name": "t", "shape": [1], "datatype": "FP32", "data": [1.0]}]}), 422, "dtype_mismatch",
     "'t' is FP32; a text model takes BYTES"),
    (request({"inputs": [{"name": "t", "shape": [2], "datatype": "BYTES", "data": ["a"]}]}), 422, "shape_mismatch",
     r"1 values but shape \[2\]"),
    # OIP v2, refused by the shared codec (handlers/oip.py) or by the text front end
    (request({"inputs": [{"name": "t", "shape": [1], "datatype": "STRING", "data": ["a"]}]}), 400,
     "unsupported_datatype", "STRING"),
    (request({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": [3]}]}), 422, "dtype_mismatch",
     "values must be strings"),
    (request({"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]},
                         {"name": "b", "shape": [1], "datatype": "BYTES", "data": ["y"]}]}), 400,
     "malformed_oip_request", "one BYTES input .*got 2: a, b"),
    (request({"inputs": []}), 400, "malformed_oip_request", "non-empty list"),
    (request({"inputs": [{"name": "t", "datatype": "BYTES", "data": ["x"]}]}), 400, "malformed_oip_request",
     "lacks shape"),
    (request({"inputs": [{"name": "t", "shape": [0], "datatype": "BYTES", "data": []}]}), 400, "empty_text",
     "no texts"),
    (request({"inputs": [{"name": "t", "shape": [1], "datatype": "BYTES", "data": ["x"]}],
              "outputs": [{"name": "probs"}]}), 422, "unknown_output", "'probs'; this model has: logits"),
    (oip_binary(["good", "bad"], element=b"\xff\xfe"), 400, "not_utf8", "element 0 is not UTF-8"),
    (oip_binary([" "]), 400, "empty_text", "empty"),
    (oip_binary(["good"] * (MAX_TEXTS + 1)), 413, "too_many_texts", f"at most {MAX_TEXTS}"),
    (oip_binary(["x" * MAX_BODY]), 413, "payload_too_large", str(MAX_BODY)),
    (Request(payload=oip_binary(["good"]).payload[:-1], headers=oip_binary(["good"]).headers), 400,
     "binary_size_mismatch", "declares 8 binary bytes but only 7 remain"),
    (raw_oip(b"\x09\x00\x00\x00good"), 400, "binary_size_mismatch", "element 0 claims 9 bytes; only 4 remain"),
    (raw_oip(b"\x04\x00\x00\x00good", shape=[2]), 400, "binary_size_mismatch", "needs 2 elements.* holds 1"),
    (Request(payload=oip_binary(["good"]).payload + b"xx", headers=oip_binary(["good"]).headers), 400,
     "binary_size_mismatch", "2 binary bytes that no input"),
    (Request(payload=oip_binary(["good"]).payload, headers={"inference-header-content-length": "ten"}), 400,
     "malformed_oip_request", "must be an integer"),
    (Request(payload=oip_binary(["good"]).payload, headers={"inference-header-content-length": "100000"}), 400,
     "binary_size_mismatch", "the body has"),
    (Request(payload=oip_binary(["good"]).payload, headers={"inference-header-content-length": "5"}), 400,
     "malformed_json", "OIP JSON header is malformed"),
]


@pytest.mark.parametrize("bad, status, kind, message", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_batch_is_still_answered(pipeline, bad, status, kind,
                                                                                  message):
    import re

    good, answer, other = pipeline.process([request({"text": "good"}), bad, request({"texts": ["bad", "ok"]})])
    assert (answer.status, answer.body["type"]) == (status, kind), answer.body
    assert re.search(message, answer.body["error"]), answer.body["error"]
    assert good.status == 200 and other.status == 200 and len(other.body["results"]) == 2


# --- the handler on a real TorchServe Context ---------------------------------------------------------------


def test_text_handler_answers_each_request_of_a_batch_with_its_own_status(manifest, pipeline, folder):
    from ts.context import Context

    from handlers.metrics import HandlerMetrics
    from tests import support

    context = Context("sentiment", folder, {"model": {"modelName": "sentiment", "handler": "text.py"}}, 4, None,
                      "0.12.0", model_yaml_config={})
    handler = TextHandler()
    handler.context, handler.model_dir, handler.pipeline = context, folder, pipeline
    handler.metrics = HandlerMetrics(context, manifest)
    handler.initialized = True
    data = support.torchserve_batch(context, [
        (b'{"text": "I loved it"}', "application/json"), ("caf\xe9".encode("latin-1"), "text/plain"),
        (b"Terrible service.", "text/plain; charset=utf-8"), (json.dumps({"texts": [LONG, "ok"]}).encode(), ""),
    ])
    bodies = [json.loads(b) for b in handler.handle(data, context)]
    assert support.statuses(context, 4) == [200, 400, 200, 200]
    assert bodies[1]["type"] == "not_utf8"
    assert bodies[0]["predictions"][0]["label"] in ("negative", "positive")
    assert bodies[3]["results"][0]["truncated"] is True


# --- fuzz: any body is a Decoded or a 4xx -------------------------------------------------------------------


def _decodes_or_4xx(frontend, request_: Request) -> None:
    from handlers.errors import TspackError

    try:
        decoded = frontend.decode(request_)
    except TspackError as exc:
        assert 400 <= exc.status < 500, exc
        return
    rows = decoded.rows
    assert 1 <= rows <= MAX_TEXTS and len(decoded.meta["truncated"]) == rows
    assert all(a.shape[0] == rows and a.shape[1] <= MAX_LENGTH for a in decoded.inputs.values())


def test_fuzz_any_body_decodes_or_is_refused_with_a_4xx(frontend):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30))
    values = st.recursive(scalars, lambda children: st.one_of(
        st.lists(children, max_size=6), st.dictionaries(st.sampled_from(["text", "texts", "inputs", "data", "shape",
                                                                          "datatype", "name", "id"]), children,
                                                        max_size=4)), max_leaves=30)
    content_types = st.sampled_from(["application/json", "text/plain", "", "image/png", "text/csv"])
    bodies = st.one_of(st.binary(max_size=300), values.map(lambda v: json.dumps(v).encode()),
                       st.text(max_size=300).map(str.encode))

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=st.one_of(bodies, values), content_type=content_types)
    def check(body, content_type):
        _decodes_or_4xx(frontend, Request(payload=body, content_type=content_type))

    check()


# --- an archive built from the folder, on a real TorchServe Context -----------------------------------------


def test_onnx_archive_built_from_the_folder_answers_like_the_transformers_model(folder, pretrained, tmp_path):
    from handlers.errors import PayloadTooLarge
    from tests import support

    store = str(tmp_path / "store")
    os.makedirs(store)
    support.build_models(store, [{
        "name": "sentiment", "version": "1.0", "source": {"pretrained": folder}, "frontend": "text",
        "text": {"max_length": MAX_LENGTH, "max_texts": MAX_TEXTS}, "max_body_bytes": MAX_BODY,
        # TorchServe's own batching: handle() answers at once (zero-wait archives answer from a coroutine)
        "serving": {"batch_size": 8, "max_batch_delay_ms": 5},
        "artifacts": [{"format": "onnx"}]}])
    model_dir = support.extract(os.path.join(store, "sentiment_v1.0.mar"), str(tmp_path / "model"))
    assert os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    handler = TextHandler()
    handler.initialize(support.make_context(model_dir))
    texts = [TEXTS[1], LONG, TEXTS[0]]
    data = support.torchserve_batch(handler.context, [
        (json.dumps({"text": texts[0]}).encode(), "application/json"), (b"\xff\xfe", "text/plain"),
        (json.dumps({"texts": texts[1:]}).encode(), "application/json"),
        (b"x" * (MAX_BODY + 1), "text/plain")])
    bodies = [json.loads(b) for b in handler.handle(data, handler.context)]
    assert support.statuses(handler.context, 4) == [200, 400, 200, PayloadTooLarge.status]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    expected = pretrained.reference({n: tokens[n].astype(np.int64) for n in pretrained.input_names})["logits"]
    probabilities = np.exp(expected) / np.exp(expected).sum(1, keepdims=True)
    served = [bodies[0], *bodies[2]["results"]]
    for body, row in zip(served, probabilities):
        top = body["predictions"][0]
        assert top["label"] == pretrained.labels[int(row.argmax())]
        assert top["probability"] == pytest.approx(float(row.max()), abs=1e-5)
    assert bodies[2]["results"][0]["truncated"] is True and "truncated" not in bodies[0]
