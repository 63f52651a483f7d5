"""A/B routing, the workflow envelope, shadow agreement: in-process, on real archives and Contexts."""

from __future__ import annotations

import json
import random
import threading

import numpy as np
import pytest

from handlers.errors import InvalidRouteKey, SpecError
from handlers.request import Request
from handlers.routing import (
    SKIPPED,
    RoutingPolicy,
    Variant,
    stable_fraction,
    unwrap,
    workflow_variant,
    wrap,
)
from handlers.shadow import ShadowRunner, agreement
from tests import support


def policy(*weights: float, **kwargs) -> RoutingPolicy:
    return RoutingPolicy(variants=tuple(Variant(chr(ord("a") + i), w) for i, w in enumerate(weights)), **kwargs)


def test_stable_hash_does_not_depend_on_the_process():
    code = "from handlers.routing import stable_fraction; print(stable_fraction('exp', 'user-42'))"
    outputs = set()
    for seed in ("0", "1", "random"):
        done = support.python("-c", code, env={"PYTHONHASHSEED": seed})
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout.strip())
    assert outputs == {repr(stable_fraction("exp", "user-42"))}


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.9, 0.1), (0.2, 0.3, 0.5)])
def test_keyed_split_follows_the_weights(weights):
    p = policy(*weights, salt="exp")
    counts = {v.name: 0 for v in p.variants}
    for i in range(100_000):
        counts[p.choose(f"user-{i}").name] += 1
    for variant, weight in zip(p.variants, weights):
        assert counts[variant.name] / 100_000 == pytest.approx(weight, abs=0.01)


def test_same_key_same_variant_and_salt_reshuffles():
    p, other = policy(0.5, 0.5, salt="exp-1"), policy(0.5, 0.5, salt="exp-2")
    keys = [f"k{i}" for i in range(200)]
    first = [p.choose(k).name for k in keys]
    assert first == [p.choose(k).name for k in keys]
    assert first != [other.choose(k).name for k in keys]


def test_requests_without_a_key_split_at_random_by_weight():
    p = policy(0.7, 0.3)
    rng = random.Random(0)
    share = sum(p.choose(None, rng).name == "a" for _ in range(20_000)) / 20_000
    assert share == pytest.approx(0.7, abs=0.02)


def test_key_comes_from_the_header_then_the_body_field():
    p = policy(0.5, 0.5, sticky_header="X-Request-Key", sticky_field="user")
    assert p.key_of(Request(b"", headers={"x-request-key": "h"}), {"user": "f"}) == "h"
    assert p.key_of(Request(b""), {"user": 7}) == "7"
    assert p.key_of(Request(b""), None) is None
    with pytest.raises(InvalidRouteKey, match="1 to 256 characters"):
        p.key_of(Request(b"", headers={"x-request-key": "x" * 300}))


@pytest.mark.parametrize("weights,message", [((0.5, 0.6), "sum to 1"), ((1.0,), "two or more"),
                                             ((1.2, -0.2), ">= 0")])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(SpecError, match=message):
        policy(*weights)


def test_envelope_round_trip_and_node_names():
    request = Request(payload=b"\x89PNG raw", content_type="image/png", headers={"x-request-key": "k"})
    variant, original = unwrap(Request(payload=wrap("b", request, "k").encode()))
    assert variant == "b" and original.payload == b"\x89PNG raw" and original.content_type == "image/png"
    assert unwrap(Request(payload=b'{"data": [1]}')) is None
    assert workflow_variant("digits-ab__b") == "b" and workflow_variant("digits") is None


