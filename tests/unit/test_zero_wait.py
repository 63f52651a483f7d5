"""Zero-wait batching without a server: the spec setting, model-config.yaml, and the worker loop on a real socket pair,
fed TorchServe's own message frames, with stub answers and with the real handlers."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import tempfile
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from ts.protocol import otf_message_handler

from archiver.package.archive import model_config
from archiver.spec import DEFAULT_BATCHING, DeploySpec, ServingSpec
from handlers import read_ahead
from handlers.ab_router import VARIANT_HEADER, ABRouterHandler
from handlers.errors import ModelLoadError, SpecError
from handlers.request import Request
from handlers.spec import parse
from handlers.tensor import TensorHandler
from handlers.zero_wait import DrainingWorker, ZeroWaitConfig, release_jobs, zero_wait_config
from tests import support

JSON = "application/json"


def body(seed: int) -> bytes:
    return json.dumps({"data": np.random.default_rng(seed).random((1, 8, 8)).tolist()}).encode()


# --- the spec and model-config.yaml ------------------------------------------------------------------------------


@pytest.mark.parametrize("serving, mode, delay", [
    ({"batch_size": 8}, DEFAULT_BATCHING, 0 if DEFAULT_BATCHING == "zero_wait" else 2),
    ({"batch_size": 8, "max_batch_delay_ms": 5}, "delay", 5),  # a delay names the mode
    ({"batch_size": 1}, "delay", 0),  # nothing to batch
    ({"batch_size": 8, "batching": "zero_wait"}, "zero_wait", 0),
    ({"batch_size": 8, "batching": "zero_wait", "max_batch_delay_ms": 0}, "zero_wait", 0),  # as a tuned spec writes
    ({"batch_size": 8, "batching": "delay"}, "delay", 2),
])
def test_batching_mode_is_resolved_from_the_spec(serving, mode, delay):
    spec = parse(ServingSpec, serving, "serving")
    assert (spec.batching, spec.max_batch_delay_ms) == (mode, delay)


@pytest.mark.parametrize("serving, message", [
    ({"batch_size": 8, "batching": "zero_wait", "max_batch_delay_ms": 5},
     "serving.max_batch_delay_ms: zero_wait never waits for a batch to fill, so a delay of 5 ms means nothing"),
    ({"batch_size": 1, "batching": "zero_wait"}, "serving.batching: zero_wait batches up to batch_size requests"),
    ({"batch_size": 8, "batching": "continuous"}, "serving.batching: 'continuous' is not allowed; choose one of "
                                                  "'zero_wait', 'delay'"),
    ({"batch_size": 8, "batching": "delay", "max_batch_delay_ms": 0}, "must be >= 1 with batching"),
])
def test_bad_batching_settings_are_refused_with_the_fix(serving, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(ServingSpec, serving, "serving")


def test_model_config_of_each_mode():
    zero_wait = model_config(parse(ServingSpec, {"batch_size": 8, "batching": "zero_wait", "job_queue_size": 40}))
    assert (zero_wait["batchSize"], zero_wait["maxBatchDelay"], zero_wait["asyncCommunication"]) == (1, 0, True)
    assert zero_wait["handler"]["zero_wait"] == {"max_batch": 8, "max_pending": 40}
    assert zero_wait_config(zero_wait) == ZeroWaitConfig(max_batch=8, max_pending=40)
    delay = model_config(parse(ServingSpec, {"batch_size": 8, "max_batch_delay_ms": 3}))
    assert (delay["batchSize"], delay["maxBatchDelay"]) == (8, 3)
    assert "asyncCommunication" not in delay and "zero_wait" not in delay.get("handler", {})
    assert zero_wait_config(delay) is None


def test_async_switch_without_settings_gets_defaults_and_bad_settings_fail_the_load():
    assert zero_wait_config({"asyncCommunication": True}) == ZeroWaitConfig()
    with pytest.raises(ModelLoadError, match="handler.zero_wait.max_pending: must be >= max_batch"):
        zero_wait_config({"asyncCommunication": True, "handler": {"zero_wait": {"max_batch": 8, "max_pending": 4}}})


# --- the worker loop, fed TorchServe's frames over a socket pair ---------------------------------------------------


def frame(request_id: str, payload: bytes, headers: dict | None = None, more: tuple = ()) -> bytes:
    """An inference message as TorchServe's frontend writes it, in the layout ts/protocol/otf_message_handler.py
    reads: in asynchronous mode one request per message; `more` (id, payload) pairs make it a batch."""
    def sized(data: bytes) -> bytes:
        return struct.pack("!i", len(data)) + data

    def request(rid: str, data: bytes, hdrs: dict) -> bytes:
        out = sized(rid.encode())
        for name, value in hdrs.items():
            out += sized(name.encode()) + sized(value.encode())
        return out + struct.pack("!i", -1) + sized(b"body") + sized(JSON.encode()) + sized(data) + struct.pack("!i", -1)

    requests = [request(request_id, payload, headers or {})] + [request(r, d, {}) for r, d in more]
    return b"I" + b"".join(requests) + struct.pack("!i", -1)


def is_twin(prediction: dict) -> bool:
    """The empty end-of-stream answer that follows an HTTP answer (handlers/zero_wait.release_jobs)."""
    return prediction["headers"].get("ts_stream_next") == "false" and prediction["body"] == b""


class Frontend:
    """The frontend's end of the worker socket: writes frames, reads predict responses."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.file = sock.makefile("rb")

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def _int(self) -> int:
        return struct.unpack("!i", self.file.read(4))[0]

    def _bytes(self) -> bytes:
        return self.file.read(self._int())

    def response(self) -> list[dict]:
        """The predictions of one response message: id, status, headers, body. The message's own code must be 200:
        the frontend fails every request the worker holds on any other."""
        code = self._int()
        message = self._bytes()
        assert code == 200, (code, message)
        predictions = []
        while (length := self._int()) != -1:
            request_id = self.file.read(length).decode()
            self._bytes()  # content type
            status = self._int()
            self._bytes()  # reason phrase
            headers = {self._bytes().decode(): self._bytes().decode() for _ in range(self._int())}
            predictions.append({"id": request_id, "status": status, "headers": headers, "body": self._bytes()})
        return predictions

    def answers(self, count: int) -> dict[str, dict]:
        """Read responses until `count` requests have their answer (stream-end twins set aside); by request id."""
        found: dict[str, dict] = {}
        while len(found) < count:
            for prediction in self.response():
                if not is_twin(prediction):
                    found[prediction["id"]] = prediction
        return found


