"""docker/healthcheck.py against a loopback stand-in of TorchServe 0.12's token rules.

The real container runs it in `make image-test` (Docker's HEALTHCHECK decides when the container is
healthy); these tests pin its behaviour: which key it sends, when it renews one, what it reports.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import pytest

from tests.unit.dockerfile_rules import DOCKER, dockerfile_text, final_stage, parse_dockerfile

TOKEN_FAILED = {"code": 400, "type": "InvalidKeyException",
                "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}


class FakeTorchServe:
    """TorchServe 0.12's token rules on loopback: /ping needs the current, unexpired inference key (HTTP 400
    otherwise); /token?type=inference on the management port needs the API key and writes a new inference
    key into key_file.json; /metrics on the metrics port takes no token."""

    def __init__(self, folder: str, token_auth: bool = True, healthy: bool = True):
        self.folder, self.token_auth, self.healthy = folder, token_auth, healthy
        self.keys = {"inference": "inference-1", "management": "management-1", "API": "api-1"}
        self.inference_expired = False
        self.seen: list[tuple[str, str, Optional[str]]] = []
        self.servers = {kind: ThreadingHTTPServer(("127.0.0.1", 0), self._handler(kind))
                        for kind in ("inference", "management", "metrics")}
        for server in self.servers.values():
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        self.key_file = os.path.join(folder, "key_file.json")
        self.config = os.path.join(folder, "config.properties")
        with open(self.config, "w", encoding="utf-8") as f:
            for kind, server in self.servers.items():
                f.write(f"{kind}_address=http://0.0.0.0:{server.server_address[1]}\n")
            f.write(f"disable_token_authorization={'false' if token_auth else 'true'}\n")
        if token_auth:
            self.write_keys()

    def write_keys(self) -> None:
        with open(self.key_file, "w", encoding="utf-8") as f:
            json.dump({kind: {"key": key, "expiration time": "2030-01-01T00:00:00.123456789Z"}
                       for kind, key in self.keys.items()}, f)

    def answer(self, kind: str, path: str, auth: Optional[str]) -> tuple[int, Any]:
        self.seen.append((kind, path, auth))
        url = urllib.parse.urlsplit(path)
        if kind == "metrics" and url.path == "/metrics":
            return 200, "ts_inference_requests_total 1\n"
        if kind == "management" and url.path == "/token":
            if auth != f"Bearer {self.keys['API']}":
                return 400, dict(TOKEN_FAILED, message="Token Authentication failed.")
            number = int(self.keys["inference"].rsplit("-", 1)[1]) + 1
            self.keys["inference"], self.inference_expired = f"inference-{number}", False
            self.write_keys()
            return 200, ""
        if kind == "inference" and url.path == "/ping":
            if self.token_auth and (auth != f"Bearer {self.keys['inference']}" or self.inference_expired):
                return 400, TOKEN_FAILED
            return (200, {"status": "Healthy"}) if self.healthy else (500, {"status": "Unhealthy"})
        return 404, {"code": 404, "message": "not found"}

    def _handler(self, kind: str):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                status, body = fake.answer(kind, self.path, self.headers.get("Authorization"))
                data = (body if isinstance(body, str) else json.dumps(body)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


@pytest.fixture
def healthcheck():
    spec = importlib.util.spec_from_file_location("tspack_image_healthcheck", os.path.join(DOCKER, "healthcheck.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torchserve(tmp_path):
    fakes = []

    def make(**kwargs) -> FakeTorchServe:
        fakes.append(FakeTorchServe(str(tmp_path), **kwargs))
        return fakes[-1]

    yield make
    for fake in fakes:
        fake.close()


def _check(healthcheck, fake: FakeTorchServe, *extra: str) -> int:
    return healthcheck.main(["--config", fake.config, "--key-file", fake.key_file, "--timeout", "5", *extra])


def test_healthcheck_pings_with_the_inference_key(healthcheck, torchserve, capsys):
    fake = torchserve()
    assert _check(healthcheck, fake) == 0
    assert "healthy: Healthy" in capsys.readouterr().out
    assert fake.seen == [("inference", "/ping", "Bearer inference-1")]
    assert fake.keys["inference"] == "inference-1"  # a working key is never rotated


def test_healthcheck_renews_an_expired_key_once(healthcheck, torchserve):
    fake = torchserve()
    fake.inference_expired = True
    assert _check(healthcheck, fake) == 0
    assert [s[:2] for s in fake.seen] == [("inference", "/ping"), ("management", "/token?type=inference"),
                                          ("inference", "/ping")]
    assert fake.seen[1][2] == "Bearer api-1" and fake.seen[2][2] == "Bearer inference-2"
    with open(fake.key_file, encoding="utf-8") as f:
        assert json.load(f)["inference"]["key"] == "inference-2"


def test_healthcheck_fails_when_renewal_is_refused(healthcheck, torchserve, capsys):
    fake = torchserve()
    fake.inference_expired = True
    fake.keys["API"] = "api-rotated"  # the key file no longer holds the server's API key
    with open(fake.key_file, encoding="utf-8") as f:
        stale = json.load(f)
    stale["API"]["key"] = "api-1"
    with open(fake.key_file, "w", encoding="utf-8") as f:
        json.dump(stale, f)
    assert _check(healthcheck, fake) == 1
    assert "renewing it failed: HTTP 400" in capsys.readouterr().out


def test_healthcheck_unhealthy_models(healthcheck, torchserve, capsys):
    fake = torchserve(healthy=False)
    assert _check(healthcheck, fake) == 1
    assert "HTTP 500" in capsys.readouterr().out


def test_healthcheck_without_token_auth_sends_no_key(healthcheck, torchserve):
    fake = torchserve(token_auth=False)
    assert _check(healthcheck, fake) == 0
    assert fake.seen == [("inference", "/ping", None)]


def test_healthcheck_liveness_uses_the_token_free_metrics_port(healthcheck, torchserve):
    fake = torchserve()
    os.remove(fake.key_file)  # liveness needs no key at all
    assert _check(healthcheck, fake, "--liveness") == 0
    assert fake.seen == [("metrics", "/metrics", None)]


def test_healthcheck_server_down_or_no_key_file(healthcheck, torchserve, capsys):
    fake = torchserve()
    os.remove(fake.key_file)
    assert _check(healthcheck, fake) == 1
    assert "FileNotFoundError" in capsys.readouterr().out
    fake.write_keys()
    fake.close()
    assert _check(healthcheck, fake) == 1


def test_healthcheck_defaults_match_the_image(healthcheck):
    """Without flags the check reads the config TorchServe is started with, and the key file in its WORKDIR:
    the state volume, which the image also names in TSPACK_STATE_DIR (the entrypoint clears stale keys there)."""
    instructions = parse_dockerfile(dockerfile_text())
    final = final_stage(instructions)
    workdir = [i.args for i in final if i.keyword == "WORKDIR"][-1]
    env = " ".join(i.args for i in final if i.keyword == "ENV")
    assert f"TSPACK_STATE_DIR={workdir} " in env
    cmd = [i.exec_form() for i in instructions if i.keyword == "CMD"][-1]
    assert healthcheck.DEFAULT_CONFIG == cmd[cmd.index("--ts-config") + 1]
    assert healthcheck.DEFAULT_KEY_FILE == f"{workdir}/key_file.json"


def test_healthcheck_runs_as_a_script(torchserve):
    fake = torchserve()
    run = subprocess.run([sys.executable, os.path.join(DOCKER, "healthcheck.py"), "--config", fake.config,
                          "--key-file", fake.key_file], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stdout + run.stderr


# --- the entrypoint: signals reach the frontend --------------------------------------------------------


LAUNCHER = """import subprocess, sys
frontend = subprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])
frontend.wait()
"""
