"""The archiver: export, validation against eager, packaging, the report, and refusals of bad specs."""

from __future__ import annotations

import json
import os
import zipfile

import pytest
import torch
import yaml
from torch import nn

from archiver.build import build
from archiver.package.archive import read_manifest
from archiver.package.report import load_report
from archiver.spec import DeploySpec
from handlers.errors import SpecError
from handlers.spec import parse
from tests import support

CONTROL_FLOW = '''
import torch
from torch import nn


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.abs().sum() > 0:
            return self.fc(x)
        return -self.fc(x)
'''

BATCH_DEPENDENT = CONTROL_FLOW.replace("x.abs().sum() > 0", "x.sum() > 0")

NOISY = '''
import torch
from torch import nn


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) + 0.01 * torch.rand_like(self.fc(x))
'''


def small_model(tmp_path, source: str, class_name: str) -> tuple[str, str]:
    path = tmp_path / f"{class_name.lower()}.py"
    path.write_text(source)
    namespace: dict = {}
    exec(compile(source, str(path), "exec"), namespace)
    torch.manual_seed(0)
    weights = tmp_path / f"{class_name.lower()}.pt"
    torch.save(namespace[class_name]().state_dict(), weights)
    return f"{path}:{class_name}", str(weights)


def model_dict(model_class: str, weights: str, **overrides) -> dict:
    model = {"name": "small", "version": "1.0", "source": {"model_class": model_class, "weights": weights},
             "input": {"shape": [4]}}
    model.update(overrides)
    return model


def test_archive_is_self_contained_and_records_its_build(digits_store):
    path = os.path.join(digits_store["store"], "digits_v2.0.mar")
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert {"tensor.py", "model.pt", "tspack-manifest.json", "handlers/base.py", "handlers/runtimes/torch.py",
            "MAR-INF/MANIFEST.json", "index_to_name.json"} <= names
    assert config == {"deviceType": "cpu", "minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
                      "responseTimeout": 120}
    manifest = read_manifest(path)
    assert manifest.version == "2.0" and manifest.built_at
    assert manifest.validation["passed"] and manifest.validation["max_abs_error"] <= 1e-4
    assert manifest.validation["top1_agreement"] == 1.0
    report = load_report(digits_store["store"])["artifacts"]["digits@2.0"]
    assert report["passed"] and report["archive"] == path and report["size_bytes"] > 0
    assert report["latency_ms_b1"] > 0 and report["latency_ms_b32"] > 0


def test_trace_of_data_dependent_control_flow_is_refused_and_script_works(tmp_path):
    model_class, weights = small_model(tmp_path, CONTROL_FLOW, "Branchy")
    store = str(tmp_path / "store")
    spec = parse(DeploySpec, {"model_store": store, "models": [model_dict(model_class, weights, artifacts=[
        {"format": "torchscript", "method": "trace", "id": "traced"},
        {"format": "torchscript", "method": "script", "id": "scripted"}])]})
    result = build(spec, progress=False)
    traced, scripted = result.entries
    assert not traced.passed and "use method: script" in traced.error
    assert not os.path.exists(os.path.join(store, "small-traced_v1.0.mar"))
    assert scripted.passed and os.path.exists(os.path.join(store, "small-scripted_v1.0.mar"))
    assert scripted.max_abs_error <= 1e-5


def test_model_whose_answer_depends_on_its_batch_mates_is_refused(tmp_path):
    """Batching such a model would change one client's answer with another's request: never ship it."""
    model_class, weights = small_model(tmp_path, BATCH_DEPENDENT, "Branchy")
    spec = parse(DeploySpec, {"model_store": str(tmp_path / "store"), "models": [
        model_dict(model_class, weights, artifacts=[{"format": "torchscript", "method": "script"}])]})
    (entry,) = build(spec, progress=False).entries
    assert not entry.passed and "batch-1 and batch-16 outputs differ" in entry.error


def test_artifact_that_drifts_fails_validation_and_is_not_packaged(tmp_path):
    model_class, weights = small_model(tmp_path, NOISY, "Noisy")
    store = str(tmp_path / "store")
    spec = parse(DeploySpec, {"model_store": store, "models": [model_dict(model_class, weights, tolerance=1e-5)]})
    (entry,) = build(spec, progress=False).entries
    assert not entry.passed
    assert "small@1.0: validation failed: max abs error" in entry.error and "exceeds tolerance" in entry.error
    assert os.listdir(store) == ["build_report.json"]
    assert load_report(store)["artifacts"]["small@1.0"]["passed"] is False


def test_state_dict_artifact_ships_its_model_class(tmp_path, digits_store):
    store = str(tmp_path / "store")
    support.build_models(store, [support.digits_model(
        "digits", "3.0", digits_store["weights"]["1.0"], artifacts=[{"format": "state_dict"}])])
    with zipfile.ZipFile(os.path.join(store, "digits_v3.0.mar")) as z:
        assert "digits_cnn.py" in z.namelist()
    manifest = read_manifest(os.path.join(store, "digits_v3.0.mar"))
    assert manifest.runtime.format == "state_dict" and manifest.runtime.model_class == "digits_cnn.py:DigitsCNN"