def metrics_cache():
    """A worker's metrics cache, with the metrics config `tspack config` writes (TorchServe's plus tspack's)."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from archiver.deploy.properties import metrics_config_text

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(metrics_config_text())
    metrics = MetricsCacheYamlImpl(f.name)
    metrics.initialize_cache()
    os.unlink(f.name)
    return metrics


def context_for():
    from ts.context import Context

    return Context("stub", "/nonexistent", {"model": {}}, 1, None, "0.12.0", metrics=metrics_cache())


@pytest.fixture
def wire(monkeypatch):
    """(frontend, worker socket); the worker's loop ends when the frontend's end closes. Bodies reach the handler as
    bytes, as with tspack's decode_input_request=false. The worker reads ahead, as DrainingWorker.install has it."""
    monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", "false")
    monkeypatch.setattr(otf_message_handler, "_retrieve_buffer", otf_message_handler._retrieve_buffer)
    assert read_ahead.install()
    frontend_end, worker_end = socket.socketpair()
    yield Frontend(frontend_end), worker_end
    frontend_end.close()


def serve(worker: DrainingWorker, worker_end: socket.socket, context) -> threading.Thread:
    def run() -> None:
        try:
            worker.run(SimpleNamespace(context=context, cl_socket=worker_end))
        except SystemExit:  # TorchServe's message parser exits the worker once the frontend hangs up
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class StubModel:
    """`answer(data, context)`: records each batch's size; the first batch waits for `release` so that requests
    queue up behind a busy model."""

    def __init__(self, fail: bool = False):
        self.runs: list[int] = []
        self.running = threading.Event()
        self.release = threading.Event()
        self.fail = fail

    def answer(self, data: list, context) -> list:
        self.runs.append(len(data))
        self.running.set()
        assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("decoder bug")
        return [json.dumps({"batch": len(data), "payload": d["body"].decode()}) for d in data]

    @staticmethod
    def refuse(data: list, context, error: BaseException) -> list:
        status = 503 if "max_pending" in str(error) else 500
        for i in range(len(data)):
            context.set_response_status(status, type(error).__name__, i)
        return [json.dumps({"error": str(error)}) for _ in data]


