"""`tspack config`: the config.properties and metrics config it renders.

What the production profile must keep closed (token auth, model API, allowed_urls, size limits) is asserted once,
in tests/unit/test_security.py; this file checks the rendering: models, workers, batching, metrics, the CLI.
"""

from __future__ import annotations

import json

import pytest
import yaml

from archiver.deploy.properties import ModelEntry, ServerConfig, read_properties, write_config
from handlers.errors import SpecError
from handlers.metrics import DECLARED
from tests import support


def test_models_workers_batching_and_metrics_are_rendered(tmp_path):
    store = tmp_path / "store"
    entry = ModelEntry(name="digits", version="1.0", mar="digits_v1.0.mar", workers=2, batch_size=4,
                       max_batch_delay_ms=3)
    config = ServerConfig(model_store=str(store), models=(entry,))
    path = write_config(config, str(tmp_path / "c" / "config.properties"))
    props = read_properties(path)
    assert props["model_store"] == str(store)
    assert props["load_models"] == "digits=digits_v1.0.mar"
    models = json.loads(props["models"])
    assert models["digits"]["1.0"] == {"defaultVersion": True, "marName": "digits_v1.0.mar", "minWorkers": 2,
                                       "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 3, "responseTimeout": 120}
    metrics = yaml.safe_load(open(props["metrics_config"]))
    declared = {m["name"]: m["dimensions"] for kind in metrics["model_metrics"].values() for m in kind}
    for name, (_, _, dims) in DECLARED.items():
        assert declared[name] == dims
    assert "ts_inference_requests_total" in str(metrics["ts_metrics"])


@pytest.mark.parametrize("kwargs,message", [
    ({"inference_port": 8080, "management_port": 8080}, "ports: .* must differ"),
    ({"job_queue_size": 0}, "job_queue_size: must be >= 1"),
    ({"number_of_gpu": -1}, "number_of_gpu: must be >= 0"),
])
def test_bad_server_config_is_refused(kwargs, message):
    with pytest.raises(SpecError, match=message):
        ServerConfig(model_store="store", **kwargs)


def test_cli_dev_profile_is_explicit(tmp_path, digits_store):
    config = ("config", "--model-store", digits_store["store"], "--gpus", "0")
    production = support.tspack(*config, "--load", "digits_v1.0.mar", "--out", str(tmp_path / "p.properties"))
    assert production.returncode == 0, production.stderr
    assert "token auth: on   model API: off" in production.stdout
    dev = support.tspack(*config, "--load", "digits_v1.0.mar", "--out", str(tmp_path / "d.properties"),
                         "--profile", "dev")
    assert dev.returncode == 0, dev.stderr
    assert "token auth: OFF" in dev.stdout and "model API: on" in dev.stdout
    props = read_properties(str(tmp_path / "d.properties"))
    assert props["disable_token_authorization"] == "true" and props["enable_model_api"] == "true"
    missing = support.tspack(*config, "--load", "nope.mar", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2
    store = digits_store["store"]
    assert missing.stderr.strip() == f"tspack config: --load: archive not found: nope.mar (looked in {store})"
