"""`tspack tune` against a real TorchServe on a tiny budget: two configurations, one-second runs. It must write a
report (table, plot, winner) and a tuned spec that `tspack build` accepts and builds the winner's settings from."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from archiver.package.archive import archive_info
from tests import support

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def built(digits_store, tmp_path_factory):
    """A spec with the digits model (TorchScript and ONNX), built into its own store."""
    root = tmp_path_factory.mktemp("tune")
    model = support.digits_model("digits", "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
                                 artifacts=[{"format": "torchscript"}, {"format": "onnx", "id": "onnx"}])
    spec = root / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model_store": "store", "models": [model]}, sort_keys=False))
    done = support.tspack("build", "--spec", str(spec), "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    return {"spec": str(spec), "store": str(root / "store")}


def test_tune_on_a_tiny_budget_writes_a_spec_that_builds(built):
    done = support.tspack("tune", "--spec", built["spec"], "--model", "digits", "--max-trials", "2",
                          "--duration-s", "1", "--concurrency", "1,4", "--slo-p99-ms", "5000", "--budget-s", "240",
                          "--quiet")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Winner under the p99 SLO of 5000 ms" in done.stdout
    tuned = os.path.splitext(built["spec"])[0] + ".tuned.yaml"
    assert f"tuned spec: {tuned}" in done.stdout

    folder = os.path.join(built["store"], "tune", "digits_v1.0")
    with open(os.path.join(folder, "report.json")) as f:
        report = json.load(f)
    assert len(report["trials"]) == 2, "--max-trials 2"
    assert all(t["error"] is None and [lv["concurrency"] for lv in t["levels"]] == [1, 4] for t in report["trials"])
    assert all(lv["requests_per_s"] > 0 and lv["errors"] == 0 for t in report["trials"] for lv in t["levels"])
    assert report["winner"] in (1, 2) and report["pareto"], report
    with open(os.path.join(folder, "pareto.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    with open(os.path.join(folder, "report.md")) as f:
        assert "WINNER" in f.read()

    chosen = report["trials"][report["winner"] - 1]
    serving = yaml.safe_load(open(tuned))["models"][0]["serving"]
    assert (serving["batch_size"], serving["workers"], serving["intra_op_threads"]) == (
        chosen["batch_size"], chosen["workers"], chosen["threads"])

    rebuilt = support.tspack("build", "--spec", tuned, "--only", "digits", "--quiet")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    _, _, config = archive_info(os.path.join(built["store"], "digits_v1.0.mar"))
    assert config["minWorkers"] == chosen["workers"]
    assert config["handler"]["intra_op_threads"] == chosen["threads"]
    zero_wait = chosen["batching"] == "zero_wait" and chosen["batch_size"] > 1
    assert config["batchSize"] == (1 if zero_wait else chosen["batch_size"])
    assert config.get("asyncCommunication", False) is zero_wait


def test_unbuilt_model_is_refused_with_what_to_run(built, tmp_path):
    spec = yaml.safe_load(open(built["spec"]))
    spec["model_store"] = str(tmp_path / "empty")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    done = support.tspack("tune", "--spec", str(path), "--model", "digits", "--quiet")
    assert done.returncode == 2
    assert "no validated archive of digits 1.0" in done.stderr
    assert "tspack build --spec FILE --only digits" in done.stderr