def started(wire, config: ZeroWaitConfig) -> tuple[Frontend, StubModel, DrainingWorker]:
    """A loop serving the stub model on the wire."""
    frontend, worker_end = wire
    model = StubModel()
    worker = DrainingWorker(config, model.answer, model.refuse)
    serve(worker, worker_end, context_for())
    return frontend, model, worker


def behind_a_busy_model(frontend: Frontend, model: StubModel, *frames: bytes) -> None:
    """Send r0 and, while the model runs it, `frames`; then let the model go on."""
    frontend.send(frame("r0", b"0"))
    assert model.running.wait(30), "a lone request runs without waiting for company"
    frontend.send(*frames)
    model.release.set()


def test_loop_runs_a_lone_request_at_once_then_takes_what_waited_up_to_max_batch(wire):
    frontend, model, worker = started(wire, ZeroWaitConfig(max_batch=4, max_pending=100))
    behind_a_busy_model(frontend, model, *(frame(f"r{i}", str(i).encode()) for i in range(1, 11)))
    answers = frontend.answers(11)
    assert model.runs == [1, 4, 4, 2]
    assert [json.loads(answers[f"r{i}"]["body"])["payload"] for i in range(11)] == [str(i) for i in range(11)]
    assert worker.describe() == {"mode": "zero_wait", "max_batch": 4, "max_pending": 100, "held": 0, "batches": 4}


def test_a_message_larger_than_max_batch_runs_alone_and_whole(wire):
    frontend, worker_end = wire
    model = StubModel()
    model.release.set()
    serve(DrainingWorker(ZeroWaitConfig(max_batch=2, max_pending=10), model.answer, model.refuse), worker_end,
          context_for())
    frontend.send(frame("big0", b"0", more=(("big1", b"1"), ("big2", b"2"))))
    assert len(frontend.answers(3)) == 3 and model.runs == [3]


def test_over_max_pending_the_newest_get_503_at_once(wire):
    frontend, model, worker = started(wire, ZeroWaitConfig(max_batch=4, max_pending=6))
    behind_a_busy_model(frontend, model, *(frame(f"r{i}", b"x") for i in range(1, 10)))
    answers = frontend.answers(10)
    statuses = [answers[f"r{i}"]["status"] for i in range(10)]
    assert statuses == [200] * 7 + [503] * 3, "r1..r6 fit (6 held), r7..r9 are refused"
    assert model.runs == [1, 4, 2] and worker.held == 0


def test_a_failing_batch_gets_an_error_per_request_and_the_loop_goes_on(wire):
    frontend, worker_end = wire
    model = StubModel(fail=True)
    model.release.set()
    serve(DrainingWorker(ZeroWaitConfig(max_batch=4), model.answer, model.refuse), worker_end, context_for())
    frontend.send(frame("r0", b"0", more=(("r1", b"1"),)))
    failed = frontend.response()  # the message itself says 200 (checked by `response`)
    assert [(p["id"], p["status"]) for p in failed] == [("r0", 500), ("r1", 500)]
    assert "decoder bug" in json.loads(failed[0]["body"])["error"]
    frontend.send(frame("r2", b"2"))
    assert frontend.response()[0]["status"] == 500 and model.runs == [2, 1]


def test_a_handler_that_miscounts_its_answers_gets_errors_not_a_dead_loop(wire):
    frontend, worker_end = wire
    serve(DrainingWorker(ZeroWaitConfig(max_batch=4), lambda data, context: [b"only one"], StubModel.refuse),
          worker_end, context_for())
    frontend.send(frame("r0", b"0", more=(("r1", b"1"),)))
    answers = frontend.response()
    assert [p["status"] for p in answers] == [500, 500]
    assert "returned 1 answers for 2 requests" in json.loads(answers[0]["body"])["error"]


def test_an_empty_message_is_skipped_and_large_bodies_cross_the_read_ahead_buffer(wire):
    frontend, worker_end = wire
    model = StubModel()
    model.release.set()
    serve(DrainingWorker(ZeroWaitConfig(max_batch=4), model.answer, model.refuse), worker_end, context_for())
    large = b"7" * 200_000  # under the buffer: it arrives over several reads ahead
    larger = b"8" * (read_ahead.BUFFER_BYTES + 1000)  # over it: read into its own buffer
    frontend.send(b"I" + struct.pack("!i", -1), frame("big", large), frame("bigger", larger), frame("small", b"s"))
    answers = frontend.answers(3)
    assert json.loads(answers["big"]["body"])["payload"] == large.decode()
    assert json.loads(answers["bigger"]["body"])["payload"] == larger.decode()
    assert json.loads(answers["small"]["body"])["payload"] == "s"


