"""Prediction drift against a real TorchServe: the handlers' drift metrics and `tspack drift` (issue 21).

One archive of the trained digits CNN, built with the held-out split as its samples, is served under two
names, so each stream has its own counters: `digits` gets a random half of the held-out digits (the population
the build profiled), `digits-skew` gets held-out digits of one class only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest
import yaml

from archiver.deploy.alerts import ALERTS_FILE
from archiver.deploy.properties import ModelEntry
from archiver.operate.drift import PROFILE_KEY
from archiver.operate.server import stop
from archiver.operate.status import metric_sum, parse_prometheus
from archiver.package.archive import read_manifest
from handlers.metrics import PREDICTIONS, TOP1, TOP1_EDGES, bucket_name
from tests import support

pytestmark = pytest.mark.integration

SKEWED_CLASS = 3
FLUSH_WAIT_S = 20.0  # the handlers flush counters once a second; allow a loaded machine its delays


def _send(client, model: str, x: np.ndarray, rows: int = 16) -> None:
    for start in range(0, len(x), rows):
        response = client.predict(model, body={"data": x[start:start + rows].tolist()})
        assert response.status_code == 200, response.text


def _wait_counted(client, model: str, expected: int) -> list:
    """Poll the metrics port until the handler's flushed counters show `expected` predictions of `model`."""
    deadline = time.monotonic() + FLUSH_WAIT_S
    while True:
        samples = parse_prometheus(client.metrics())
        counted = metric_sum(samples, PREDICTIONS, ModelName=model, ModelVersion="1.0")
        if counted >= expected or time.monotonic() > deadline:
            assert counted == expected, f"{model}: {counted} predictions counted, {expected} sent"
            return samples
        time.sleep(0.2)


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    store = str(root / "store")
    support.build_models(store, [support.digits_model("digits", "1.0", trained["weights"], trained["heldout"])])
    entries = [ModelEntry(name=name, version="1.0", mar="digits_v1.0.mar", batch_size=8, max_batch_delay_ms=5)
               for name in ("digits", "digits-skew")]
    handle = support.start_server(str(root), store, entries)
    try:
        yield {"handle": handle, "store": store, "run_dir": handle.run_dir, "cwd": str(root)}
    finally:
        stop(handle.run_dir, quiet=True)


def test_the_build_profiles_its_validation_predictions(served, trained):
    profile = read_manifest(os.path.join(served["store"], "digits_v1.0.mar")).validation[PROFILE_KEY]
    assert profile["samples"] == len(trained["x_test"])
    assert set(profile["labels"]) == set(support.LABELS)  # every label, also those never predicted
    assert sum(profile["labels"].values()) == len(trained["x_test"])
    assert profile["top1_edges"] == list(TOP1_EDGES)
    assert set(profile["top1"]) == {bucket_name(e) for e in TOP1_EDGES}
    # a trained classifier: its predicted labels follow the held-out labels (accuracy is checked elsewhere)
    expected = np.bincount(trained["y_test"], minlength=10)
    got = np.array([profile["labels"][label] for label in support.LABELS])
    assert np.abs(got - expected).sum() <= 0.1 * len(trained["x_test"])


def test_matching_stream_passes_and_skewed_stream_drifts(served, trained):
    client = served["handle"].client()
    x, y = trained["x_test"], trained["y_test"]
    rng = np.random.default_rng(21)
    half = rng.permutation(len(x))[: len(x) // 2]
    skewed = np.concatenate([x[y == SKEWED_CLASS]] * 3)

    _send(client, "digits", x[half])
    _send(client, "digits-skew", skewed)
    samples = _wait_counted(client, "digits", len(half))
    _wait_counted(client, "digits-skew", len(skewed))
    assert metric_sum(samples, TOP1, ModelName="digits", ModelVersion="1.0") == len(half)

    run = ("--run-dir", served["run_dir"])
    matching = support.tspack("drift", "digits", *run, cwd=served["cwd"])
    print(matching.stdout)  # shown with -rP: the README's example
    assert matching.returncode == 0, matching.stdout + matching.stderr
    assert "ok: max PSI" in matching.stdout and "digits 1.0:" in matching.stdout

    drifted = support.tspack("drift", "digits-skew", "--version", "1.0", *run, cwd=served["cwd"])
    print(drifted.stdout)
    assert drifted.returncode == 1, drifted.stdout + drifted.stderr
    assert "DRIFT: max PSI" in drifted.stdout
    rows = {line.split()[0]: line.split() for line in drifted.stdout.splitlines()[2:12]}
    assert set(rows) == set(support.LABELS)
    assert float(rows[support.LABELS[SKEWED_CLASS]][2].rstrip("%")) > 90.0  # served share of the skewed class

    # a looser threshold accepts the same skew; too few predictions is an error, not a verdict
    loose = support.tspack("drift", "digits-skew", "--max-psi", "100", *run, cwd=served["cwd"])
    assert loose.returncode == 0, loose.stdout + loose.stderr
    few = support.tspack("drift", "digits", "--min-count", "100000", *run, cwd=served["cwd"])
    assert few.returncode == 2 and "fewer than --min-count 100000" in few.stderr


def test_alerts_carry_the_profiles_of_the_start_up_archives(served):
    """start_server wrote config.properties with `write_config`: alerts.yaml beside it has each model's baseline."""
    path = os.path.join(served["cwd"], ALERTS_FILE)
    with open(path, encoding="utf-8") as f:
        groups = {g["name"]: g["rules"] for g in yaml.safe_load(f)["groups"]}
    baselines = {(r["labels"]["ModelName"], r["labels"]["Label"]) for r in groups["tspack-drift"]
                 if r.get("record") == "tspack:label_expected_share"}
    assert baselines == {(name, label) for name in ("digits", "digits-skew") for label in support.LABELS}
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "rules", path], capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr
