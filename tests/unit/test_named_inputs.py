"""Several named inputs and named outputs on real archives and a real TorchServe `Context` (issue 12).

The model is archiver/zoo/token_classifier.py: input_ids + attention_mask (int64, a free sequence axis) in,
{"logits", "pooled"} out. Built once per module in TorchScript (traced through the named-IO wrapper) and ONNX
(dynamo exporter); the AOTInductor runtime gets its own test (a compile costs tens of seconds).
"""

from __future__ import annotations

import io
import json
import os
import textwrap

import numpy as np
import pytest
import torch

from archiver.build import build
from archiver.spec import DeploySpec
from handlers.spec import parse
from tests import support

token_model, eager = support.token_model, support.token_eager


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    store = str(root / "store")
    result = build(parse(DeploySpec, {"model_store": store, "models": [token_model(str(root), [
        {"format": "torchscript", "id": "main"}, {"format": "onnx", "id": "onnx"}])]}), progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return {"root": str(root), "store": store, "entries": {e.name: e for e in result.entries}}


@pytest.fixture(params=["sequence", "sequence-onnx"])
def handler(request, built, tmp_path):
    from handlers.tensor import TensorHandler

    folder = support.extract(os.path.join(built["store"], f"{request.param}_v1.0.mar"), str(tmp_path / "model"))
    handler = TensorHandler()
    handler.initialize(support.make_context(folder))
    return handler


def test_build_records_named_inputs_outputs_and_two_lengths(built):
    from archiver.package.archive import read_manifest

    manifest = read_manifest(os.path.join(built["store"], "sequence_v1.0.mar"))
    assert [i.name for i in manifest.inputs] == ["input_ids", "attention_mask"]
    assert manifest.outputs == ("logits", "pooled")
    validation = manifest.validation
    assert set(validation["max_abs_error_by_output"]) == {"logits", "pooled"}
    assert validation["checked_lengths"] == [12, 7]  # the samples' length and a shorter one
    assert built["entries"]["sequence-onnx"].passed and "onnx" in built["entries"]["sequence-onnx"].optimizations


def test_json_by_name_oip_and_npz_answer_what_eager_answers(handler, built):
    ids = np.array([[5, 17, 99, 3, 8], [4, 4, 4, 0, 0]], dtype=np.int64)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=np.int64)
    expected = eager(built["root"], ids, mask)
    npz = io.BytesIO()
    np.savez(npz, input_ids=ids, attention_mask=mask)
    oip = {"id": "r1", "inputs": [
        {"name": "attention_mask", "shape": [2, 5], "datatype": "INT64", "data": mask.ravel().tolist()},
        {"name": "input_ids", "shape": [2, 5], "datatype": "INT64", "data": ids.ravel().tolist()}]}
    bodies = [(json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}).encode(), "application/json"),
              (json.dumps(oip).encode(), "application/json"), (npz.getvalue(), "application/octet-stream")]
    context = handler.context
    answers = [json.loads(a) for a in handler.handle(support.torchserve_batch(context, bodies), context)]
    assert support.statuses(context, 3) == [200, 200, 200]
    for answer in (answers[0], answers[2]):
        got = {name: np.array([row["outputs"][name] for row in answer["results"]]) for name in expected}
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)
    assert answers[1]["id"] == "r1"
    by_name = {o["name"]: o for o in answers[1]["outputs"]}
    assert by_name["logits"]["shape"] == [2, 4] and by_name["pooled"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(by_name["pooled"]["data"], (2, -1)), expected["pooled"], rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize("body,status,needle", [
    ({"input_ids": [[1, 2, 3]]}, 422, "input 'attention_mask' is missing"),
    ({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "token_type_ids": [[0, 0]]}, 422, "unknown input "
                                                                                          "'token_type_ids'"),
    ({"input_ids": [[1, 2], [3, 4]], "attention_mask": [[1, 1]]}, 422, "inputs must share their rows"),
    ({"input_ids": [[1.5, 2]], "attention_mask": [[1, 1]]}, 422, "input 'input_ids' must be integers (int64)"),
    ({"input_ids": [1, 2, 3], "attention_mask": [[1, 1, 1]]}, 422, "inputs must share their rows"),
    ({"data": [1, 2, 3]}, 400, "none of the model's inputs; send {\"input_ids\": [...]"),
])
def test_bad_named_input_is_refused_naming_it_and_the_batch_still_answers(handler, body, status, needle):
    good = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]}
    context = handler.context
    bodies = [(json.dumps(good).encode(), "application/json"), (json.dumps(body).encode(), "application/json")]
    answers = [json.loads(a) for a in handler.handle(support.torchserve_batch(context, bodies), context)]
    assert support.statuses(context, 2) == [200, status]
    assert needle in answers[1]["error"], answers[1]
    assert "logits" in answers[0]["results"][0]["outputs"]