def test_a_describe_call_is_never_refused(wire):
    frontend, model, _ = started(wire, ZeroWaitConfig(max_batch=1, max_pending=1))
    behind_a_busy_model(frontend, model, frame("r1", b"1"), frame("r2", b"2"), frame("d", b"", {"describe": "True"}))
    answers = frontend.answers(4)
    assert [answers[k]["status"] for k in ("r0", "r1", "r2", "d")] == [200, 200, 503, 200]


def test_a_describe_call_runs_alone(wire):
    frontend, model, _ = started(wire, ZeroWaitConfig(max_batch=8))
    behind_a_busy_model(frontend, model, frame("r1", b"1"), frame("d", b"", {"describe": "True"}), frame("r2", b"2"))
    frontend.answers(4)
    assert model.runs == [1, 1, 1, 1]


# --- the handlers, driven by the loop -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_wait_dir(digits_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-wait-unit")
    store = str(root / "store")
    support.build_models(store, [support.digits_model(
        "digits", "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
        serving={"batch_size": 8, "batching": "zero_wait"})])
    return support.extract(os.path.join(store, "digits_v1.0.mar"), str(root / "model"))


def run_handler(handler, wire) -> None:
    _, worker_end = wire
    serve(handler.zero_wait, worker_end, handler.context)


def test_handler_installs_its_loop_in_place_of_torchserve_s(zero_wait_dir, monkeypatch):
    from ts.async_service import AsyncService

    monkeypatch.setattr(AsyncService, "run", AsyncService.run)  # put back after the test
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir, metrics=metrics_cache()))
    assert h.zero_wait is not None and h.zero_wait.config == ZeroWaitConfig(max_batch=8, max_pending=100)
    assert AsyncService.run.__qualname__.startswith("DrainingWorker.install")


def test_handler_answers_a_mixed_burst_per_request(zero_wait_dir, wire):
    frontend, _ = wire
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir, metrics=metrics_cache()))
    run_handler(h, wire)
    frontend.send(*(frame(f"r{i}", body(i) if i % 3 else b'{"data": [1,', {"host": "127.0.0.1"})
                    for i in range(12)))
    twins: list[str] = []
    answers: dict[str, dict] = {}
    while len(answers) < 12 or len(twins) < 12:
        for p in frontend.response():
            (twins.append(p["id"]) if is_twin(p) else answers.update({p["id"]: p}))
    for i in range(12):
        out = json.loads(answers[f"r{i}"]["body"])
        assert answers[f"r{i}"]["status"] == (200 if i % 3 else 400)
        assert out["model" if i % 3 else "type"] == ("digits" if i % 3 else "malformed_json")
    assert sorted(twins) == sorted(answers), "every HTTP answer has its end-of-stream twin"


def test_describe_in_zero_wait_mode(zero_wait_dir, wire):
    frontend, _ = wire
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir, metrics=metrics_cache()))
    run_handler(h, wire)
    frontend.send(frame("d", b"", {"describe": "True"}))
    predictions = frontend.response()
    assert len(predictions) == 1, "describe gets no twin (the frontend would write it as a second response)"
    assert predictions[0]["headers"]["ts_stream_next"] == "false", "its answer ends the job itself"
    assert json.loads(predictions[0]["body"])["batching"]["mode"] == "zero_wait"


