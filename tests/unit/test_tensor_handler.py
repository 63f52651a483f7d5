"""TensorHandler on a real TorchServe Context and a real archive, without a server."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from handlers.tensor import TensorHandler
from tests import support


@pytest.fixture
def handler(digits_dir):
    h = TensorHandler()
    h.initialize(support.make_context(digits_dir))
    return h


def sample(seed: int = 0, rows: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (1, 8, 8) if rows is None else (rows, 1, 8, 8)
    return rng.random(shape, dtype=np.float32)


def call(handler, bodies, headers=None):
    context = handler.context
    data = support.torchserve_batch(context, bodies, headers)
    out = handler.handle(data, context)
    return support.statuses(context, len(bodies)), [json.loads(o) for o in out]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_json_answer_matches_eager(handler, digits_store):
    x = sample(3)
    status, (body,) = call(handler, [(json.dumps({"data": x.tolist()}).encode(), "application/json")])
    assert status == [200]
    expected = support.softmax(support.eager_outputs(digits_store["weights"]["1.0"], x[None]))[0]
    top = body["predictions"][0]
    assert top["index"] == int(expected.argmax())
    assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert top["label"] == support.LABELS[top["index"]]
    assert body["model"] == "digits" and body["version"] == "1.0"
    assert len(body["predictions"]) == 3


def test_every_input_form_gives_the_same_answer(handler):
    x = sample(5)
    forms = [
        (json.dumps({"data": x.tolist()}).encode(), "application/json"),
        (json.dumps(x.tolist()).encode(), "application/json"),
        (json.dumps({"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                 "data": x.reshape(-1).tolist()}]}).encode(), "application/json"),
        (npy_bytes(x), "application/octet-stream"),
        ({"data": x.tolist()}, "application/json"),  # already decoded by TorchServe's default config
    ]
    status, bodies = call(handler, forms)
    assert status == [200] * len(forms)
    logits = np.array(bodies[2]["outputs"][0]["data"])
    assert bodies[2]["model_name"] == "digits" and bodies[2]["outputs"][0]["shape"] == [10]
    for body in bodies[:2] + bodies[3:]:
        assert body["predictions"][0]["index"] == int(logits.argmax())
        probabilities = [p["probability"] for p in body["predictions"]]
        assert probabilities == pytest.approx([p["probability"] for p in bodies[0]["predictions"]], abs=1e-6)


def test_rows_in_one_request_are_answered_in_order(handler, digits_store):
    x = sample(7, rows=5)
    status, (body,) = call(handler, [(json.dumps({"data": x.tolist()}).encode(), "application/json")])
    assert status == [200]
    expected = support.eager_outputs(digits_store["weights"]["1.0"], x).argmax(1)
    assert [r["predictions"][0]["index"] for r in body["results"]] == expected.tolist()


BAD_REQUESTS = [
    (b"", "application/json", 400, "empty_body"),
    (b'{"data": [1, 2', "application/json", 400, "malformed_json"),
    (b'{"values": []}', "application/json", 400, "malformed_json"),
    (json.dumps({"data": np.zeros((8, 8)).tolist()}).encode(), "application/json", 422, "shape_mismatch"),
    (json.dumps({"data": [[["a"] * 8] * 8]}).encode(), "application/json", 422, "dtype_mismatch"),
    (b'{"data": [[[NaN, 1, 1, 1, 1, 1, 1, 1]]]}', "application/json", 422, "shape_mismatch"),
    (json.dumps({"data": [[[float(v) for v in row] for row in np.full((8, 8), 1e300)]]}).encode(),
     "application/json", 422, "non_finite_input"),
    (b"\x93NUMPY garbage", "application/octet-stream", 400, "malformed_payload"),
    (b"\x89PNG\r\n\x1a\n", "image/png", 415, "unsupported_media_type"),
    (b"x" * (64 * 1024 + 1), "application/json", 413, "payload_too_large"),
]


@pytest.mark.parametrize("payload,content_type,status,kind", BAD_REQUESTS,
                         ids=[b[3] + str(i) for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_its_own_4xx_and_the_batch_still_answers(handler, payload, content_type, status, kind):
    good = json.dumps({"data": sample(1).tolist()}).encode()
    statuses, bodies = call(handler, [(good, "application/json"), (payload, content_type),
                                      (good, "application/json")])
    assert statuses == [200, status, 200]
    assert bodies[1]["type"] == kind and bodies[1]["status"] == status
    assert bodies[1]["error"]
    assert bodies[0] == bodies[2]


def test_nan_is_refused_unless_the_spec_allows_it(handler):
    x = sample(2)
    x[0, 0, 0] = np.nan
    statuses, bodies = call(handler, [(npy_bytes(x), "application/octet-stream")])
    assert statuses == [422] and bodies[0]["type"] == "non_finite_input"
    assert "NaN" in bodies[0]["error"]


def test_wrong_dtype_in_npy_and_oip(handler):
    ints = np.ones((1, 8, 8), dtype=np.int64)
    strings = np.array([["a"] * 8] * 8)[None]
    oip_bad_type = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "STRINGS", "data": [0] * 64}]}
    oip_bad_count = {"inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": [0] * 63}]}
    statuses, bodies = call(handler, [
        (npy_bytes(ints), "application/octet-stream"), (npy_bytes(strings), "application/octet-stream"),
        (json.dumps(oip_bad_type).encode(), "application/json"),
        (json.dumps(oip_bad_count).encode(), "application/json"),
    ])
    # int64 fits a float32 input safely; strings do not; an OIP datatype outside the protocol is a malformed request
    assert statuses == [200, 422, 400, 422]
    assert [b.get("type") for b in bodies[1:]] == ["dtype_mismatch", "unsupported_datatype", "shape_mismatch"]


def test_too_many_rows_in_one_request(handler):
    statuses, bodies = call(handler, [(npy_bytes(sample(0, rows=65)), "application/octet-stream")])
    assert statuses == [413] and "at most 64" in bodies[0]["error"]


def test_describe_reports_runtime_spec_and_validation(handler):
    context = handler.context
    from ts.context import RequestProcessor

    context.request_processor = [RequestProcessor({"describe": "True"})]
    (out,) = handler.handle([{}], context)
    described = json.loads(out)
    assert described["runtime"]["runtime"] == "torchscript"
    assert described["input"]["shape"] == [1, 8, 8]
    assert described["validation"]["passed"] is True
    assert described["validation"]["max_abs_error"] <= 1e-4
    assert described["handler"]["class"] == "TensorHandler"
    assert described["handler"]["keep_freed_memory"] is True and described["handler"]["read_ahead"] is True


def test_threads_default_to_cores_per_worker(digits_dir, monkeypatch):
    import torch

    from handlers.device import available_cores

    monkeypatch.delenv("TSPACK_INTRA_OP_THREADS", raising=False)
    previous = torch.get_num_threads()
    try:
        context = support.make_context(digits_dir)
        context.model_yaml_config["minWorkers"] = 2
        TensorHandler().initialize(context)
        assert torch.get_num_threads() == max(1, available_cores() // 2)
        monkeypatch.setenv("TSPACK_INTRA_OP_THREADS", "3")
        TensorHandler().initialize(support.make_context(digits_dir))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)


def test_tampered_weights_are_refused(digits_dir):
    import os

    from handlers.errors import IntegrityError

    with open(os.path.join(digits_dir, "model.pt"), "ab") as f:
        f.write(b"tampered")
    with pytest.raises(IntegrityError, match="does not match"):
        TensorHandler().initialize(support.make_context(digits_dir))


def test_archive_for_another_frontend_is_refused(digits_dir):
    from handlers.base import TspackHandler
    from handlers.errors import ModelLoadError

    class ImageOnly(TspackHandler):
        frontend_name = "image"

    with pytest.raises(ModelLoadError, match="built for the 'tensor' front end"):
        ImageOnly().initialize(support.make_context(digits_dir))


def emitted_counts(records) -> dict[tuple[str, str], float]:
    """{(metric name, "Dim:value,..."): summed value} from TorchServe's `[METRICS]name.Unit:value|#dims|...` lines."""
    counts: dict[tuple[str, str], float] = {}
    for record in records:
        line = record.getMessage()
        if not line.startswith("[METRICS]"):
            continue
        head, dims = line[len("[METRICS]"):].split("|#")[:2]
        name, value = head.rsplit(":", 1)
        key = (name.rsplit(".", 1)[0], dims)
        counts[key] = counts.get(key, 0.0) + float(value)
    return counts