def test_rows_of_different_lengths_in_one_batch_each_get_their_own_answer(handler, built):
    short = {"input_ids": [7, 8, 9], "attention_mask": [1, 1, 1]}
    long = {"input_ids": [7, 8, 9, 10, 11, 12], "attention_mask": [1, 1, 1, 1, 1, 1]}
    context = handler.context
    bodies = [(json.dumps(b).encode(), "application/json") for b in (short, long)]
    answers = [json.loads(a) for a in handler.handle(support.torchserve_batch(context, bodies), context)]
    for body, answer in zip((short, long), answers):
        expected = eager(built["root"], np.array([body["input_ids"]]), np.array([body["attention_mask"]]))
        np.testing.assert_allclose(answer["outputs"]["logits"], expected["logits"][0], rtol=1e-4, atol=1e-5)


LENGTH_SPECIALISED = textwrap.dedent('''
    import torch
    from torch import nn

    class Specialised(nn.Module):
        """Right only at the sequence length it was traced with: the length becomes a constant in the trace."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(1, 3)

        def forward(self, input_ids):
            length = float(input_ids.shape[1])  # a Python number: a trace records the example's value
            return self.proj(input_ids.float().mean(1, keepdim=True) * (12.0 / length))
''')


def test_validation_at_a_second_length_catches_a_length_specialised_trace(tmp_path):
    """A library's code (here under a site-packages folder, as transformers is) may warn while being traced; the
    build notes it instead of refusing, and the second sample length catches the specialised trace."""
    (tmp_path / "site-packages").mkdir()
    path = tmp_path / "site-packages" / "specialised.py"
    path.write_text(LENGTH_SPECIALISED)
    torch.manual_seed(0)
    from archiver.optimize.export import import_object

    weights = tmp_path / "w.pt"
    torch.save(import_object(f"{path}:Specialised")().state_dict(), weights)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", input_ids=rng.integers(1, 50, (8, 12)).astype(np.int64))
    model = {"name": "spec", "version": "1.0", "source": {"model_class": f"{path}:Specialised",
                                                          "weights": str(weights)},
             "inputs": [{"name": "input_ids", "shape": [-1], "dtype": "int64"}],
             "samples": {"file": str(tmp_path / "s.npz")}, "artifacts": [{"format": "torchscript"}]}
    store = str(tmp_path / "store")
    (entry,) = build(parse(DeploySpec, {"model_store": store, "models": [model]}), progress=False).entries
    assert not entry.passed
    assert "exceeds tolerance" in entry.error and "shape (8, 3)" in entry.error
    assert not os.path.exists(os.path.join(store, "spec_v1.0.mar"))


def test_aoti_archive_serves_on_a_real_context_equal_to_eager(tmp_path):
    """torch.export + AOTInductor: the .pt2 runs in the tensor handler at two batch sizes and two lengths."""
    from handlers.tensor import TensorHandler

    store = str(tmp_path / "store")
    result = build(parse(DeploySpec, {"model_store": store, "models": [token_model(str(tmp_path), [
        {"format": "aoti"}])]}), progress=False)
    (entry,) = result.entries
    assert entry.passed, entry.error
    assert entry.runtime == "aoti" and entry.format == "aoti"
    assert any(note.startswith("aoti: ") for note in entry.notes), entry.notes
    folder = support.extract(os.path.join(store, "sequence_v1.0.mar"), str(tmp_path / "model"))
    handler = TensorHandler()
    context = support.make_context(folder)
    handler.initialize(context)
    assert handler.describe()["runtime"]["runtime"] == "aoti"
    rng = np.random.default_rng(1)
    for rows, length in ((1, 5), (3, 19)):
        ids = rng.integers(1, 1000, (rows, length)).astype(np.int64)
        mask = np.ones_like(ids)
        body = json.dumps({"input_ids": ids.tolist(), "attention_mask": mask.tolist()}).encode()
        (answer,) = handler.handle(support.torchserve_batch(context, [(body, "application/json")]), context)
        got = np.array([row["outputs"]["logits"] for row in json.loads(answer)["results"]])
        np.testing.assert_allclose(got, eager(str(tmp_path), ids, mask)["logits"], rtol=1e-4, atol=1e-5)
