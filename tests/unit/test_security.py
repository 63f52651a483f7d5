"""Static security checks (GitHub issue 8); the live ones are in tests/integration/test_reliability.py.

- The config `tspack config` writes by default keeps token authorization on, the model API off, remote
  archives out (`allowed_urls` = the local model store), and sets request size limits above the handlers'
  own per-model limits.
- Nothing in handlers/ or archiver/ unpickles a module: `torch.load` always with `weights_only=True`, no
  pickle/dill/joblib/marshal loads, no `np.load(allow_pickle=True)`, no unsafe YAML, no eval/exec; a weights
  file that is a pickled object is refused by the serving runtime without running it.
- Handlers refuse weights whose SHA-256 differs from the one the build recorded (handlers/integrity.py): in
  process in tests/unit/test_tensor_handler.py::test_tampered_weights_are_refused, and against a real TorchServe
  in tests/integration/test_end_to_end.py::test_worker_that_dies_at_start_fails_fast_with_its_error.

This file owns the assertions on what the production config keeps closed; tests/unit/test_config.py checks the
rest of the rendering.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re

import pytest
import torch

from archiver.cli import main as tspack_main
from archiver.deploy.properties import ARCHIVE_NAME, ServerConfig, read_properties, write_config
from archiver.spec import ModelSpec
from handlers.spec import ImageSpec
from tests.support import REPO

SCANNED = ("handlers", "archiver")
BUILTIN = "<builtin>"  # the owner of a plain call like eval(...)
UNPICKLERS = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("cPickle", "load"),
              ("cPickle", "loads"), ("dill", "load"), ("dill", "loads"), ("joblib", "load"), ("cloudpickle", "load"),
              ("cloudpickle", "loads"), ("marshal", "load"), ("marshal", "loads"), ("shelve", "open"),
              ("pandas", "read_pickle"), ("pd", "read_pickle")}


def python_files() -> list[str]:
    found = []
    for folder in SCANNED:
        for root, dirs, files in os.walk(os.path.join(REPO, folder)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            found += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(found)


def calls(path: str) -> list[tuple[str, str, ast.Call]]:
    """(owner, name, node) for every call: torch.load -> ("torch", "load"), eval(x) -> (BUILTIN, "eval")."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner = func.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            found.append((name, func.attr, node))
        elif isinstance(func, ast.Name):
            found.append((BUILTIN, func.id, node))
    return found


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def where(path: str, node: ast.Call) -> str:
    return f"{os.path.relpath(path, REPO)}:{node.lineno}"


ALL_CALLS = [(path, owner, name, node) for path in python_files() for owner, name, node in calls(path)]


def test_the_scan_sees_the_loaders():
    """The scanner finds the known torch.load and torch.jit.load calls, so an empty result below means something."""
    names = {(owner, name) for _, owner, name, _ in ALL_CALLS}
    assert ("torch", "load") in names and ("jit", "load") in names
    assert len(python_files()) > 20


def test_torch_load_always_with_weights_only_true():
    loads = [(p, n) for p, owner, name, n in ALL_CALLS if (owner, name) == ("torch", "load")]
    assert loads
    unsafe = [where(p, n) for p, n in loads if keyword(n, "weights_only") is not True]
    assert not unsafe, f"torch.load without weights_only=True: {unsafe}"


def test_no_pickle_style_loads():
    found = [where(p, n) for p, owner, name, n in ALL_CALLS if (owner, name) in UNPICKLERS]
    assert not found, f"unpickling calls: {found}"


def test_numpy_never_loads_pickles():
    found = [where(p, n) for p, owner, name, n in ALL_CALLS
             if owner in ("np", "numpy") and name == "load" and keyword(n, "allow_pickle") not in (None, False)]
    assert not found, f"np.load with allow_pickle: {found}"


def test_yaml_is_loaded_safely():
    unsafe = [where(p, n) for p, owner, name, n in ALL_CALLS if owner == "yaml" and name in ("load", "load_all")
              and not (isinstance(keyword(n, "Loader"), ast.Attribute) and "Safe" in keyword(n, "Loader").attr)]
    unsafe += [where(p, n) for p, owner, name, n in ALL_CALLS if owner == "yaml" and name in ("unsafe_load",
                                                                                             "full_load")]
    assert not unsafe, f"unsafe YAML loading: {unsafe}"


def test_no_eval_or_exec_of_strings():
    found = [where(p, n) for p, owner, name, n in ALL_CALLS if owner == BUILTIN and name in ("eval", "exec")]
    assert not found, f"eval/exec: {found}"


def test_no_shell_true_subprocesses():
    found = [where(p, n) for p, owner, name, n in ALL_CALLS if owner == "subprocess" and keyword(n, "shell") is True]
    assert not found, f"subprocess with shell=True: {found}"