def test_metrics_are_emitted_through_torchserve(digits_dir, tmp_path, caplog):
    """The lines a worker writes for the frontend to parse: requests by status, errors by type, rows, batches."""
    import logging

    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from archiver.deploy.properties import metrics_config_text

    config = tmp_path / "metrics.yaml"
    config.write_text(metrics_config_text())
    cache = MetricsCacheYamlImpl(config_file_path=str(config))
    cache.initialize_cache()
    h = TensorHandler()
    h.initialize(support.make_context(digits_dir, metrics=cache))
    cache.model_name = "digits"
    caplog.set_level(logging.INFO, logger="ts.metrics")
    caplog.clear()
    bodies = [(b'{"data": [1, 2', "application/json"), (json.dumps(sample(0).tolist()).encode(), "application/json"),
              (json.dumps(sample(1).tolist()).encode(), "application/json"), (b"", "application/json")]
    data = support.torchserve_batch(h.context, bodies)
    cache.set_request_ids(h.context.request_ids)
    h.handle(data, h.context)
    h.metrics.flush()  # counters are summed in memory and flushed every second in a worker; flush now
    counts = emitted_counts(caplog.records)
    model = "ModelName:digits,ModelVersion:1.0"
    assert {dims: v for (name, dims), v in counts.items() if name == "tspack_requests_total"} == {
        f"{model},Variant:none,Status:200": 2, f"{model},Variant:none,Status:400": 2}
    assert {dims: v for (name, dims), v in counts.items() if name == "tspack_errors_total"} == {
        f"{model},Variant:none,ErrorType:malformed_json": 1, f"{model},Variant:none,ErrorType:empty_body": 1}
    assert counts[("tspack_rows_total", f"{model},Variant:none")] == 2
    assert counts[("tspack_batches_total", f"{model},Variant:none")] == 1
    assert counts[("tspack_batch_size", model)] == 4, "the histogram observes the TorchServe batch: 4 requests"
    assert h.metrics._warned == set(), "every metric the handler emits is declared in the metrics config"


def test_labels_come_from_index_to_name_json(digits_dir):
    """TorchServe's convention: an archive's index_to_name.json names the classes (ImageNet's list form too)."""
    import os

    from handlers.errors import SpecError

    path = os.path.join(digits_dir, "index_to_name.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({str(i): [f"n{i:03d}", f"class-{i}"] for i in range(10)}, f)
    h = TensorHandler()
    h.initialize(support.make_context(digits_dir))
    statuses, bodies = call(h, [(json.dumps({"data": sample().tolist()}).encode(), "application/json")])
    assert statuses == [200]
    for prediction in bodies[0]["predictions"]:
        assert prediction["label"] == f"class-{prediction['index']}"
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"zero": "0"}')
    with pytest.raises(SpecError, match="index_to_name.json"):
        TensorHandler().initialize(support.make_context(digits_dir))
