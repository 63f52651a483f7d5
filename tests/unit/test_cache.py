"""The response cache (issue 21) on a real Context and real archives, without a server."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import yaml

from archiver.package.archive import model_config
from archiver.spec import DeploySpec, ServingSpec
from handlers.ab_router import VARIANT_HEADER, ABRouterHandler
from handlers.cache import (
    ENTRY_OVERHEAD_BYTES,
    MB,
    CacheConfig,
    CachedAnswer,
    ResponseCache,
    Uncacheable,
    cache_config,
    response_key,
)
from handlers.errors import ModelLoadError, SpecError
from handlers.pipeline import BatchStats
from handlers.request import Decoded, Request
from handlers.spec import parse
from handlers.tensor import TensorHandler
from tests import support

JSON = "application/json"


def sample(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 8, 8), dtype=np.float32)


def body(seed: int) -> bytes:
    return json.dumps({"data": sample(seed).tolist()}).encode()


def turn_on(model_dir: str, **cache) -> None:
    """Write `handler.cache` into an unpacked archive's model-config.yaml, as `serving.cache` builds it."""
    path = os.path.join(model_dir, "model-config.yaml")
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    config.setdefault("handler", {})["cache"] = cache
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f)


def handler_for(model_dir: str, metrics=None) -> TensorHandler:
    h = TensorHandler()
    h.initialize(support.make_context(model_dir, metrics=metrics))
    return h


def call(handler, bodies: list[bytes]) -> tuple[list[int], list[bytes]]:
    data = support.torchserve_batch(handler.context, [(b, JSON) for b in bodies])
    out = handler.handle(data, handler.context)
    return support.statuses(handler.context, len(bodies)), out


def test_off_by_default(digits_dir):
    h = handler_for(digits_dir)
    assert h.pipeline.cache is None and h.describe()["cache"] is None
    assert "cache" not in model_config(ServingSpec()).get("handler", {})


def test_a_hit_answers_the_bytes_of_the_miss_and_of_an_uncached_model(digits_dir):
    plain = handler_for(digits_dir)
    turn_on(digits_dir, max_entries=8)
    cached = handler_for(digits_dir)
    _, (uncached,) = call(plain, [body(1)])
    status_miss, (miss,) = call(cached, [body(1)])
    status_hit, (hit,) = call(cached, [body(1)])
    assert status_miss == status_hit == [200]
    assert hit == miss == uncached
    assert cached.pipeline.cache.describe()["hit"] == 1 and cached.pipeline.cache.describe()["miss"] == 1
    assert cached.context.get_response_content_type(0) == JSON


def test_hits_never_join_a_batch_and_errors_stay_per_request(digits_dir):
    turn_on(digits_dir, max_entries=8)
    pipeline = handler_for(digits_dir).pipeline
    pipeline.process([Request(body(1), JSON)])
    stats = BatchStats()
    answers = pipeline.process([Request(body(1), JSON), Request(body(2), JSON), Request(b'{"data": [1', JSON)],
                               stats=stats)
    assert [a.status for a in answers] == [200, 200, 400]
    assert stats.rows == 1 and stats.runs == 1, "only the miss ran"
    assert stats.cache == {"hit": 1, "miss": 1}
    assert stats.errors == {"malformed_json": 1}
    stats = BatchStats()
    answers = pipeline.process([Request(body(2), JSON), Request(body(1), JSON)], stats=stats)
    assert [a.status for a in answers] == [200, 200] and stats.runs == 0 and stats.cache == {"hit": 2}
    assert len(pipeline.cache) == 2, "errors are not cached"


def test_lru_evicts_the_least_recently_used(digits_dir):
    turn_on(digits_dir, max_entries=2)
    h = handler_for(digits_dir)
    for seed in (1, 2, 1, 3, 2):  # 1 miss, 2 miss, 1 hit, 3 miss evicts 2, 2 miss evicts 1
        assert call(h, [body(seed)])[0] == [200]
    assert {k: h.pipeline.cache.describe()[k] for k in ("hit", "miss", "evicted", "entries")} == {
        "hit": 1, "miss": 4, "evicted": 2, "entries": 2}
    assert call(h, [body(3)])[0] == [200] and h.pipeline.cache.describe()["hit"] == 2, "3 stayed"


def test_the_byte_limit_holds(digits_dir):
    _, (answer,) = call(handler_for(digits_dir), [body(0)])
    entry = len(answer) + ENTRY_OVERHEAD_BYTES
    turn_on(digits_dir, max_entries=1000, max_mb=3.5 * entry / MB)  # room for 3 answers of this size, not 4
    h = handler_for(digits_dir)
    cache = h.pipeline.cache
    for seed in range(10):
        assert call(h, [body(seed)])[0] == [200]
        assert cache.bytes <= cache.config.max_bytes
    assert len(cache) == 3 and cache.describe()["evicted"] == 7