def test_workflow_node_that_was_not_chosen_answers_without_inference(digits_dir):
    from handlers.tensor import TensorHandler

    context = support.make_context(digits_dir)
    context.model_name = "digits-ab__a"
    handler = TensorHandler()
    handler.initialize(context)
    calls = []
    run = handler.pipeline.runtime.run

    def counting_run(inputs: dict) -> dict:
        calls.append({name: array.shape[0] for name, array in inputs.items()})  # rows per named input, not inputs
        return run(inputs)

    handler.pipeline.runtime.run = counting_run
    body = Request(payload=json.dumps({"data": np.zeros((1, 8, 8)).tolist()}).encode(), content_type="application/json")
    envelopes = [(wrap("a", body, "k1").encode(), ""), (wrap("b", body, "k2").encode(), "")]
    data = support.torchserve_batch(context, envelopes)
    answers = [json.loads(a) for a in handler.handle(data, context)]
    assert answers[1] == SKIPPED and answers[0]["variant"] == "a" and "predictions" in answers[0]
    assert calls == [{"input": 1}]  # one row ran: the request routed to this node


def test_workflow_route_and_merge_functions(tmp_path):
    from ts.context import Context

    from handlers import ab_workflow
    from handlers.routing import ROUTER_MANIFEST_FILE, RouterManifest

    manifest = RouterManifest(name="wf", version="1.0", policy=policy(0.5, 0.5, salt="wf"))
    (tmp_path / ROUTER_MANIFEST_FILE).write_text(json.dumps(manifest.to_json()))
    context = Context("wf__route", str(tmp_path), {}, 4, None, "0.12.0")
    ab_workflow._policy.clear()
    assert ab_workflow.route(None, context) is None
    data = support.torchserve_batch(context, [(b'{"data": [1]}', "application/json")] * 2,
                                    headers=[{"X-Request-Key": "alice"}, {"X-Request-Key": "x" * 500}])
    envelopes = ab_workflow.route(data, context)
    variant, original = unwrap(Request(payload=envelopes[0].encode()))
    assert variant == manifest.policy.choose("alice").name and original.payload == b'{"data": [1]}'
    assert unwrap(Request(payload=envelopes[1].encode()))[1]["type"] == "invalid_route_key"
    merged = ab_workflow.merge([{"a": json.dumps(SKIPPED).encode(), "b": b'{"variant": "b", "predictions": []}'}],
                               context)
    assert json.loads(merged[0]) == {"variant": "b", "predictions": []}


def test_shadow_agreement_rules():
    top = lambda i: {"predictions": [{"index": i, "probability": 0.9}]}  # noqa: E731
    assert agreement(top(3), top(3)) == "agree"
    assert agreement(top(3), top(4)) == "disagree"
    assert agreement({"output": [1.0, 2.0]}, {"output": [1.0, 2.0000001]}) == "agree"
    assert agreement({"error": "x", "type": "shape_mismatch"}, {"error": "y", "type": "shape_mismatch"}) == "agree"
    assert agreement(top(1), {"error": "boom", "type": "inference_failed"}) == "error"


def test_shadow_queue_drops_instead_of_growing(digits_dir):
    from handlers.device import Placement
    from handlers.pipeline import Answer, Pipeline

    pipeline = Pipeline.load(digits_dir, Placement("cpu", None, 1))
    taken, gate = threading.Event(), threading.Event()
    process = pipeline.process

    def blocked_process(*args, **kwargs):
        taken.set()  # the shadow thread holds the first pair: the queue is empty again
        assert gate.wait(10)
        return process(*args, **kwargs)

    pipeline.process = blocked_process
    outcomes: list = []
    runner = ShadowRunner(pipeline, "shadow", lambda p, s, o: outcomes.append(o), queue_size=2)
    body = Request(payload=json.dumps({"data": np.zeros((1, 8, 8)).tolist()}).encode(), content_type="application/json")
    answer = Answer(200, {"predictions": [{"index": -1}]})
    runner.submit("a", [(body, answer)])  # taken by the thread, blocked on the gate
    assert taken.wait(10)
    runner.submit("a", [(body, answer)] * 4)  # two fit in the queue, two are dropped
    assert outcomes.count("dropped") == 2
    gate.set()
    assert runner.drain(10)
    assert outcomes.count("disagree") == 3  # the shadow's top-1 is never -1
