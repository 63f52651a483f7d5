"""docker/entrypoint.py, PID 1 of the image: signals reach the frontend, exit codes pass through, and the
state folder is prepared. `make image-test` checks the same against the real container (SIGTERM under load).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.unit.dockerfile_rules import DOCKER

LAUNCHER = """import subprocess, sys
frontend = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
frontend.wait()
"""
FRONTEND = """import signal, sys, time
marker = sys.argv[1]
def stop(signum, frame):
    open(marker, "w").write("stopped by %d" % signum)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(marker, "w").write("started")
while True:
    time.sleep(0.02)
"""


def _entrypoint(*command: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(DOCKER, "entrypoint.py"), *command])


def test_entrypoint_forwards_sigterm_to_the_frontend(tmp_path):
    """Like `torchserve --foreground`: a launcher waiting on a frontend. SIGTERM must reach the frontend."""
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "frontend.py").write_text(FRONTEND)
    marker = tmp_path / "marker"
    process = _entrypoint(sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "frontend.py"), str(marker))
    deadline = time.monotonic() + 15
    while not (marker.exists() and marker.read_text() == "started") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.read_text() == "started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert marker.read_text() == f"stopped by {int(signal.SIGTERM)}"


@pytest.mark.parametrize("code, expected", [("sys.exit(3)", 3), ("os.kill(os.getpid(), signal.SIGKILL)", 137)])
def test_entrypoint_exit_code_is_the_launchers(code, expected):
    process = _entrypoint(sys.executable, "-c", f"import os, signal, sys; {code}")
    assert process.wait(timeout=15) == expected


@pytest.fixture
def entrypoint():
    spec = importlib.util.spec_from_file_location("tspack_image_entrypoint", os.path.join(DOCKER, "entrypoint.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_state_folder_is_prepared(entrypoint, tmp_path):
    """A key file left on the volume by the previous run is removed: the new server writes new keys."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "key_file.json").write_text('{"inference": {"key": "old"}}')
    (state / "server.json").write_text('{"pid": 7}')
    (state / "logs").mkdir()
    (state / "logs" / "ts_log.log").write_text("kept")
    assert entrypoint.prepare_state(str(state)) is None
    assert not (state / "key_file.json").exists() and not (state / "server.json").exists()
    assert (state / "logs" / "ts_log.log").read_text() == "kept"


def test_the_server_is_recorded_for_the_tspack_commands(entrypoint, tmp_path):
    """`tspack serve status --run-dir <state>` inside the container reads this record."""
    server = pytest.importorskip("archiver.operate.server")
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://0.0.0.0:8080\nmetrics_address=http://0.0.0.0:8082\n")
    entrypoint.record_server(["torchserve", "--start", "--ts-config", str(config)], str(tmp_path), 4321, None)
    handle = server.ServerHandle.load(str(tmp_path))
    assert (handle.pid, handle.config_path, handle.token_auth) == (4321, str(config), True)
    assert handle.key_file == str(tmp_path / "key_file.json")


def test_unusable_state_folder_stops_the_container_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    env = dict(os.environ, TSPACK_STATE_DIR=str(tmp_path / "file" / "state"))
    run = subprocess.run([sys.executable, os.path.join(DOCKER, "entrypoint.py"), sys.executable, "-c", "pass"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert run.returncode == 1
    assert "is not writable by uid" in run.stderr and "chown" in run.stderr


def test_without_a_record_the_image_config_starts(entrypoint, tmp_path):
    """No deployment.json in the state folder (first start): the command runs with the image's config."""
    pytest.importorskip("archiver.operate.restore")
    config = tmp_path / "config.properties"
    config.write_text(f"model_store={tmp_path}\nload_models=digits_v1.0.mar\n")
    state = tmp_path / "state"
    state.mkdir()
    argv = ["torchserve", "--start", "--ts-config", str(config), "--model-store", str(tmp_path)]
    planned, prepared = entrypoint.plan_restore(argv, str(state))
    assert planned == argv and prepared.source == "config"
    assert entrypoint.plan_restore(["sleep", "1"], str(state)) == (["sleep", "1"], None)