def test_an_oip_id_is_part_of_the_key(digits_dir):
    turn_on(digits_dir, max_entries=8)
    h = handler_for(digits_dir)

    def oip(request_id: str) -> bytes:
        return json.dumps({"id": request_id, "inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                                                         "data": sample(4).reshape(-1).tolist()}]}).encode()

    _, (first, second, again) = call(h, [oip("a"), oip("b"), oip("a")])
    assert json.loads(first)["id"] == "a" and json.loads(second)["id"] == "b"
    assert h.pipeline.cache.describe()["miss"] == 3, "one batch: both 'a' requests missed"
    _, (hit,) = call(h, [oip("a")])
    assert hit == first == again and h.pipeline.cache.describe()["hit"] == 1


def decoded(array: np.ndarray, name: str = "input", **kwargs) -> Decoded:
    return Decoded({name: array}, single=kwargs.pop("single", True), protocol=kwargs.pop("protocol", "json"),
                   meta=kwargs.pop("meta", {}))


def test_the_key_covers_model_version_context_protocol_and_every_input_detail():
    x = sample(0)[None]
    meta = {"model": "digits", "version": "1.0"}
    base = response_key("digits", "1.0", meta, decoded(x))
    assert base == response_key("digits", "1.0", dict(reversed(meta.items())), decoded(x.copy()))
    others = [
        response_key("digits", "2.0", meta, decoded(x)),
        response_key("other", "1.0", meta, decoded(x)),
        response_key("digits", "1.0", {**meta, "variant": "b"}, decoded(x)),
        response_key("digits", "1.0", meta, decoded(x, protocol="oip")),
        response_key("digits", "1.0", meta, decoded(x, single=False)),
        response_key("digits", "1.0", meta, decoded(x, meta={"id": "1"})),
        response_key("digits", "1.0", meta, decoded(x, meta={"id": 1})),
        response_key("digits", "1.0", meta, decoded(x, name="pixels")),
        response_key("digits", "1.0", meta, decoded(x.view(np.int32))),  # same bytes, other dtype
        response_key("digits", "1.0", meta, decoded(x.reshape(1, 1, 64))),  # same bytes, other shape
        response_key("digits", "1.0", meta, decoded(np.asfortranarray(x[0, 0].T)[None, None])),
    ]
    assert len({base, *others}) == len(others) + 1
    with pytest.raises(Uncacheable, match="object array"):
        response_key("digits", "1.0", meta, decoded(np.array([[object()]])))
    with pytest.raises(Uncacheable, match="cannot key a set"):
        response_key("digits", "1.0", meta, decoded(x, meta={"flags": {1}}))


def test_a_request_the_key_cannot_hold_is_served_uncached(digits_dir, caplog):
    turn_on(digits_dir, max_entries=8)
    pipeline = handler_for(digits_dir).pipeline
    odd = decoded(sample(0)[None], meta={"flags": {1}})  # a set: no canonical byte form
    stats = BatchStats()
    with caplog.at_level(logging.WARNING, logger="handlers.cache"):
        answers = pipeline.infer([odd, odd], stats=stats)
    assert [a.status for a in answers] == [200, 200] and stats.runs == 1
    assert stats.cache == {} and len(pipeline.cache) == 0
    assert [r.getMessage() for r in caplog.records].count(
        "response cache bypassed (said once): Uncacheable: cannot key a set") == 1


def answer(text: str) -> CachedAnswer:
    return CachedAnswer(200, text.encode(), None, JSON, (), 1)


def test_entries_expire_after_ttl():
    now = [100.0]
    cache = ResponseCache(CacheConfig(ttl_s=5), clock=lambda: now[0])
    counts: dict = {}
    cache.store("k", answer('{"a": 1}'), counts)
    now[0] += 5
    assert cache.lookup("k", counts) is not None
    now[0] += 0.1
    assert cache.lookup("k", counts) is None
    assert counts == {"hit": 1, "miss": 1, "evicted": 1} and len(cache) == 0 and cache.bytes == 0


def test_an_answer_larger_than_the_cache_is_not_stored_and_evicts_nothing():
    cache = ResponseCache(CacheConfig(max_mb=2 * ENTRY_OVERHEAD_BYTES / MB))
    counts: dict = {}
    assert cache.store("small", answer("{}"), counts)
    assert not cache.store("big", answer("[" + "0," * ENTRY_OVERHEAD_BYTES + "0]"), counts)
    assert len(cache) == 1 and counts == {}


def test_a_hit_gives_each_caller_its_own_body():
    cache = ResponseCache(CacheConfig())
    cache.store("k", answer('{"predictions": [1]}'), {})
    first = cache.lookup("k", {}).answer_fields()
    first["body"]["predictions"].append(2)
    assert cache.lookup("k", {}).answer_fields()["body"] == {"predictions": [1]}


def test_spec_writes_the_section_the_handler_reads():
    serving = parse(ServingSpec, {"cache": {"max_entries": 100, "max_mb": 8, "ttl_s": 60}}, "serving")
    config = model_config(serving)
    assert config["handler"]["cache"] == {"max_entries": 100, "max_mb": 8.0, "ttl_s": 60.0}
    assert cache_config(yaml.safe_load(yaml.safe_dump(config))) == serving.cache
    assert cache_config({"handler": {"cache": None}}) is None and cache_config({}) is None


@pytest.mark.parametrize("cache, message", [
    ({"max_entries": 0}, r"models\[0\].serving.cache.max_entries: must be >= 1"),
    ({"max_mb": 0}, r"models\[0\].serving.cache.max_mb: must be > 0"),
    ({"ttl_s": -1}, r"models\[0\].serving.cache.ttl_s: must be > 0 seconds, or null"),
    ({"size": 1}, r"models\[0\].serving.cache: unknown key 'size'; allowed keys: max_entries, max_mb, ttl_s"),
])
def test_bad_cache_settings_name_the_key(cache, message):
    model = support.digits_model("digits", "1.0", "w.pt", serving={"cache": cache})
    with pytest.raises(SpecError, match=message):
        parse(DeploySpec, {"models": [model]})


def test_a_bad_section_in_an_archive_refuses_to_load(digits_dir):
    turn_on(digits_dir, max_entries=-1)
    with pytest.raises(ModelLoadError, match="handler.cache.max_entries: must be >= 1"):
        handler_for(digits_dir)


def emitted_cache_counts(records) -> dict[str, float]:
    """{Outcome: value} of the tspack_cache_total lines a worker writes (`[METRICS]name.Unit:value|#dims|...`)."""
    counts: dict[str, float] = {}
    for record in records:
        line = record.getMessage()
        if line.startswith("[METRICS]tspack_cache_total"):
            head, dims = line[len("[METRICS]"):].split("|#")[:2]
            assert dims.startswith("ModelName:digits,ModelVersion:1.0,Outcome:"), dims
            outcome = dims.split("Outcome:")[1].split(",")[0]
            counts[outcome] = counts.get(outcome, 0.0) + float(head.rsplit(":", 1)[1])
    return counts


def test_outcomes_are_emitted_through_torchserve(digits_dir, tmp_path, caplog):
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from archiver.deploy.properties import metrics_config_text

    config = tmp_path / "metrics.yaml"
    config.write_text(metrics_config_text())
    metrics = MetricsCacheYamlImpl(config_file_path=str(config))
    metrics.initialize_cache()
    metrics.model_name = "digits"
    turn_on(digits_dir, max_entries=1)
    h = handler_for(digits_dir, metrics=metrics)
    caplog.set_level(logging.INFO, logger="ts.metrics")
    caplog.clear()
    for bodies in ([body(1), body(2)], [body(2)], [body(1), b"{"]):  # miss miss(evicts 1) | hit | miss(evicts 2)
        data = support.torchserve_batch(h.context, [(b, JSON) for b in bodies])
        metrics.set_request_ids(h.context.request_ids)
        h.handle(data, h.context)
    h.metrics.flush()
    assert emitted_cache_counts(caplog.records) == {"hit": 1, "miss": 3, "evicted": 2}
    assert h.metrics._warned == set(), "tspack_cache_total is declared in the metrics config"


@pytest.fixture(scope="module")
def router_dir(digits_store, tmp_path_factory):
    """A router archive over digits 1.0 and 2.0 with the cache on; each variant gets its own."""
    from archiver.build import build

    root = tmp_path_factory.mktemp("cache-ab")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    ab = {"name": "ab", "version": "1.0", "sticky": {"header": "X-Request-Key"},
          "variants": [{"name": "a", "archive": "digits_v1.0.mar", "weight": 0.5},
                       {"name": "b", "archive": "digits_v2.0.mar", "weight": 0.5}],
          "serving": {"batch_size": 8, "max_batch_delay_ms": 2, "cache": {"max_entries": 16}},
          "workflow": {"enabled": False}}
    result = build(parse(DeploySpec, {"model_store": store, "ab": [ab]}), progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return support.extract(os.path.join(store, "ab_v1.0.mar"), str(root / "router"))


def test_the_router_caches_per_variant_after_routing(router_dir):
    h = ABRouterHandler()
    context = support.make_context(router_dir)
    h.initialize(context)
    a, b = h.pipelines["a"].cache, h.pipelines["b"].cache
    assert a is not None and b is not None and a is not b
    users = [f"user-{i}" for i in range(8)]

    def ask() -> tuple[list[str], list[bytes]]:
        data = support.torchserve_batch(context, [(body(1), JSON)] * len(users),
                                        headers=[{"X-Request-Key": u} for u in users])
        out = h.handle(data, context)
        assert support.statuses(context, len(users)) == [200] * len(users)
        return [context.get_response_headers(i)[VARIANT_HEADER] for i in range(len(users))], out

    variants, first = ask()
    assert set(variants) == {"a", "b"}, "8 users split over both variants"
    for answer, variant in zip(first, variants):
        assert json.loads(answer)["variant"] == variant
    again, second = ask()
    assert again == variants and second == first, "sticky users keep their variant, and its answer's bytes"
    # One input, so one entry per variant: the first of each variant's users missed, every other request hit.
    assert (len(a), len(b)) == (1, 1)
    for cache, name in ((a, "a"), (b, "b")):
        users_here = variants.count(name)
        assert (cache.totals["miss"], cache.totals["hit"]) == (users_here, users_here), name