class Marker:
    """Unpickling this runs `open(path, 'w')` — proof that a loader executed code from a weights file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_object_as_weights_is_refused_without_running_it(tmp_path):
    from handlers.device import Placement
    from handlers.errors import ModelLoadError
    from handlers.integrity import sha256_of
    from handlers.runtimes import load_runtime
    from handlers.spec import ArtifactManifest, InputSpec, RuntimeSpec

    marker = tmp_path / "pwned"
    (tmp_path / "net.py").write_text("from torch import nn\n\nclass Net(nn.Linear):\n"
                                     "    def __init__(self):\n        super().__init__(2, 2)\n")
    weights = tmp_path / "model.pt"
    torch.save({"weight": Marker(str(marker))}, weights)
    manifest = ArtifactManifest(name="evil", version="1.0", frontend="tensor", input=InputSpec(shape=(2,)),
                                runtime=RuntimeSpec(format="state_dict", file="model.pt", sha256=sha256_of(weights),
                                                    model_class="net.py:Net"))
    with pytest.raises(ModelLoadError, match="(?i)weights.only|unpickl|unsupported"):
        load_runtime(manifest, str(tmp_path), Placement(device="cpu", gpu_id=None, threads=1))
    assert not marker.exists(), "loading the weights ran code from the file"


# --- the generated config ---------------------------------------------------------------------------------


@pytest.fixture
def production(tmp_path) -> dict:
    """`tspack config` with its defaults (the production profile)."""
    store = tmp_path / "store"
    store.mkdir()
    out = tmp_path / "config.properties"
    with contextlib.redirect_stdout(io.StringIO()):
        assert tspack_main(["config", "--model-store", str(store), "--out", str(out), "--gpus", "0"]) == 0
    return {"props": read_properties(str(out)), "store": str(store), "folder": tmp_path}


def test_production_config_keeps_token_auth_on_and_model_api_off(production):
    props = production["props"]
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["enable_envvars_config"] == "false", "environment variables must not override the config"
    assert props["install_py_dep_per_model"] == "false", "archives must not pip-install at load"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), (key, props[key])


def test_allowed_urls_is_the_local_model_store_only(production):
    allowed = production["props"]["allowed_urls"]
    assert "," not in allowed, "a single pattern"
    pattern = re.compile(allowed)
    store = production["store"]
    assert pattern.fullmatch(f"file://{store}/digits_v1.0.mar")
    for url in ("http://127.0.0.1:8000/evil.mar", "https://example.com/evil.mar", "file:///tmp/evil.mar",
                f"file://{store}-other/evil.mar", f"s3://{store}/evil.mar"):
        assert not pattern.fullmatch(url), url


def test_allowed_urls_is_the_escaped_store_path(tmp_path):
    store = tmp_path / "my store+1"
    props = read_properties(write_config(ServerConfig(model_store=str(store)), str(tmp_path / "c.properties")))
    assert props["allowed_urls"] == "file://" + re.escape(str(store)) + "/" + ARCHIVE_NAME
    pattern = re.compile(props["allowed_urls"])
    assert pattern.fullmatch(f"file://{store}/digits.mar")
    assert not pattern.fullmatch(f"file://{tmp_path}/my storee1/digits.mar"), "'+' must match only itself"


def test_allowed_urls_refuses_encoded_dot_segments(production):
    pattern = re.compile(production["props"]["allowed_urls"])
    assert not pattern.fullmatch(f"file://{production['store']}/%2e%2e/outside/evil.mar")


def test_request_size_limits_sit_above_the_handlers_limits(production):
    props = production["props"]
    cap = int(props["max_request_size"])
    assert 0 < cap <= 64 * 1024 * 1024
    assert 0 < int(props["max_response_size"]) <= 64 * 1024 * 1024
    defaults = ModelSpec.__dataclass_fields__["max_body_bytes"].default
    assert 0 < defaults < cap, "a body over the per-model limit must reach the handler (its JSON 413)"
    assert 0 < ImageSpec(height=8, width=8).max_bytes < cap


def test_a_metrics_config_declaring_the_pack_metrics_is_written_beside(production):
    from handlers.metrics import DECLARED

    props = production["props"]
    path = props["metrics_config"]
    assert os.path.dirname(path) == str(production["folder"])
    text = open(path, encoding="utf-8").read()
    assert all(name in text for name in DECLARED)
    assert props["metrics_mode"] == "prometheus"


def test_only_explicit_flags_loosen_the_config(tmp_path):
    def render(**kwargs) -> dict:
        path = write_config(ServerConfig(model_store=str(tmp_path), **kwargs), str(tmp_path / "c.properties"))
        return read_properties(path)

    default = render()
    assert (default["disable_token_authorization"], default["enable_model_api"]) == ("false", "false")
    model_api = render(model_api=True)
    assert (model_api["disable_token_authorization"], model_api["enable_model_api"]) == ("false", "true")
