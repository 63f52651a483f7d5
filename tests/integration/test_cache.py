"""The response cache against a real TorchServe (issue 21): exact hit/miss/evicted counts on the metrics port,
one entry for an image sent as PNG bytes or as base64, a new version that misses, the byte limit, and hits that
answer the bytes of the miss.

Archives: digits 1.0 (tensor, max 3 entries), digits 2.0 (tensor, a byte limit of a few answers) and
digits-image 1.0 (the image front end). Counters reach Prometheus through the worker's one-second flush, so
every count is polled for, never slept on.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.operate.status import parse_prometheus
from archiver.package.archive import archive_info
from handlers.cache import ENTRY_OVERHEAD_BYTES, MB
from handlers.metrics import CACHE
from tests import support

pytestmark = pytest.mark.integration

MAX_ENTRIES = 3
BYTE_LIMIT_MB = 0.003  # ~4 digits answers (~230 B of JSON + ENTRY_OVERHEAD_BYTES each)
OUTCOMES = ("hit", "miss", "evicted")


def x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 8, 8), dtype=np.float32)


def cache_counts(client, before: list, version: str, model: str = "digits",
                 want: dict | None = None) -> dict[str, float]:
    """tspack_cache_total deltas by Outcome since `before`; polled until they reach `want` when given."""
    wanted = {o: (CACHE, {"ModelName": model, "ModelVersion": version, "Outcome": o}) for o in OUTCOMES}
    done = (lambda d: all(d[o] >= want.get(o, 0) for o in OUTCOMES)) if want else (lambda d: True)
    return support.wait_for_deltas(client, before, wanted, done, timeout_s=30.0)


def described_cache(client, model: str, version: str) -> dict:
    described = client.describe(model, version, customized=True)[0]["customizedMetadata"]
    return (json.loads(described) if isinstance(described, str) else described)["cache"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    store, work = str(root / "store"), str(root / "work")
    (root / "work").mkdir()
    samples = support.digits_samples(work)
    w1, w2 = support.digits_weights(work, 1), support.digits_weights(work, 2)
    support.build_models(store, [
        support.digits_model("digits", "1.0", w1, samples,
                             serving={"batch_size": 8, "max_batch_delay_ms": 5, "cache": {"max_entries": MAX_ENTRIES}}),
        support.digits_model("digits", "2.0", w2, samples,
                             serving={"batch_size": 8, "max_batch_delay_ms": 5,
                                      "cache": {"max_entries": 1000, "max_mb": BYTE_LIMIT_MB}}),
        support.digits_model("digits-image", "1.0", w1, samples, frontend="image", image=dict(support.IMAGE_SPEC),
                             serving={"batch_size": 8, "max_batch_delay_ms": 5, "cache": {"max_entries": 8}}),
    ])
    entries = [entry_from_archive(mar, store) for mar in ("digits_v1.0.mar", "digits-image_v1.0.mar")]
    handle = support.start_server(str(root), store, entries)
    try:
        client = handle.client()
        client.register("digits_v2.0.mar")  # a second version of `digits`, not its default
        client.set_default("digits", "1.0")
        yield {"client": client, "store": store}
    finally:
        stop(handle.run_dir, quiet=True)


def test_the_archive_carries_the_cache_section(served):
    _, _, config = archive_info(f"{served['store']}/digits_v2.0.mar")
    assert config["handler"]["cache"] == {"max_entries": 1000, "max_mb": BYTE_LIMIT_MB, "ttl_s": None}


def test_hits_misses_and_evictions_are_counted_exactly(served):
    client = served["client"]
    # Whatever the module's other tests left in this version's cache, three keys no other test sends leave it
    # holding exactly these three, oldest first: the counts below are then this test's own, in any test order.
    for seed in (901, 902, 903):
        assert client.predict("digits", {"data": x(seed).tolist()}, version="1.0").status_code == 200
    before = support.settled_metrics(client)
    first: dict[int, bytes] = {}
    # LRU of 3 holding 901 902 903: 1m 2m 3m (each evicts one of them) 1h | 4m (evicts 2) 2m (evicts 3) 1h
    # 3m (evicts 4)
    for seed in (1, 2, 3, 1, 4, 2, 1, 3):
        response = client.predict("digits", {"data": x(seed).tolist()}, version="1.0")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/json")
        # a hit (and a recomputed miss) answers byte for byte what the first miss answered
        assert response.content == first.setdefault(seed, response.content)
    assert json.loads(first[1])["version"] == "1.0"
    want = {"hit": 2, "miss": 6, "evicted": 6}
    assert cache_counts(client, before, "1.0", want=want) == want
    described = described_cache(client, "digits", "1.0")
    assert described["entries"] == MAX_ENTRIES


def test_png_and_base64_of_one_image_hit_one_entry(served):
    client = served["client"]
    before = support.settled_metrics(client)
    png = support.digit_png(x(7))
    as_png = client.predict("digits-image", data=png, content_type="image/png")
    as_json = client.predict("digits-image", {"data": base64.b64encode(png).decode()})
    as_text = client.predict("digits-image", data=base64.b64encode(png), content_type="text/plain")
    assert [r.status_code for r in (as_png, as_json, as_text)] == [200, 200, 200], as_json.text
    assert as_png.content == as_json.content == as_text.content
    want = {"hit": 2, "miss": 1, "evicted": 0}
    assert cache_counts(client, before, "1.0", model="digits-image", want=want) == want
    assert described_cache(client, "digits-image", "1.0")["entries"] == 1


def test_a_new_version_misses(served):
    client = served["client"]
    sample = {"data": x(11).tolist()}
    before = support.settled_metrics(client)
    old = client.predict("digits", sample, version="1.0")
    new = client.predict("digits", sample, version="2.0")
    assert old.status_code == new.status_code == 200
    assert (json.loads(old.content)["version"], json.loads(new.content)["version"]) == ("1.0", "2.0")
    again = client.predict("digits", sample, version="2.0")
    assert again.content == new.content
    assert cache_counts(client, before, "2.0", want={"hit": 1, "miss": 1})["miss"] == 1


def test_the_byte_limit_holds(served):
    client = served["client"]
    before = support.settled_metrics(client)
    sent = 10
    for seed in range(100, 100 + sent):
        assert client.predict("digits", {"data": x(seed).tolist()}, version="2.0").status_code == 200
    cache = described_cache(client, "digits", "2.0")
    assert cache["max_bytes"] == int(BYTE_LIMIT_MB * MB)
    assert cache["bytes"] <= cache["max_bytes"]
    assert 1 <= cache["entries"] < sent and cache["bytes"] >= cache["entries"] * ENTRY_OVERHEAD_BYTES
    assert cache["evicted"] == cache["miss"] - cache["entries"], "every miss was stored; the limit evicted the rest"
    counted = cache_counts(client, before, "2.0", want={"miss": sent})
    assert counted["miss"] == sent and counted["hit"] == 0
    # every eviction in this test shows on the metrics port (earlier ones, if any, are in `before`)
    total_evicted = sum(v for n, tags, v in parse_prometheus(client.metrics())
                        if n == CACHE and tags.get("ModelVersion") == "2.0" and tags.get("Outcome") == "evicted")
    assert total_evicted == cache["evicted"]
