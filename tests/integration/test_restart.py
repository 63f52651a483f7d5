"""A restart keeps what was deployed (issue 20): `tspack serve start` restores the run folder's deployment record.

Every command runs as the user types it (`python -m archiver.cli ...`) against a real TorchServe on free ports.
Each test gets a deployment of its own (digits 1.0 from config.properties, 2.0 registered as the default, 1.0
scaled to 2 workers) in its own run folder, stops it and starts it again its own way: the tests run in any order.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from archiver.build import build
from archiver.deploy.properties import ServerConfig, entry_from_archive, write_config
from archiver.operate.server import ServerHandle, free_ports, stop
from archiver.spec import DeploySpec
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration


def tspack(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "archiver.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": support.REPO}, timeout=300)


def router(version: str, first: str, second: str) -> dict:
    return {"name": "ab", "version": version, "sticky": {"header": "X-Request-Key"},
            "variants": [{"name": first, "archive": "digits_v1.0.mar", "weight": 0.5},
                         {"name": second, "archive": "digits_v2.0.mar", "weight": 0.5}],
            "serving": {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 1}}


@pytest.fixture(scope="module")
def store(digits_store, tmp_path_factory):
    """digits 1.0 and 2.0, and two A/B routers over them whose variants have different names (a/b, x/y)."""
    store = str(tmp_path_factory.mktemp("restart") / "store")
    shutil.copytree(digits_store["store"], store)
    result = build(parse(DeploySpec, {"model_store": store, "ab": [router("1.0", "a", "b"), router("2.0", "x", "y")]}),
                   progress=False)
    assert not result.failed, [(e.key, e.error) for e in result.failed]
    return store


def write_server_config(folder: str, store: str, archive: str) -> str:
    ports = free_ports(5)
    config = ServerConfig(model_store=store, inference_port=ports[0], management_port=ports[1],
                          metrics_port=ports[2], grpc_inference_port=ports[3], grpc_management_port=ports[4],
                          models=(entry_from_archive(archive, store),), model_api=True)
    return write_config(config, os.path.join(folder, "config.properties"))


@pytest.fixture
def deployed(store, digits_store, tmp_path):
    """digits 1.0 from config.properties; 2.0 registered and made the default; 1.0 scaled to 2 workers.

    Per test: every test below changes the deployment (a refused version, a --fresh start), so a shared one
    would make each test's outcome depend on the ones that ran before it.
    """
    work = str(tmp_path)
    store = shutil.copytree(store, os.path.join(work, "store"))  # a test that changes an archive changes its own
    run_dir = os.path.join(work, "run")
    config = write_server_config(work, store, "digits_v1.0.mar")
    x = np.load(digits_store["samples"])["x"][0]
    started = tspack("serve", "start", "--config", config, "--run-dir", run_dir, cwd=work)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "models from config.properties" in started.stdout
        for command in (("register", os.path.join(store, "digits_v2.0.mar"), "--set-default"),
                        ("scale", "digits", "1.0", "--workers", "2")):
            done = tspack(*command, "--run-dir", run_dir, cwd=work)
            assert done.returncode == 0, done.stdout + done.stderr
        yield {"work": work, "run_dir": run_dir, "config": config, "store": store, "x": x,
               "expected": {v: int(support.eager_outputs(w, x[None]).argmax(1)[0])
                            for v, w in digits_store["weights"].items()}}
    finally:
        stop(run_dir, quiet=True)


def served(run_dir: str) -> dict[str, dict]:
    """version -> {default, workers ready} of digits, as the running server reports them."""
    client = ServerHandle.load(run_dir).client()
    default = client.describe("digits")[0]["modelVersion"]
    return {d["modelVersion"]: {"default": d["modelVersion"] == default,
                                "ready": sum(w["status"] == "READY" for w in d["workers"])}
            for d in client.versions("digits")}


def predicted_version(dep: dict) -> str:
    response = ServerHandle.load(dep["run_dir"]).client().predict("digits", {"data": dep["x"].tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"][0]["index"] == dep["expected"][body["version"]]
    return body["version"]


def assert_fully_restored(dep: dict, started: subprocess.CompletedProcess) -> None:
    assert started.returncode == 0, started.stdout + started.stderr
    assert "models from the deployment record" in started.stdout
    assert "digits 2.0 (default): 1 worker(s), digits_v2.0.mar" in started.stdout
    assert "digits 1.0: 2 worker(s), digits_v1.0.mar" in started.stdout
    assert served(dep["run_dir"]) == {"1.0": {"default": False, "ready": 2}, "2.0": {"default": True, "ready": 1}}
    assert predicted_version(dep) == "2.0"


def test_registered_default_survives_stop_and_start(deployed):
    assert predicted_version(deployed) == "2.0"
    tspack("serve", "stop", "--run-dir", deployed["run_dir"], cwd=deployed["work"])
    started = tspack("serve", "start", "--config", deployed["config"], "--run-dir", deployed["run_dir"],
                     cwd=deployed["work"])
    assert_fully_restored(deployed, started)
    status = tspack("serve", "status", "--run-dir", deployed["run_dir"], cwd=deployed["work"])
    assert f"record: {os.path.join(deployed['run_dir'], 'deployment.json')}, 2 version(s)" in status.stdout


def _frontend_and_workers(handle: ServerHandle) -> tuple[int, list[int]]:
    frontend, workers = None, []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if handle.tmp_dir.encode() not in cmdline:
            continue
        if b"org.pytorch.serve.ModelServer" in cmdline:
            frontend = int(entry)
        elif b"model_service_worker" in cmdline:
            workers.append(int(entry))
    assert frontend and workers, "the running server's frontend and workers were not found"
    return frontend, workers


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # killed, not yet reaped by its new parent
    except OSError:
        return True


def _wait_gone(pids: list[int], timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(map(_gone, pids)):
        time.sleep(0.2)
    return all(map(_gone, pids))


def test_kill_9_of_the_frontend_then_start_comes_back(deployed):
    old = ServerHandle.load(deployed["run_dir"])
    frontend, workers = _frontend_and_workers(old)
    os.kill(frontend, signal.SIGKILL)
    assert _wait_gone([frontend])
    started = tspack("serve", "start", "--config", deployed["config"], "--run-dir", deployed["run_dir"],
                     cwd=deployed["work"])
    assert "was not running" in started.stdout, started.stdout + started.stderr
    assert _wait_gone(workers), "the dead server's workers were left running"
    assert not os.path.exists(old.tmp_dir)
    assert_fully_restored(deployed, started)


def test_changed_archive_is_refused_by_name_and_the_rest_start(deployed):
    tspack("serve", "stop", "--run-dir", deployed["run_dir"], cwd=deployed["work"])
    archive = os.path.join(deployed["store"], "digits_v1.0.mar")
    with open(archive, "rb") as f:
        original = f.read()
    with open(archive, "ab") as f:
        f.write(b"changed")
    try:
        started = tspack("serve", "start", "--config", deployed["config"], "--run-dir", deployed["run_dir"],
                         cwd=deployed["work"])
    finally:
        with open(archive, "wb") as f:
            f.write(original)
    assert started.returncode == 3, started.stdout + started.stderr
    assert "REFUSED digits 1.0 (digits_v1.0.mar): archive changed since it was deployed" in started.stdout
    assert started.stderr.strip() == ("tspack serve: started without 1 refused version(s): "
                                      "digits 1.0 (digits_v1.0.mar)")
    assert served(deployed["run_dir"]) == {"2.0": {"default": True, "ready": 1}}
    assert predicted_version(deployed) == "2.0"
    # the refused version stays recorded: with its archive back, the next start restores everything
    with open(os.path.join(deployed["run_dir"], "deployment.json"), encoding="utf-8") as f:
        assert set(json.load(f)["models"]["digits"]["versions"]) == {"1.0", "2.0"}


def test_fresh_starts_from_config_properties_and_keeps_the_record_as_a_file(deployed):
    tspack("serve", "stop", "--run-dir", deployed["run_dir"], cwd=deployed["work"])
    started = tspack("serve", "start", "--fresh", "--config", deployed["config"], "--run-dir", deployed["run_dir"],
                     cwd=deployed["work"])
    assert started.returncode == 0, started.stdout + started.stderr
    aside = [f for f in os.listdir(deployed["run_dir"]) if f.startswith("deployment.set-aside-")]
    assert len(aside) == 1 and f"set aside as {os.path.join(deployed['run_dir'], aside[0])}" in started.stdout
    with open(os.path.join(deployed["run_dir"], aside[0]), encoding="utf-8") as f:
        assert json.load(f)["models"]["digits"]["default"] == "2.0"
    assert "models from config.properties" in started.stdout
    assert served(deployed["run_dir"]) == {"1.0": {"default": True, "ready": 1}}
    assert predicted_version(deployed) == "1.0"
    with open(os.path.join(deployed["run_dir"], "deployment.json"), encoding="utf-8") as f:
        assert list(json.load(f)["models"]["digits"]["versions"]) == ["1.0"]


def test_swapped_in_router_still_routes_after_a_restart(store, tmp_path):
    work = str(tmp_path)
    run_dir = os.path.join(work, "run")
    config = write_server_config(work, store, "ab_v1.0.mar")
    try:
        started = tspack("serve", "start", "--config", config, "--run-dir", run_dir, cwd=work)
        assert started.returncode == 0, started.stdout + started.stderr
        swapped = tspack("swap", os.path.join(store, "ab_v2.0.mar"), "--drain", "0", "--run-dir", run_dir, cwd=work)
        assert swapped.returncode == 0, swapped.stdout + swapped.stderr
        tspack("serve", "stop", "--run-dir", run_dir, cwd=work)
        restarted = tspack("serve", "start", "--config", config, "--run-dir", run_dir, cwd=work)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert "ab 2.0 (default): 1 worker(s), ab_v2.0.mar" in restarted.stdout
        client = ServerHandle.load(run_dir).client()
        assert [d["modelVersion"] for d in client.versions("ab")] == ["2.0"]
        body = {"data": np.zeros((1, 8, 8), np.float32).tolist()}
        variants = set()
        for key in (f"user-{i}" for i in range(24)):
            response = client.predict("ab", body, headers={"X-Request-Key": key})
            assert response.status_code == 200, response.text
            assert response.headers["X-Tspack-Variant"] == response.json()["variant"]
            variants.add(response.json()["variant"])
        assert variants == {"x", "y"}, "the restored router routes over the swapped-in router's variants"
    finally:
        stop(run_dir, quiet=True)