@pytest.mark.parametrize("change,message", [
    ({"source": {"model_class": "/nope/model.py:Net", "weights": "/nope/w.pt"}}, "source.model_class: file not found"),
    ({"tolerance": "small"}, "tolerance: expected a number, got 'small'"),
    ({"artifacts": [{"format": "tflite"}]},
     "format: 'tflite' is not allowed; choose one of 'aoti', 'onnx', 'torchscript'"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"input": {"shape": [3]}}, "samples.file: 'x' has shape (32, 1, 8, 8), expected (N, 3)"),
])
def test_bad_spec_is_refused_naming_the_key(tmp_path, digits_store, change, message):
    store = str(tmp_path / "store")
    model = support.digits_model("digits", "9.0", digits_store["weights"]["1.0"], digits_store["samples"])
    model.update(change)
    with pytest.raises(SpecError) as caught:
        build(parse(DeploySpec, {"model_store": store, "models": [model]}), progress=False)
    assert message in str(caught.value)
    assert not os.path.exists(store) or not any(f.endswith(".mar") for f in os.listdir(store))


def test_cli_prints_one_line_errors_and_exit_codes(tmp_path, digits_store):
    spec_file = tmp_path / "deploy.yaml"
    model = support.digits_model("digits", "1.0", digits_store["weights"]["1.0"])
    model["source"]["weights"] = "missing.pt"
    spec_file.write_text(yaml.safe_dump({"model_store": str(tmp_path / "store"), "models": [model]}))
    bad = support.tspack("build", "--spec", str(spec_file), "--quiet")
    assert bad.returncode == 2
    missing = tmp_path / "missing.pt"
    assert bad.stderr.strip() == f"tspack build: models.digits.source.weights: file not found: {missing}"
    good = support.tspack("build", "--quiet", "--name", "flags", "--model-class", support.DIGITS_CLASS,
                          "--weights", digits_store["weights"]["1.0"], "--input-shape", "1,8,8",
                          "--format", "torchscript", "state_dict", "--labels", ",".join(support.LABELS),
                          "--model-store", str(tmp_path / "store2"))
    assert good.returncode == 0, good.stderr
    assert "flags@1.0" in good.stdout and "flags-state_dict@1.0" in good.stdout and "PASS" in good.stdout
    report = json.loads((tmp_path / "store2" / "build_report.json").read_text())
    assert set(report["artifacts"]) == {"flags@1.0", "flags-state_dict@1.0"}


def test_eager_checkpoint_is_never_unpickled(tmp_path):
    """A checkpoint holding a pickled module (not a state_dict) is refused by weights_only loading."""
    model_class, _ = small_model(tmp_path, NOISY, "Noisy")
    pickled = tmp_path / "whole_module.pt"
    torch.save(nn.Linear(4, 3), pickled)
    spec = parse(DeploySpec, {"model_store": str(tmp_path / "s"), "models": [model_dict(model_class, str(pickled))]})
    from archiver.errors import BuildError

    with pytest.raises(BuildError, match="source.weights: .* is not a loadable state_dict"):
        build(spec, progress=False)


PLAIN = NOISY.replace(" + 0.01 * torch.rand_like(self.fc(x))", "").replace("Noisy", "Plain")


def test_an_artifact_that_crashes_is_reported_and_the_others_still_build(tmp_path):
    """An exception from torch, ONNX Runtime or a user hook fails that artifact only, with its name."""
    model_class, weights = small_model(tmp_path, PLAIN, "Plain")
    hook = tmp_path / "broken_symbolics.py"
    hook.write_text("def register(opset):\n    raise RuntimeError('symbolic registry is broken')\n")
    store = str(tmp_path / "store")
    spec = parse(DeploySpec, {"model_store": store, "models": [model_dict(model_class, weights, artifacts=[
        {"format": "onnx", "id": "onnx", "custom_ops": str(hook)}, {"format": "torchscript", "id": "ts"}])]})
    result = build(spec, progress=False)
    crashed, good = result.entries
    assert not crashed.passed
    assert crashed.error == "small-onnx@1.0: RuntimeError: symbolic registry is broken"
    assert good.passed and os.path.exists(good.archive)
    assert not os.path.exists(os.path.join(store, "small-onnx_v1.0.mar"))
    report = load_report(store)["artifacts"]
    assert report["small-onnx@1.0"]["passed"] is False and report["small-ts@1.0"]["passed"] is True


def test_cli_exits_1_when_an_artifact_fails_validation(tmp_path):
    model_class, weights = small_model(tmp_path, CONTROL_FLOW, "Branchy")
    store = tmp_path / "store"
    run = support.tspack("build", "--quiet", "--name", "branchy", "--model-class", model_class, "--weights",
                         weights, "--input-shape", "4", "--batch-size", "1", "--model-store", str(store))
    assert run.returncode == 1, run.stderr
    assert "FAIL" in run.stdout and "use method: script" in run.stdout
    assert run.stderr.strip() == "tspack build: 1 artifact(s) failed validation: branchy@1.0"
    assert "Traceback" not in run.stderr
    assert os.listdir(store) == ["build_report.json"]


@pytest.mark.parametrize("body, advice", [
    ("import tspack_no_such_zoo\n", "install it where `tspack build` runs"),
    # What importing torchvision raises when its wheel was built for another torch (seen with torch 2.13 CPU).
    ("raise RuntimeError('operator torchvision::nms does not exist')\n", "torchvision wheel built for torch"),
])
def test_a_model_zoo_that_cannot_be_imported_gets_a_one_line_refusal_saying_what_to_change(tmp_path, body, advice):
    model_file = tmp_path / "zoo_model.py"
    model_file.write_text(body)
    torch.save({}, tmp_path / "w.pt")
    result = support.tspack("build", "--name", "zoo", "--model-class", f"{model_file}:Net", "--weights",
                            str(tmp_path / "w.pt"), "--input-shape", "3,8,8", "--format", "onnx",
                            "--model-store", str(tmp_path / "store"), "--quiet")
    assert result.returncode == 2  # the pack's one-line errors
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tspack build: source.model_class: importing ")
    assert advice in lines[0]
