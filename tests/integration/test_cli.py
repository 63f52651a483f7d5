"""The `tspack` commands a user types, run as subprocesses against a real TorchServe on free ports."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from archiver.operate.server import free_ports, stop
from tests import support

pytestmark = pytest.mark.integration


tspack = support.tspack


def version_rows(stdout: str) -> dict[str, str]:
    """{version: its row} of `tspack versions`' table (the lines under the header that start with a version)."""
    lines = [line for line in stdout.splitlines()[2:] if line.split()]
    return {line.split()[0]: line for line in lines if line.split()[0][0].isdigit()}


def test_config_serve_register_versions_predict_status_unregister_stop(digits_store, tmp_path):
    work = str(tmp_path)
    store = os.path.join(work, "store")
    shutil.copytree(digits_store["store"], store)
    run_dir = os.path.join(work, "run")
    ports = [str(p) for p in free_ports(6)]
    config = os.path.join(store, "config.properties")
    written = tspack("config", "--model-store", store, "--load", "digits_v1.0.mar", "--enable-model-api",
                     "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2],
                     "--grpc-ports", ports[3], ports[4], "--oip-port", ports[5], "--out", config, cwd=work)
    assert written.returncode == 0, written.stderr
    assert "token auth: on   model API: on" in written.stdout
    started = tspack("serve", "start", "--config", config, "--run-dir", run_dir, cwd=work)
    try:
        assert started.returncode == 0, started.stderr
        assert "TorchServe is up" in started.stdout and "key_file.json" in started.stdout

        registered = tspack("register", os.path.join(store, "digits_v2.0.mar"), "--run-dir", run_dir, cwd=work)
        assert registered.returncode == 0, registered.stderr
        made_default = tspack("set-default", "digits", "2.0", "--run-dir", run_dir, cwd=work)
        assert made_default.returncode == 0 and "2.0" in made_default.stdout, made_default.stderr

        listed = tspack("versions", "digits", "--run-dir", run_dir, cwd=work)
        assert listed.returncode == 0, listed.stderr
        rows = version_rows(listed.stdout)
        assert set(rows) == {"1.0", "2.0"}
        assert " * " in rows["2.0"] and " * " not in rows["1.0"]
        assert all("1/1 ready" in row and "torchscript" in row for row in rows.values())

        x = np.load(digits_store["samples"])["x"][0]
        answered = tspack("predict", "digits", "--json", json.dumps({"data": x.tolist()}), "--run-dir", run_dir,
                          cwd=work)
        assert answered.returncode == 0, answered.stderr
        body = json.loads(answered.stdout)
        expected = support.eager_outputs(digits_store["weights"]["2.0"], x[None]).argmax(1)[0]
        assert body["version"] == "2.0" and body["predictions"][0]["index"] == int(expected)
        refused = tspack("predict", "digits", "--json", '{"data": [1, 2]}', "--run-dir", run_dir, cwd=work)
        assert refused.returncode == 1 and json.loads(refused.stdout)["type"] == "shape_mismatch"

        status = tspack("serve", "status", "--run-dir", run_dir, cwd=work)
        assert status.returncode == 0, status.stdout + status.stderr
        assert "healthy" in status.stdout and "digits 2.0 (default)" in status.stdout
        assert "digits 1.0:" in status.stdout
        as_json = json.loads(tspack("serve", "status", "--json", "--run-dir", run_dir, cwd=work).stdout)
        assert as_json["healthy"] is True and {v["version"] for v in as_json["models"]["digits"]} == {"1.0", "2.0"}

        missing = tspack("register", os.path.join(work, "nope.mar"), "--run-dir", run_dir, cwd=work)
        assert missing.returncode == 2
        assert missing.stderr.strip() == f"tspack register: register: archive not found: {work}/nope.mar"

        retired = tspack("unregister", "digits", "1.0", "--run-dir", run_dir, cwd=work)
        assert retired.returncode == 0, retired.stderr
        listed = tspack("versions", "digits", "--run-dir", run_dir, cwd=work)
        assert list(version_rows(listed.stdout)) == ["2.0"]
    finally:
        stopped = tspack("serve", "stop", "--run-dir", run_dir, cwd=work)
        stop(run_dir, quiet=True)
    assert stopped.returncode == 0 and "TorchServe stopped" in stopped.stdout
    down = tspack("serve", "status", "--run-dir", run_dir, cwd=work)
    assert down.returncode == 1 and "not running" in down.stdout