def test_a_refused_oip_grpc_call_gets_a_body_the_bridge_can_read(zero_wait_dir, wire):
    """TorchServe's OIP gRPC bridge reads every answer as an OIP response; an `{"error": ...}` body kills the
    worker, so a refusal must be OIP-shaped too."""
    frontend, _ = wire
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir, metrics=metrics_cache()))
    h.zero_wait.config = ZeroWaitConfig(max_batch=1, max_pending=1)
    run_handler(h, wire)
    oip = json.dumps({"id": "call-7", "model_name": "digits", "inputs": [
        {"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]}).encode()
    frontend.send(*(frame(f"g{i}", oip) for i in range(6)))  # the bridge's calls carry no headers at all
    answers = frontend.answers(6)
    refused = [a for a in answers.values() if a["status"] == 503]
    assert refused, "six calls at once on a worker that holds one: some are refused"
    for answer in answers.values():
        assert answer["headers"]["ts_stream_next"] == "false", "a gRPC answer ends its job itself, without a twin"
    body = json.loads(refused[0]["body"])
    assert body["id"] == "call-7" and body["model_name"] == "digits" and body["outputs"][0]["name"] == "error"


def test_release_jobs_twins_http_answers_and_marks_grpc_answers_themselves(zero_wait_dir):
    from ts.protocol.otf_message_handler import create_predict_response

    context = support.make_context(zero_wait_dir)
    data = support.torchserve_batch(context, [(b"a", JSON), (b"b", JSON)], [{"host": "h"}, {}])
    requests = [Request(payload=b"a", headers={"host": "h"}), Request(payload=b"b")]  # the second came over gRPC
    bodies = release_jobs([b"A", b"B"], requests, data, context)
    assert bodies == [b"A", b"B", b""] and len(data) == 3
    assert context.request_ids == {0: "req-0", 1: "req-1", 2: "req-0"}
    message = create_predict_response(bodies, context.request_ids, "ok", 200, context=context)
    # the HTTP answer is left alone and its twin ends the job; the gRPC answer ends its own job
    assert [context.get_response_headers(i).get("ts_stream_next") for i in range(3)] == [None, "false", "false"]
    assert message.count(b"ts_stream_next") == 2


@pytest.fixture(scope="module")
def router_dir(digits_store, tmp_path_factory):
    from archiver.build import build

    root = tmp_path_factory.mktemp("zero-wait-ab")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    ab = {"name": "ab", "version": "1.0", "sticky": {"header": "X-Request-Key"},
          "variants": [{"name": "a", "archive": "digits_v1.0.mar", "weight": 0.5},
                       {"name": "b", "archive": "digits_v2.0.mar", "weight": 0.5}],
          "serving": {"batch_size": 8, "batching": "zero_wait"}, "workflow": {"enabled": False}}
    result = build(parse(DeploySpec, {"model_store": store, "ab": [ab]}), progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return support.extract(os.path.join(store, "ab_v1.0.mar"), str(root / "router"))


def test_router_in_zero_wait_mode_names_each_requests_variant(router_dir, wire):
    frontend, _ = wire
    h = ABRouterHandler()
    h.initialize(support.make_context(router_dir, metrics=metrics_cache()))
    run_handler(h, wire)
    users = [f"user-{i}" for i in range(8)] + ["\x01bad"]
    frontend.send(*(frame(f"r{i}", body(1), {"X-Request-Key": u}) for i, u in enumerate(users)))
    answers = frontend.answers(len(users))
    variants = []
    for i, user in enumerate(users):
        answer, out = answers[f"r{i}"], json.loads(answers[f"r{i}"]["body"])
        if user.startswith("\x01"):
            assert answer["status"] == 400 and out["type"] == "invalid_route_key"
            continue
        variants.append(answer["headers"][VARIANT_HEADER])
        assert answer["status"] == 200 and out["variant"] == variants[-1]
    assert set(variants) == {"a", "b"}


# --- the CLI and the status line ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, mode, delay", [
    ([], DEFAULT_BATCHING, 0 if DEFAULT_BATCHING == "zero_wait" else 2),
    (["--batching", "delay"], "delay", 2),
    (["--max-batch-delay", "5"], "delay", 5),
    (["--batching", "zero_wait"], "zero_wait", 0),
])
def test_build_flags_choose_the_batching(flags, mode, delay):
    from archiver.cli import build_parser, spec_from_flags

    args = build_parser().parse_args(["build", "--name", "m", "--model-class", "m.py:M", "--weights", "w.pt",
                                      "--input-shape", "1,8,8", *flags])
    serving = spec_from_flags(args).models[0].serving
    assert (serving.batching, serving.max_batch_delay_ms) == (mode, delay)


def test_status_names_a_zero_wait_workers_batching_not_torchserve_s_batch_size_of_1():
    from archiver.operate.status import format_status

    status = {"running": True, "pid": 1, "started_at": "t", "healthy": True, "ping": "Healthy",
              "inference_url": "http://127.0.0.1:8080", "models": {"digits": [
                  {"version": "1.0", "default": True, "workers": "2/2 ready", "batch_size": 1,
                   "batching": "zero-wait batch 8"},
                  {"version": "2.0", "default": False, "workers": "1/1 ready", "batch_size": 8}]}}
    text = format_status(status)
    assert "digits 1.0 (default): 2/2 ready, zero-wait batch 8," in text
    assert "digits 2.0: 1/1 ready, batch 8," in text
