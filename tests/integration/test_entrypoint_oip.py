"""docker/entrypoint.py runs the tspack OIP gateway beside TorchServe, as `tspack serve start` does, without Docker:
the image's entrypoint and CMD on this host with the image's environment (state folder as working folder), a real
`tspack config` output and a real digits archive. `make image-test` runs the built image itself."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import requests

from archiver.deploy.properties import OIP_ADDRESS_KEY, ServerConfig, entry_from_archive, read_properties, write_config
from archiver.operate import oip_process
from archiver.operate.server import ServerHandle, free_ports
from tests import support

pytestmark = pytest.mark.integration

DOCKER = os.path.join(support.REPO, "docker")
BIN = os.path.dirname(sys.executable)


def _config(folder: str, store: str, oip: bool = True) -> str:
    """A production config (token auth on, model API off) for digits 1.0 on free ports, as `make image` writes."""
    inference, management, metrics, grpc_inference, grpc_management, oip_port = free_ports(6)
    config = ServerConfig(model_store=store, inference_port=inference, management_port=management,
                          metrics_port=metrics, grpc_inference_port=grpc_inference,
                          grpc_management_port=grpc_management, oip_port=oip_port if oip else None,
                          models=(entry_from_archive("digits_v1.0.mar", store),))
    os.makedirs(folder, exist_ok=True)
    return write_config(config, os.path.join(folder, "config.properties"))


def _image_env(state: str, tmp: str) -> dict:
    """The Dockerfile's ENV, with a private temp folder (the container has its own /tmp for the worker sockets)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    os.makedirs(tmp, exist_ok=True)
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", TSPACK_STATE_DIR=state,
               LOG_LOCATION=os.path.join(state, "logs"), METRICS_LOCATION=os.path.join(state, "logs"),
               OMP_WAIT_POLICY="PASSIVE", TMPDIR=tmp, TEMP=tmp)
    return env


def _entrypoint(command: list[str], state: str, tmp: str, log: str) -> subprocess.Popen:
    os.makedirs(state, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, os.path.join(DOCKER, "entrypoint.py"), *command], cwd=state,
                                env=_image_env(state, tmp), stdout=out, stderr=subprocess.STDOUT)


def _image_cmd(config: str, store: str) -> list[str]:
    """The Dockerfile's CMD with this host's paths."""
    return [os.path.join(BIN, "torchserve"), "--start", "--foreground", "--ncs", "--ts-config", config,
            "--model-store", store]


def _local(url: str) -> str:
    return url.replace("0.0.0.0", "127.0.0.1")


def _refused(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket() as s:
        return s.connect_ex((host, int(port))) != 0


def _get_status(url: str, **kwargs) -> int:
    try:
        return requests.get(url, timeout=5, **kwargs).status_code
    except requests.RequestException:
        return 0


def _healthcheck(config: str, key_file: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(DOCKER, "healthcheck.py"), "--config", config,
                           "--key-file", key_file], capture_output=True, text=True, timeout=60)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, as `docker stop` sends it; SIGKILL only when the entrypoint did not exit (the test failed)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _infer_body(metadata: dict) -> dict:
    spec = metadata["inputs"][0]
    shape = [1 if d == -1 else d for d in spec["shape"]]
    return {"inputs": [{"name": spec["name"], "shape": shape, "datatype": spec["datatype"],
                        "data": np.zeros(shape, np.float32).ravel().tolist()}]}


def test_gateway_serves_beside_torchserve_and_sigterm_stops_both(digits_store, tmp_path):
    store = digits_store["store"]
    config = _config(str(tmp_path / "config"), store)
    oip = _local(read_properties(config)[OIP_ADDRESS_KEY])
    state, log = str(tmp_path / "state"), str(tmp_path / "entrypoint.log")
    process = _entrypoint(_image_cmd(config, store), state, str(tmp_path / "tmp"), log)
    try:
        ready = support.wait_until(lambda: process.poll() is not None or _get_status(f"{oip}/v2/health/ready") == 200,
                                   timeout_s=180)
        assert ready and process.poll() is None, _read(log)[-3000:]
        assert requests.get(f"{oip}/v2/health/ready", timeout=5).status_code == 200  # probes take no token

        key_file = os.path.join(state, "key_file.json")
        with open(key_file, encoding="utf-8") as f:
            auth = {"Authorization": f"Bearer {json.load(f)['inference']['key']}"}
        assert requests.get(f"{oip}/v2/models/digits", timeout=10).status_code == 400  # metadata needs the key
        metadata = requests.get(f"{oip}/v2/models/digits", headers=auth, timeout=10)
        assert metadata.status_code == 200, metadata.text
        assert metadata.json()["name"] == "digits"
        answer = requests.post(f"{oip}/v2/models/digits/infer", json=_infer_body(metadata.json()), headers=auth,
                               timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"] and answer.json()["model_name"] == "digits"

        # recorded for `tspack serve status --run-dir <state>`, and it is the gateway serving this state folder
        handle = ServerHandle.load(state)
        assert handle.oip_url == read_properties(config)[OIP_ADDRESS_KEY]
        assert oip_process.running(handle.oip_pid, state)
        assert f"entrypoint: OIP gateway (pid {handle.oip_pid})" in _read(log)

        check = _healthcheck(config, key_file)
        assert check.returncode == 0 and "OIP gateway" in check.stdout, check.stdout + check.stderr
        # the same check against a config whose gateway port nothing serves: unhealthy, naming the gateway
        elsewhere = tmp_path / "no-gateway.properties"
        elsewhere.write_text(_read(config).replace(handle.oip_url, f"http://127.0.0.1:{free_ports(1)[0]}"))
        check = _healthcheck(str(elsewhere), key_file)
        assert check.returncode == 1 and "unhealthy" in check.stdout and "OIP gateway" in check.stdout, check.stdout
    finally:
        _stop(process)

    assert process.returncode == 0, _read(log)[-3000:]
    assert not oip_process.running(handle.oip_pid, state)
    assert _refused(oip) and _refused(_local(handle.inference_url))
    assert "exited (code" not in _read(log)  # the gateway went with TorchServe, not before it


def test_a_taken_gateway_port_stops_the_container_before_torchserve_starts(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "config.properties"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config.write_text(f"model_store={store}\n{OIP_ADDRESS_KEY}=http://127.0.0.1:{taken.getsockname()[1]}\n")
        marker = tmp_path / "ran"
        command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')", "--ts-config", str(config)]
        process = _entrypoint(command, str(tmp_path / "state"), str(tmp_path / "tmp"), str(tmp_path / "log"))
        assert process.wait(timeout=60) == 1
    assert "is in use" in _read(str(tmp_path / "log")) and "--oip-port" in _read(str(tmp_path / "log"))
    assert not marker.exists()


def test_without_a_gateway_address_no_gateway_starts(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    config = tmp_path / "config.properties"
    config.write_text(f"model_store={store}\n")
    marker, state = tmp_path / "ran", str(tmp_path / "state")
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')", "--ts-config", str(config)]
    process = _entrypoint(command, state, str(tmp_path / "tmp"), str(tmp_path / "log"))
    assert process.wait(timeout=60) == 0, _read(str(tmp_path / "log"))
    assert marker.exists()
    assert ServerHandle.load(state).oip_pid == 0
    assert not os.path.exists(os.path.join(state, "logs", oip_process.LOG_FILE))
