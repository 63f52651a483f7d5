"""The A/B router's limits against a real TorchServe: shadow drops and sampling on the metrics port, sticky
routing across router workers, and the `.war`'s node timeout and retries as TorchServe applies them.

"slow" is a digits-shaped model (shipped as a state_dict with its class) that sleeps SLOW_S seconds per batch in
the server (the variable is unset while it is built and validated): a shadow that cannot keep up, and a workflow
node slower than its timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from archiver.build import build
from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.spec import DeploySpec
from handlers.routing import RoutingPolicy, Variant
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

SLOW_S = 1.0
NODE_TIMEOUT_MS, NODE_RETRIES = 200, 2
SAMPLE = {"data": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8).tolist()}
SLOW_MODEL = '''
import os
import time

from torch import nn


class SlowNet(nn.Module):
    """Ten classes from an 8x8 image; sleeps TSPACK_TEST_SLOW_S seconds per batch where that is set."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        delay = float(os.environ.get("TSPACK_TEST_SLOW_S", "0"))
        if delay:
            time.sleep(delay)
        return self.fc(x.flatten(1))
'''


def variants(b_archive: str = "digits_v2.0.mar") -> list[dict]:
    return [{"name": "a", "archive": "digits_v1.0.mar", "weight": 0.5}, {"name": "b", "archive": b_archive,
                                                                           "weight": 0.5}]


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("ab-limits")
    store = str(root / "store")
    shutil.copytree(digits_store["store"], store)
    (root / "slow_net.py").write_text(textwrap.dedent(SLOW_MODEL))
    namespace: dict = {}
    exec(compile(SLOW_MODEL, str(root / "slow_net.py"), "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["SlowNet"]().state_dict(), root / "slow.pt")
    source = {"model_class": f"{root / 'slow_net.py'}:SlowNet", "weights": str(root / "slow.pt")}
    slow = support.digits_model("slow", "1.0", source["weights"], digits_store["samples"], source=source,
                                artifacts=[{"format": "state_dict"}])
    no_war = {"enabled": False}
    ab = [
        # every request is shadowed by the slow model, through a queue of one: most pairs must be dropped
        {"name": "drops", "version": "1.0", "variants": variants(), "workflow": no_war,
         "shadow": {"name": "slow", "archive": "slow_v1.0.mar", "queue_size": 1}},
        # two router workers; half of the requests shadowed by a fast model
        {"name": "sampled", "version": "1.0", "variants": variants(), "workflow": no_war,
         "serving": {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 2},
         "shadow": {"name": "shadow", "archive": "digits_v2.0.mar", "sample_rate": 0.5}},
        # the .war twin with the slow model as variant b
        {"name": "slowwf", "version": "1.0", "variants": variants("slow_v1.0.mar"),
         "workflow": {"timeout_ms": NODE_TIMEOUT_MS, "retry_attempts": NODE_RETRIES}},
    ]
    result = build(parse(DeploySpec, {"model_store": store, "models": [slow], "ab": ab}), progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    handle = support.start_server(str(tmp_path_factory.mktemp("ab-limits-server")), store,
                                  [entry_from_archive(f"{name}_v1.0.mar", store) for name in ("drops", "sampled")],
                                  env={"TSPACK_TEST_SLOW_S": str(SLOW_S), "TSPACK_INTRA_OP_THREADS": "1"})
    handle.client().register_workflow("slowwf_v1.0.war")
    yield handle
    stop(handle.run_dir)


def send(client, model: str, keys: list[str], threads: int = 8) -> list:
    def one(key: str):
        return client.predict(model, SAMPLE, headers={"X-Request-Key": key})

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, keys))


OUTCOMES = ("agree", "disagree", "error", "dropped")


def shadow_counts(model: str) -> dict:
    wanted = {o: ("tspack_shadow_total", {"ModelName": model, "Outcome": o}) for o in OUTCOMES}
    wanted["answered"] = ("tspack_requests_total", {"ModelName": model})
    return wanted


def test_a_slow_shadow_drops_pairs_and_the_metrics_port_counts_them(server):
    client = server.client()
    before = support.settled_metrics(client)
    keys = [f"drop-{i}" for i in range(30)]
    answers = send(client, "drops", keys)
    assert [r.status_code for r in answers] == [200] * len(keys)
    assert all("slow" not in r.text for r in answers), "the shadow's answer never reaches the client"
    deltas = support.wait_for_deltas(client, before, shadow_counts("drops"),
                                     lambda d: sum(d[o] for o in OUTCOMES) >= len(keys) and d["answered"] >= len(keys),
                                     timeout_s=60, settle_s=SLOW_S + 1.5)
    assert deltas["answered"] == len(keys)
    assert sum(deltas[o] for o in OUTCOMES) == len(keys), deltas  # every pair compared or counted as dropped
    assert deltas["dropped"] >= 1 and deltas["agree"] + deltas["disagree"] >= 1, deltas
    assert deltas["error"] == 0


def test_shadow_sample_rate_shadows_about_that_share(server):
    client = server.client()
    before = support.settled_metrics(client)
    keys = [f"sample-{i}" for i in range(200)]
    assert [r.status_code for r in send(client, "sampled", keys)] == [200] * len(keys)
    deltas = support.wait_for_deltas(client, before, shadow_counts("sampled"),
                                     lambda d: d["answered"] >= len(keys), timeout_s=60, settle_s=2.5)
    assert deltas["answered"] == len(keys)
    shadowed = sum(deltas[o] for o in OUTCOMES)
    assert 60 <= shadowed <= 140, deltas  # 0.5 x 200 = 100; sd ~7: this fails by chance once in ~10^8 runs
    assert deltas["error"] == 0


class Log:
    """TorchServe's own log (ts_log.log), read from where it stood when this was made."""

    def __init__(self, server):
        self.path = os.path.join(server.log_dir, "ts_log.log")
        self.start = os.path.getsize(self.path)

    def text(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            f.seek(self.start)
            return f.read()


def test_sticky_keys_land_on_the_same_variant_whichever_router_worker_answers(server):
    client = server.client()
    workers = [w for d in client.describe("sampled") for w in d["workers"]]
    assert len(workers) == 2 and all(w["status"] == "READY" for w in workers)
    policy = RoutingPolicy(variants=(Variant("a", 0.5), Variant("b", 0.5)), salt="sampled")
    keys = [f"user-{i}" for i in range(300)]
    log = Log(server)
    rounds = [[r.json()["variant"] for r in send(client, "sampled", keys)] for _ in range(3)]
    assert rounds[0] == rounds[1] == rounds[2] == [policy.choose(k).name for k in keys]
    # which worker answered each batch: TorchServe logs it per batch (the handler cannot know its worker id)
    answered = re.findall(r"\] (W-\d+)-sampled_1\.0 \S+ - Backend response time", log.text())
    assert sorted(set(answered)) == sorted(f"W-{w['id']}" for w in workers), set(answered)


def test_workflow_node_timeout_and_retries_are_the_ones_torchserve_applies(server):
    """A request routed to the slow node: TorchServe invokes it 1 + retry-attempts times, each attempt timed out
    after timeout-ms (its default, 10 s, would have waited the 1 s out), then answers an error."""
    client = server.client()
    policy = RoutingPolicy(variants=(Variant("a", 0.5), Variant("b", 0.5)), salt="slowwf")
    slow_key = next(f"k{i}" for i in range(100) if policy.choose(f"k{i}").name == "b")
    fast_key = next(f"k{i}" for i in range(100) if policy.choose(f"k{i}").name == "a")
    fast = client.workflow_predict("slowwf", SAMPLE, headers={"X-Request-Key": fast_key})
    assert fast.status_code == 200 and fast.json()["variant"] == "a"
    log = Log(server)
    slow = client.workflow_predict("slowwf", SAMPLE, headers={"X-Request-Key": slow_key})
    assert slow.status_code >= 400 or "error" in slow.text, slow.text
    failed = f"Failed to execute workflow Node after {NODE_RETRIES} attempts : Error executing b"
    text = support.wait_until(lambda: (lambda t: t if failed in t else "")(log.text()))
    assert failed in text
    assert re.findall(r"DagExecutor - Invoking -  b for attempt (\d+)", text) == [
        str(i) for i in range(NODE_RETRIES + 1)]
    assert re.findall(r"DagExecutor - Timed out while executing b for attempt (\d+)", text) == [
        str(i) for i in range(NODE_RETRIES)]
