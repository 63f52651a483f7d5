"""alerts.yaml (archiver/deploy/alerts.py), checked and exercised with Prometheus' own promtool.

`promtool check rules` validates the file; `promtool test rules` evaluates it on synthetic series, so the PromQL
is tested for what it does: the drift PSI it records equals `tspack drift`'s, and each alert fires when it
should and stays quiet when it should not. promtool comes from Debian's `prometheus` package
(scripts/check_tools.sh installs it for root).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from archiver.deploy.alerts import ALERTS_FILE, AlertThresholds, DriftBaseline, alert_rules, write_alerts
from archiver.deploy.properties import ServerConfig, write_config
from archiver.operate.drift import Histogram, prediction_profile, psi
from handlers.errors import SpecError
from tests import support

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed: apt-get install prometheus "
                                    "(or run scripts/check_tools.sh as root)")
WHO = {"ModelName": "digits", "ModelVersion": "1.0"}


def _profile() -> dict:
    logits = np.random.default_rng(0).standard_normal((400, 10)) * 4
    return prediction_profile(support.softmax(logits), support.LABELS)


def _promtool(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _series(name: str, labels: dict[str, str], per_minute: float, minutes: int = 150) -> dict:
    tags = ",".join(f'{k}="{v}"' for k, v in {**labels, "Hostname": "host"}.items())
    return {"series": f"{name}{{{tags}}}", "values": f"0+{per_minute:g}x{minutes}"}


def _expected_alert(rules: dict, name: str, labels: dict[str, str]) -> dict:
    """The alert as promtool reports it: its labels, and its annotations with the label templates filled in."""
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)
    annotations = {}
    for key, text in rule["annotations"].items():
        for label, value in labels.items():
            text = text.replace("{{ $labels." + label + " }}", value)
        annotations[key] = text
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def _run_tests(tmp_path, rules: dict, tests: list[dict]) -> None:
    (tmp_path / ALERTS_FILE).write_text(yaml.safe_dump(rules, sort_keys=False))
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": [ALERTS_FILE], "evaluation_interval": "1m",
                                                         "tests": tests}, sort_keys=False))
    result = _promtool("test", "rules", "tests.yaml", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_tspack_config_writes_rules_promtool_accepts(tmp_path):
    path = write_config(ServerConfig(model_store=str(tmp_path)), str(tmp_path / "config.properties"))
    alerts = os.path.join(os.path.dirname(path), ALERTS_FILE)
    checked = _promtool("check", "rules", alerts, cwd=str(tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with open(alerts, encoding="utf-8") as f:
        names = [r.get("alert") for g in yaml.safe_load(f)["groups"] for r in g["rules"]]
    assert names == ["TspackHighErrorRate", "TspackFrontendErrors", "TspackHighP99Latency"]  # no profile: no drift

    with_drift = write_alerts(str(tmp_path / "drift.yaml"), AlertThresholds(), [DriftBaseline("digits", "1.0",
                                                                                              _profile())])
    checked = _promtool("check", "rules", with_drift, cwd=str(tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


@needs_promtool
def test_drift_rules_compute_the_psi_tspack_drift_prints(tmp_path):
    profile = _profile()
    rules = alert_rules(AlertThresholds(), [DriftBaseline("digits", "1.0", profile)])
    served = {"three": 6, "four": 3, "zero": 1}  # per minute; other labels never served (no series at all)
    expected = psi(Histogram(profile["labels"]), Histogram({k: 60 * v for k, v in served.items()}))
    _run_tests(tmp_path, rules, [{
        "interval": "1m",
        "input_series": [_series("tspack_predictions_total", {**WHO, "Label": k}, v) for k, v in served.items()],
        "promql_expr_test": [{"expr": "round(tspack:label_psi * 1e4)", "eval_time": "90m",
                              "exp_samples": [{"labels": "{" + ",".join(f'{k}="{v}"' for k, v in WHO.items()) + "}",
                                               "value": round(expected * 1e4)}]}],
    }])


@needs_promtool
def test_drift_alerts_fire_on_a_skewed_stream_only(tmp_path):
    profile = _profile()
    rules = alert_rules(AlertThresholds(), [DriftBaseline("digits", "1.0", profile)])
    matching = [_series("tspack_predictions_total", {**WHO, "Label": k}, v / 10) for k, v in profile["labels"].items()]
    matching += [_series("tspack_top1_probability_total", {**WHO, "Bucket": k}, v / 10)
                 for k, v in profile["top1"].items()]
    skewed = [_series("tspack_predictions_total", {**WHO, "Label": "three"}, 10),
              _series("tspack_top1_probability_total", {**WHO, "Bucket": "0.5"}, 10)]
    trickle = [_series("tspack_predictions_total", {**WHO, "Label": "three"}, 1)]  # 60 in the hour: under 100
    _run_tests(tmp_path, rules, [
        {"interval": "1m", "input_series": skewed, "alert_rule_test": [
            {"eval_time": "10m", "alertname": "TspackPredictionDrift", "exp_alerts": []},  # not yet 15m pending
            {"eval_time": "90m", "alertname": "TspackPredictionDrift",
             "exp_alerts": [_expected_alert(rules, "TspackPredictionDrift", WHO)]},
            {"eval_time": "90m", "alertname": "TspackConfidenceDrift",
             "exp_alerts": [_expected_alert(rules, "TspackConfidenceDrift", WHO)]}]},
        {"interval": "1m", "input_series": matching, "alert_rule_test": [
            {"eval_time": "90m", "alertname": "TspackPredictionDrift", "exp_alerts": []},
            {"eval_time": "90m", "alertname": "TspackConfidenceDrift", "exp_alerts": []}]},
        {"interval": "1m", "input_series": trickle, "alert_rule_test": [
            {"eval_time": "90m", "alertname": "TspackPredictionDrift", "exp_alerts": []}]},
    ])


@needs_promtool
def test_error_rate_and_latency_alerts(tmp_path):
    rules = alert_rules(AlertThresholds(error_rate=0.05, p99_latency_s=0.5), [])
    ok = {**WHO, "Variant": "none", "Status": "200"}
    failing = [_series("tspack_requests_total", ok, 90), _series("tspack_requests_total", {**ok, "Status": "500"}, 10)]
    healthy = [_series("tspack_requests_total", ok, 99), _series("tspack_requests_total", {**ok, "Status": "500"}, 1),
               _series("tspack_requests_total", {**ok, "Status": "422"}, 50)]
    slow = [_series("tspack_handler_latency_seconds_bucket", {**WHO, "le": le}, 10 if float(le) >= 1 else 0)
            for le in ("0.1", "0.5", "1", "+Inf")]
    queue_full = [_series("Requests2XX", {"Level": "Host"}, 50), _series("Requests5XX", {"Level": "Host"}, 50)]
    _run_tests(tmp_path, rules, [
        {"interval": "1m", "input_series": failing + slow + queue_full, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "TspackHighErrorRate",
             "exp_alerts": [_expected_alert(rules, "TspackHighErrorRate", WHO)]},
            {"eval_time": "20m", "alertname": "TspackHighP99Latency",
             "exp_alerts": [_expected_alert(rules, "TspackHighP99Latency", WHO)]},
            {"eval_time": "20m", "alertname": "TspackFrontendErrors",
             "exp_alerts": [_expected_alert(rules, "TspackFrontendErrors", {})]}]},
        {"interval": "1m", "input_series": healthy, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "TspackHighErrorRate", "exp_alerts": []},  # 4xx are not errors here
            {"eval_time": "20m", "alertname": "TspackFrontendErrors", "exp_alerts": []}]},
    ])


def test_archives_without_a_profile_get_no_drift_rules(tmp_path):
    import zipfile

    from archiver.deploy.alerts import baselines
    from archiver.deploy.properties import ModelEntry

    with zipfile.ZipFile(tmp_path / "router_v1.0.mar", "w") as archive:  # no tspack-manifest.json, as a router
        archive.writestr("MAR-INF/MANIFEST.json", "{}")
    entries = (ModelEntry("gone", "1.0", "gone_v1.0.mar"), ModelEntry("router", "1.0", "router_v1.0.mar"))
    assert baselines(entries, str(tmp_path)) == []
    write_config(ServerConfig(model_store=str(tmp_path), models=entries), str(tmp_path / "config.properties"))
    with open(tmp_path / ALERTS_FILE, encoding="utf-8") as f:
        assert [g["name"] for g in yaml.safe_load(f)["groups"]] == ["tspack-service"]


def test_tspack_config_flags_reach_the_rules(tmp_path, capsys):
    from archiver.cli import main

    out = tmp_path / "config.properties"
    assert main(["config", "--model-store", str(tmp_path), "--out", str(out), "--gpus", "0", "--alert-p99-s", "0.25",
                 "--alert-error-rate", "0.01"]) == 0
    assert f"wrote {tmp_path / ALERTS_FILE}" in capsys.readouterr().out
    with open(tmp_path / ALERTS_FILE, encoding="utf-8") as f:
        rules = {r["alert"]: r["expr"] for g in yaml.safe_load(f)["groups"] for r in g["rules"]}
    assert rules["TspackHighP99Latency"].endswith("> 0.25") and rules["TspackHighErrorRate"].endswith("> 0.01")
    assert main(["config", "--model-store", str(tmp_path), "--out", str(out), "--gpus", "0",
                 "--alert-error-rate", "5"]) == 2
    assert "alerts.error_rate: must be within (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, key", [
    ({"error_rate": 0}, "alerts.error_rate"), ({"error_rate": 1.5}, "alerts.error_rate"),
    ({"p99_latency_s": 0}, "alerts.p99_latency_s"), ({"max_psi": -1}, "alerts.max_psi"),
    ({"drift_window": "an hour"}, "alerts.drift_window"), ({"min_predictions": 0}, "alerts.min_predictions"),
])
def test_bad_thresholds_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(SpecError, match="^" + key + ":"):
        AlertThresholds(**kwargs)
