"""OIP in the generated config and in `tspack serve status` (no server)."""

from __future__ import annotations

from archiver.cli import build_parser
from archiver.deploy.properties import ServerConfig
from archiver.operate.status import endpoints, format_status


def test_config_turns_torchserve_oip_on_unless_asked_not_to():
    assert "ts_open_inference_protocol=true\n" in ServerConfig(model_store="store").render()
    assert "ts_open_inference_protocol=false\n" in ServerConfig(model_store="store",
                                                               open_inference_protocol=False).render()
    assert build_parser().parse_args(["config", "--no-oip"]).no_oip
    assert not build_parser().parse_args(["config"]).no_oip


def test_status_prints_each_models_oip_endpoint_next_to_predictions():
    url = "http://127.0.0.1:8080"
    assert endpoints(url, "digits") == {"predictions": f"{url}/predictions/digits",
                                        "oip": f"{url}/v2/models/digits/infer"}
    status = {"running": True, "pid": 1, "started_at": "t", "healthy": True, "ping": "Healthy", "inference_url": url,
              "models": {"digits": [{"version": "1.0", "default": True, "workers": "1/1 ready", "batch_size": 8}]}}
    text = format_status(status)
    assert f"POST {url}/predictions/digits[/VERSION]   OIP v2: POST {url}/v2/models/digits/infer" in text
