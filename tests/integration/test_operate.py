"""Operating a real TorchServe as the README says: token renewal by the client and the Docker health check,
`tspack swap --probe` as a user types it, and the environment `tspack serve start` gives workers.

One server for the module, started with `OMP_WAIT_POLICY` already set (as a user's shell might have it). Each
test leaves the server serving `digits` at its default version, so the tests run in any order.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading

import numpy as np
import pytest
import requests

from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.operate.status import model_versions
from tests import support

pytestmark = pytest.mark.integration

HEALTHCHECK = os.path.join(support.REPO, "docker", "healthcheck.py")
USER_OMP_WAIT_POLICY = "ACTIVE"


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("operate") / "store")
    shutil.copytree(digits_store["store"], store)
    return store


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_WAIT_POLICY", USER_OMP_WAIT_POLICY)  # in the environment of the start, not passed in
        handle = support.start_server(str(tmp_path_factory.mktemp("operate-server")), store,
                                      [entry_from_archive("digits_v1.0.mar", store)],
                                      env={"TSPACK_INTRA_OP_THREADS": "1"})  # one thread: nothing spins
    yield handle
    stop(handle.run_dir)


def read_keys(server) -> dict:
    with open(server.key_file, encoding="utf-8") as f:
        return json.load(f)


def write_keys(server, keys: dict) -> None:
    with open(server.key_file, "w", encoding="utf-8") as f:
        json.dump(keys, f)


def sample(digits_store, row: int = 0) -> dict:
    return {"data": np.load(digits_store["samples"])["x"][row].tolist()}


def ping_status(server, key: str) -> int:
    return requests.get(server.inference_url + "/ping", headers={"Authorization": f"Bearer {key}"},
                        timeout=30).status_code


def registered(client) -> dict[str, bool]:
    """{version: is the default} of digits, as `tspack versions` reads them."""
    return {v["version"]: v["default"] for v in model_versions(client, "digits")}


def default_version(client) -> str:
    return next(version for version, default in registered(client).items() if default)


# --- token renewal --------------------------------------------------------------------------------------------


def test_client_renews_a_key_the_server_refuses(server, digits_store):
    """A wrong inference key in key_file.json: TorchServe answers 400, the client renews once and retries."""
    keys = read_keys(server)
    real = keys["inference"]["key"]
    keys["inference"]["key"] = "wrong-" + real
    write_keys(server, keys)
    response = server.client().predict("digits", sample(digits_store))
    assert response.status_code == 200, response.text
    fresh = read_keys(server)["inference"]["key"]
    assert fresh not in (real, "wrong-" + real), "the file must hold a newly issued key"
    assert ping_status(server, fresh) == 200


def test_client_renews_a_key_before_it_expires(server, digits_store):
    """A key 30 s from expiry is renewed before the call (the client renews within 120 s of expiry)."""
    keys = read_keys(server)
    before = keys["inference"]["key"]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    keys["inference"]["expiration time"] = soon.isoformat().replace("+00:00", "Z")
    write_keys(server, keys)
    response = server.client().predict("digits", sample(digits_store))
    assert response.status_code == 200, response.text
    renewed = read_keys(server)["inference"]
    assert renewed["key"] != before
    assert renewed["expiration time"] != keys["inference"]["expiration time"]
    assert ping_status(server, renewed["key"]) == 200


def healthcheck(server, *args: str):
    return support.python(HEALTHCHECK, "--config", server.config_path, "--key-file", server.key_file, *args,
                          timeout=60)


def test_docker_healthcheck_against_the_real_server(server):
    assert healthcheck(server).stdout.strip() == "healthy: Healthy"
    keys = read_keys(server)
    keys["inference"]["key"] = "stale"
    write_keys(server, keys)
    renewed = healthcheck(server)
    assert (renewed.returncode, renewed.stdout.strip()) == (0, "healthy: Healthy"), renewed.stderr
    fresh = read_keys(server)["inference"]["key"]
    assert fresh != "stale" and ping_status(server, fresh) == 200
    liveness = healthcheck(server, "--liveness")
    assert (liveness.returncode, liveness.stdout.strip()) == (0, "healthy: /metrics answered HTTP 200")


def test_docker_healthcheck_fails_when_the_key_cannot_be_renewed(server):
    keys = read_keys(server)
    saved = json.loads(json.dumps(keys))
    keys["inference"]["key"], keys["API"]["key"] = "stale", "not-the-api-key"
    write_keys(server, keys)
    try:
        failed = healthcheck(server)
    finally:
        write_keys(server, saved)
    assert failed.returncode == 1
    assert failed.stdout.startswith("unhealthy: inference key refused and renewing it failed: HTTP 400")


# --- tspack swap --------------------------------------------------------------------------------------------


class Clients:
    """`count` threads sending predictions to the default version until stopped; they record every status."""

    def __init__(self, client, body: dict, count: int = 4):
        self.client, self.body = client, body
        self.stop_flag = threading.Event()
        self.statuses: list[int] = []
        self.versions: set[str] = set()
        self.threads = [threading.Thread(target=self.run) for _ in range(count)]

    def run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                response = self.client.predict("digits", self.body)
            except requests.RequestException:  # a refused or dropped connection is a failed request too
                self.statuses.append(0)
                continue
            self.statuses.append(response.status_code)
            if response.status_code == 200:
                self.versions.add(response.json()["version"])

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        for thread in self.threads:
            thread.join()


def test_swap_with_a_probe_as_a_user_types_it(server, store, digits_store):
    """A probe the new version refuses aborts the swap; a good one swaps under load with no failed request."""
    client = server.client()
    old = default_version(client)
    new = "2.0" if old == "1.0" else "1.0"  # whichever is not serving: the test leaves the other one default
    archive = os.path.join(store, f"digits_v{new}.mar")
    swap = ("swap", archive, "--drain", "1", "--run-dir", server.run_dir)

    refused = support.tspack(*swap, "--probe", '{"data": [1, 2]}')
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.startswith(f"tspack swap: digits {new} answered the probe with 422")
    assert "swap aborted, the old version keeps serving" in refused.stderr
    assert registered(client) == {old: True}

    body = sample(digits_store, 3)
    with Clients(client, body) as clients:
        swapped = support.tspack(*swap, "--probe", json.dumps(body))
        swapped_versions = registered(client)
    assert swapped.returncode == 0, swapped.stdout + swapped.stderr
    assert f"probe answered 200 by digits {new}" in swapped.stdout
    assert f"digits {new} is the default" in swapped.stdout and f"unregistered digits {old}" in swapped.stdout
    assert swapped_versions == {new: True}
    assert clients.statuses and set(clients.statuses) == {200}, f"failed requests during the swap: " \
        f"{[s for s in clients.statuses if s != 200]}"
    assert new in clients.versions
    answer = client.predict("digits", body).json()
    expected = support.eager_outputs(digits_store["weights"][new], np.array(body["data"], np.float32)[None])
    assert answer["version"] == new and answer["predictions"][0]["index"] == int(expected.argmax())

    again = support.tspack(*swap)
    assert again.returncode == 2
    assert again.stderr.strip() == f"tspack swap: digits {new} is already registered; swap to a new version"


# --- the workers' environment ---------------------------------------------------------------------------------


def test_an_omp_wait_policy_from_the_environment_is_kept(server):
    assert support.worker_environment(server.client(), "digits")["OMP_WAIT_POLICY"] == USER_OMP_WAIT_POLICY
