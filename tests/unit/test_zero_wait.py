"""Zero-wait batching without a server: the spec setting, model-config.yaml, the queue, and the handlers driven the
way TorchServe's async worker drives them (a deep copy of the context per call, every call awaited on one loop)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil

import numpy as np
import pytest

from archiver.package.archive import model_config
from archiver.spec import DEFAULT_BATCHING, DeploySpec, ServingSpec
from handlers.ab_router import VARIANT_HEADER, ABRouterHandler
from handlers.errors import ModelLoadError, SpecError
from handlers.pipeline import Answer
from handlers.request import Request
from handlers.spec import parse
from handlers.tensor import TensorHandler
from handlers.zero_wait import ZeroWaitBatcher, ZeroWaitConfig, release_jobs, zero_wait_config
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


# --- the queue ---------------------------------------------------------------------------------------------------


def counting_answer(runs: list):
    """An `answer` that records each batch's size and answers every request with its batch's size."""
    def answer(requests: list[Request]) -> list[Answer]:
        runs.append(len(requests))
        return [Answer(200, {"batch": len(requests), "payload": r.payload}) for r in requests]
    return answer


def test_queue_runs_the_first_request_alone_then_takes_what_queued_up_to_max_batch():
    runs: list[int] = []
    batcher = ZeroWaitBatcher(counting_answer(runs), ZeroWaitConfig(max_batch=4, max_pending=100))

    async def scenario():
        lone = await batcher.submit([Request(payload=0)])
        # 10 calls arrive together (TorchServe starts each as its own task on the loop).
        burst = await asyncio.gather(*(batcher.submit([Request(payload=i)]) for i in range(1, 11)))
        return lone, burst

    lone, burst = asyncio.run(scenario())
    assert lone[0].body == {"batch": 1, "payload": 0}
    assert runs == [1, 4, 4, 2]
    assert [answers[0].body["payload"] for answers in burst] == list(range(1, 11)), "each call gets its own answer"
    assert batcher.describe()["held"] == 0 and batcher.describe()["batches"] == 4


def test_a_call_larger_than_max_batch_runs_alone_and_whole():
    runs: list[int] = []
    batcher = ZeroWaitBatcher(counting_answer(runs), ZeroWaitConfig(max_batch=2, max_pending=10))

    async def scenario():
        return await asyncio.gather(batcher.submit([Request(payload=i) for i in range(3)]),
                                    batcher.submit([Request(payload=9)]))

    big, small = asyncio.run(scenario())
    assert runs == [3, 1] and [a.body["payload"] for a in big] == [0, 1, 2] and small[0].body["payload"] == 9


def test_over_max_pending_the_worker_answers_503_at_once():
    runs: list[int] = []
    batcher = ZeroWaitBatcher(counting_answer(runs), ZeroWaitConfig(max_batch=4, max_pending=6))

    async def scenario():
        return await asyncio.gather(*(batcher.submit([Request(payload=i)]) for i in range(9)))

    answers = [a[0] for a in asyncio.run(scenario())]
    assert [a.status for a in answers] == [200] * 6 + [503] * 3
    assert answers[-1].error_type == "overloaded" and "zero_wait.max_pending 6" in answers[-1].body["error"]
    assert sum(runs) == 6


def test_a_failing_answer_costs_its_batch_an_error_answer_not_the_loop():
    def broken(requests):
        raise RuntimeError("decoder bug")

    batcher = ZeroWaitBatcher(broken, ZeroWaitConfig(max_batch=4))

    async def scenario():
        first = await batcher.submit([Request(payload=1)])
        return first, await batcher.submit([Request(payload=2)])

    first, second = asyncio.run(scenario())
    assert first[0].status == 500 and "decoder bug" in first[0].body["error"] and second[0].status == 500


def test_metrics_are_flushed_on_the_loop_every_flush_period():
    flushes: list[int] = []
    batcher = ZeroWaitBatcher(counting_answer([]), ZeroWaitConfig(), flush=lambda: flushes.append(1), flush_s=0.01)

    async def scenario():
        await batcher.submit([Request(payload=1)])
        while len(flushes) < 2:  # the timer re-arms itself; the test ends when it has fired twice
            await asyncio.sleep(0.005)

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert len(flushes) >= 2


# --- the handlers, driven like TorchServe's async worker -----------------------------------------------------------


@pytest.fixture(scope="module")
def zero_wait_dir(digits_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero-wait-unit")
    store = str(root / "store")
    support.build_models(store, [support.digits_model(
        "digits", "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
        serving={"batch_size": 8, "batching": "zero_wait"})])
    return support.extract(os.path.join(store, "digits_v1.0.mar"), str(root / "model"))


def calls(handler, context, bodies, headers=None):
    """Each body as its own `predict` call: a deep copy of the context (as ts/async_service.py takes), then handle."""
    made = []
    for i, item in enumerate(bodies):
        own = copy.deepcopy(context)
        data = support.torchserve_batch(own, [item], [headers[i]] if headers else None)
        made.append((own, data, handler.handle(data, own)))
    return made


async def answered(made):
    return await asyncio.gather(*(coroutine for _, _, coroutine in made))


def test_handler_answers_a_mixed_burst_per_call(zero_wait_dir):
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir))
    bodies = [(body(i), JSON) if i % 3 else (b'{"data": [1,', JSON) for i in range(12)]
    made = calls(h, h.context, bodies, headers=[{"host": "127.0.0.1"}] * 12)
    outs = asyncio.run(answered(made))
    for i, ((own, data, _), out) in enumerate(zip(made, outs)):
        assert support.statuses(own, 1) == [200 if i % 3 else 400]
        assert json.loads(out[0])["model" if i % 3 else "type"] == ("digits" if i % 3 else "malformed_json")
        assert out[1:] == [b""] and len(data) == 2, "an HTTP request's answer has its end-of-stream twin"
    assert h.batcher.describe()["batches"] == 2, "12 calls at once: one batch of 8, then 4"
    assert h.context.request_ids is None, "each call had a copy of its own"


def test_describe_in_zero_wait_mode(zero_wait_dir):
    h = TensorHandler()
    h.initialize(support.make_context(zero_wait_dir))
    own = copy.deepcopy(h.context)
    data = support.torchserve_batch(own, [(b"", JSON)], [{"describe": "True"}])
    out = asyncio.run(h.handle(data, own))
    assert json.loads(out[0])["batching"]["mode"] == "zero_wait" and len(out) == 1, "describe gets no twin"


def test_release_jobs_marks_only_the_twins_and_only_for_http(zero_wait_dir):
    from ts.protocol.otf_message_handler import create_predict_response

    context = copy.deepcopy(support.make_context(zero_wait_dir))
    data = support.torchserve_batch(context, [(b"a", JSON), (b"b", JSON)], [{"host": "h"}, {}])
    requests = [Request(payload=b"a", headers={"host": "h"}), Request(payload=b"b")]  # the second came over gRPC
    bodies = release_jobs([b"A", b"B"], requests, data, context)
    assert bodies == [b"A", b"B", b""] and len(data) == 3
    assert context.request_ids == {0: "req-0", 1: "req-1", 2: "req-0"}
    message = create_predict_response(bodies, context.request_ids, "ok", 200, context=context)
    assert [context.get_response_headers(i).get("ts_stream_next") for i in range(3)] == [None, None, "false"]
    assert message.count(b"ts_stream_next") == 1


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


def test_router_in_zero_wait_mode_names_each_calls_variant(router_dir):
    h = ABRouterHandler()
    h.initialize(support.make_context(router_dir))
    users = [f"user-{i}" for i in range(8)] + ["\x01bad"]
    made = calls(h, h.context, [(body(1), JSON)] * len(users), headers=[{"X-Request-Key": u} for u in users])
    outs = asyncio.run(answered(made))
    variants = []
    for (own, _, _), out, user in zip(made, outs, users):
        answer = json.loads(out[0])
        if user.startswith("\x01"):
            assert support.statuses(own, 1) == [400] and answer["type"] == "invalid_route_key"
            continue
        variants.append(own.get_response_headers(0)[VARIANT_HEADER])
        assert support.statuses(own, 1) == [200] and answer["variant"] == variants[-1]
    assert set(variants) == {"a", "b"} and h.batcher.describe()["batches"] == 2, "9 calls: 8, then 1"
