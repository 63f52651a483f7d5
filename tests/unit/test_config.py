"""`tspack config`: generated config.properties and metrics config."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml

from archiver.serving import ARCHIVE_NAME, ModelEntry, ServerConfig, read_properties, write_config
from handlers.errors import SpecError
from handlers.metrics import DECLARED


def test_production_defaults_keep_token_auth_on_and_model_api_off(tmp_path):
    store = tmp_path / "store"
    entry = ModelEntry(name="digits", version="1.0", mar="digits_v1.0.mar", workers=2, batch_size=4,
                       max_batch_delay_ms=3)
    config = ServerConfig(model_store=str(store), models=(entry,))
    path = write_config(config, str(tmp_path / "c" / "config.properties"))
    props = read_properties(path)
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    assert props["metrics_mode"] == "prometheus"
    assert props["allowed_urls"] == "file://" + re.escape(str(store)) + "/" + ARCHIVE_NAME
    assert props["load_models"] == "digits=digits_v1.0.mar"
    models = json.loads(props["models"])
    assert models["digits"]["1.0"] == {"defaultVersion": True, "marName": "digits_v1.0.mar", "minWorkers": 2,
                                       "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 3, "responseTimeout": 120}
    metrics = yaml.safe_load(open(props["metrics_config"]))
    declared = {m["name"]: m["dimensions"] for kind in metrics["model_metrics"].values() for m in kind}
    for name, (_, _, dims) in DECLARED.items():
        assert declared[name] == dims
    assert "ts_inference_requests_total" in str(metrics["ts_metrics"])


def test_allowed_urls_only_match_the_model_store(tmp_path):
    store = tmp_path / "my store+1"
    props = read_properties(write_config(ServerConfig(model_store=str(store)), str(tmp_path / "config.properties")))
    pattern = re.compile(props["allowed_urls"])
    assert pattern.fullmatch(f"file://{store}/digits.mar")
    assert not pattern.fullmatch("http://127.0.0.1:9999/evil.mar")
    assert not pattern.fullmatch("file:///etc/evil.mar")


@pytest.mark.parametrize("kwargs,message", [
    ({"inference_port": 8080, "management_port": 8080}, "ports: .* must differ"),
    ({"job_queue_size": 0}, "job_queue_size: must be >= 1"),
    ({"number_of_gpu": -1}, "number_of_gpu: must be >= 0"),
])
def test_bad_server_config_is_refused(kwargs, message):
    with pytest.raises(SpecError, match=message):
        ServerConfig(model_store="store", **kwargs)


def test_cli_dev_profile_is_explicit(tmp_path, digits_store):
    tspack = [sys.executable, "-m", "archiver.cli", "config", "--model-store", digits_store["store"],
              "--load", "digits_v1.0.mar", "--gpus", "0"]
    production = subprocess.run(tspack + ["--out", str(tmp_path / "p.properties")], capture_output=True, text=True)
    assert production.returncode == 0, production.stderr
    assert "token auth: on" in production.stdout and "model API: off" in production.stdout
    dev = subprocess.run(tspack + ["--out", str(tmp_path / "d.properties"), "--profile", "dev"],
                         capture_output=True, text=True)
    assert "token auth: OFF" in dev.stdout and "model API: on" in dev.stdout
    props = read_properties(str(tmp_path / "d.properties"))
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "true"
    missing = subprocess.run(tspack[:-4] + ["--load", "nope.mar", "--out", str(tmp_path / "x")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "--load: archive not found: nope.mar" in missing.stderr
