"""The tspack OIP gateway's parts that need no server: its route table, how TorchServe's errors become OIP errors,
the token check, the metadata it derives from manifests, and its port in the generated config."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import zipfile

import numpy as np
import pytest

from archiver.cli import build_parser
from archiver.deploy.properties import DEFAULT_OIP_PORT, ServerConfig
from archiver.errors import ServerError
from archiver.operate import oip_gateway
from archiver.operate.oip_gateway import Tokens, oip_error, route
from archiver.operate.oip_metadata import ManifestCache, model_metadata, read_manifest, server_metadata
from archiver.operate.oip_process import bind
from archiver.operate.status import endpoints, format_status
from archiver.optimize.validate import output_tensors
from handlers.errors import MethodNotAllowed, RouteNotFound, SpecError, TokenRefused

# --- routes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, action, params", [
    ("GET", "/v2", "server_metadata", {}),
    ("GET", "/v2/health/live", "live", {}),
    ("GET", "/v2/health/ready", "server_ready", {}),
    ("GET", "/v2/models/digits", "model_metadata", {"model": "digits", "version": None}),
    ("GET", "/v2/models/digits/versions/2.0", "model_metadata", {"model": "digits", "version": "2.0"}),
    ("GET", "/v2/models/digits/ready", "model_ready", {"model": "digits", "version": None}),
    ("GET", "/v2/models/digits/versions/2.0/ready", "model_ready", {"model": "digits", "version": "2.0"}),
    ("POST", "/v2/models/digits/infer", "infer", {"model": "digits", "version": None}),
    ("POST", "/v2/models/digits/versions/2.0/infer", "infer", {"model": "digits", "version": "2.0"}),
    ("GET", "/v2/models/ready", "model_metadata", {"model": "ready", "version": None}),  # a model named "ready"
])
def test_routes(method, path, action, params):
    found, groups = route(method, path)
    assert found.action == action
    assert groups == params


def test_only_metadata_routes_check_the_token_in_the_gateway():
    """Probes take none (they say ready or not); infer's token is TorchServe's to check."""
    assert {r.action for r in oip_gateway.ROUTES if r.token} == {"server_metadata", "model_metadata"}


@pytest.mark.parametrize("method, path, error, match", [
    ("GET", "/v2/models/digits/infer", MethodNotAllowed, "takes POST"),
    ("POST", "/v2/health/ready", MethodNotAllowed, "takes GET"),
    ("GET", "/v2/models/digits/versions/1.0/extra", RouteNotFound, "no OIP route"),
    ("GET", "/predictions/digits", RouteNotFound, "no OIP route"),
    ("GET", "/v2/models/", RouteNotFound, "no OIP route"),
])
def test_unknown_routes_and_methods_are_refused_by_name(method, path, error, match):
    with pytest.raises(error, match=match):
        route(method, path)
    assert error.status in (404, 405)


# --- TorchServe's errors as OIP errors ------------------------------------------------------------------


def test_torchserve_error_bodies_become_oip_errors():
    body = b'{\n  "code": 404,\n  "type": "ModelNotFoundException",\n  "message": "Model not found: nope"\n}\n'
    headers, rephrased = oip_error(404, [("content-type", "application/json"), ("x-request-id", "r")], body)
    assert json.loads(rephrased) == {"error": "Model not found: nope", "type": "ModelNotFoundException",
                                     "status": 404}
    assert ("x-request-id", "r") in headers and ("Content-Type", "application/json") in headers
    assert len([h for h in headers if h[0].lower() == "content-type"]) == 1


def test_handler_errors_pass_unchanged_and_bare_statuses_get_their_phrase():
    body = b'{"error": "OIP input \'a\' ...", "type": "shape_mismatch", "status": 422}'
    assert oip_error(422, [("content-type", "application/json")], body)[1] == body
    assert json.loads(oip_error(413, [], b"")[1]) == {"error": "Request Entity Too Large",
                                                      "type": "torchserve_error", "status": 413}
    assert json.loads(oip_error(500, [], b"worker died")[1])["error"] == "worker died"


# --- tokens --------------------------------------------------------------------------------------------


def write_keys(path, key: str, expires: dt.datetime) -> None:
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"management": {"key": "m", "expiration time": stamp},
                   "inference": {"key": key, "expiration time": stamp}, "API": {"key": "a"}}, f)


def test_tokens_follow_the_key_file(tmp_path):
    path = tmp_path / "key_file.json"
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=60)
    write_keys(path, "first", soon)
    tokens = Tokens(str(path))
    tokens.check("Bearer first")
    tokens.check("bearer first")
    for wrong in (None, "", "first", "Bearer m", "Bearer firs", "Basic first"):
        with pytest.raises(TokenRefused, match="Token Authorization failed"):
            tokens.check(wrong)
    write_keys(path, "renewed-key", soon)  # renewed: the old key stops working at once, as in TorchServe
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1))
    tokens.check("Bearer renewed-key")
    with pytest.raises(TokenRefused):
        tokens.check("Bearer first")


def test_expired_keys_are_refused_and_no_key_file_means_auth_is_off(tmp_path):
    path = tmp_path / "key_file.json"
    write_keys(path, "old", dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1))
    with pytest.raises(TokenRefused, match="expired"):
        Tokens(str(path)).check("Bearer old")
    Tokens(None).check(None)
    with pytest.raises(TokenRefused):  # token auth on, TorchServe has not written its keys yet
        Tokens(str(tmp_path / "missing.json")).check("Bearer old")


# --- metadata ------------------------------------------------------------------------------------------

DIGITS = {"name": "digits", "version": "1.0", "frontend": "tensor", "runtime": {"format": "onnx"},
          "inputs": [{"name": "input", "shape": [1, 8, 8], "dtype": "float32"}], "outputs": ["output"],
          "output": {"kind": "classification", "labels": [str(i) for i in range(10)]},
          "validation": {"output_tensors": {"output": {"datatype": "FP32", "shape": [-1, 10]}}}}


def test_tensor_metadata_puts_the_batch_axis_first_and_keeps_free_axes():
    sequence = {**DIGITS, "runtime": {"format": "aoti"}, "outputs": ["logits", "pooled"],
                "inputs": [{"name": "input_ids", "shape": [-1], "dtype": "int64"},
                           {"name": "attention_mask", "shape": [-1], "dtype": "int64"}],
                "validation": {"output_tensors": {"logits": {"datatype": "FP32", "shape": [-1, -1, 4]},
                                                  "pooled": {"datatype": "FP16", "shape": [-1, 32]}}}}
    meta = model_metadata("sequence", ["1.0", "2.0"], sequence)
    assert meta == {"name": "sequence", "versions": ["1.0", "2.0"], "platform": "pytorch_aoti",
                    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                               {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}],
                    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, 4]},
                                {"name": "pooled", "datatype": "FP16", "shape": [-1, 32]}]}


def test_text_image_router_and_older_archives():
    text = model_metadata("sentiment", ["1.0"], {**DIGITS, "frontend": "text", "outputs": ["logits"],
                                                 "validation": {}})
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    # built before validation recorded output tensors: FP32 and one score per label
    assert text["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert model_metadata("digits-image", ["1.0"], {**DIGITS, "frontend": "image"})["inputs"] == []
    assert model_metadata("digits-ab", ["1.0"], DIGITS, router=True)["platform"] == "tspack_ab_router"
    assert server_metadata()["extensions"] == ["binary_tensor_data"]


def test_manifests_are_read_from_plain_and_router_archives(tmp_path):
    plain, router, foreign = (str(tmp_path / n) for n in ("digits.mar", "ab.mar", "other.mar"))
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("tspack-manifest.json", json.dumps(DIGITS))
    with zipfile.ZipFile(router, "w") as z:
        z.writestr("variants/b/tspack-manifest.json", json.dumps({**DIGITS, "version": "2.0"}))
        z.writestr("variants/a/tspack-manifest.json", json.dumps(DIGITS))
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", "{}")
    assert read_manifest(plain) == (DIGITS, False)
    assert read_manifest(router) == (DIGITS, True)  # the first variant's, by name
    with pytest.raises(KeyError, match="not a tspack archive"):
        read_manifest(foreign)
    cache = ManifestCache()
    assert cache.get(plain) == (DIGITS, False)
    with zipfile.ZipFile(plain, "w") as z:  # a changed archive is read again
        z.writestr("tspack-manifest.json", json.dumps({**DIGITS, "version": "3.0"}))
    os.utime(plain, ns=(1, os.stat(plain).st_mtime_ns + 1))
    assert cache.get(plain)[0]["version"] == "3.0"


def test_validation_records_output_tensors_with_free_axes():
    runs = [{"logits": np.zeros((32, 12, 4), np.float32), "pooled": np.zeros((32, 8), np.float16),
             "names": np.array(["a"] * 32, dtype=np.str_), "odd": np.zeros((32, 2), np.complex64)},
            {"logits": np.zeros((32, 7, 4), np.float32), "pooled": np.zeros((32, 8), np.float16),
             "names": np.array(["b"] * 32, dtype=np.str_), "odd": np.zeros((32, 2), np.complex64)}]
    assert output_tensors(runs) == {"logits": {"datatype": "FP32", "shape": [-1, -1, 4]},
                                    "pooled": {"datatype": "FP16", "shape": [-1, 8]},
                                    "names": {"datatype": "BYTES", "shape": [-1]}}  # complex has no OIP datatype
    assert output_tensors(runs[:1])["logits"]["shape"] == [-1, 12, 4]


# --- config, CLI, status -------------------------------------------------------------------------------


def test_config_renders_the_gateway_address_and_checks_its_port():
    assert "tspack_oip_address=http://0.0.0.0:9000\n" in ServerConfig(
        model_store="s", oip_port=9000, bind_address="0.0.0.0").render()
    assert "tspack_oip_address" not in ServerConfig(model_store="s").render()  # the library's default: none
    with pytest.raises(SpecError, match="the OIP gateway's must differ"):
        ServerConfig(model_store="s", oip_port=8080)
    with pytest.raises(SpecError, match="must be in 1..65535"):
        ServerConfig(model_store="s", oip_port=70000)
    assert build_parser().parse_args(["config"]).oip_port == DEFAULT_OIP_PORT == 8083
    assert build_parser().parse_args(["config", "--oip-port", "0"]).oip_port == 0


def test_a_taken_gateway_port_fails_before_torchserve_starts():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(ServerError, match="is in use.*--oip-port"):
            bind(f"http://127.0.0.1:{taken.getsockname()[1]}")
    finally:
        taken.close()
    assert bind(None) is None
    with pytest.raises(ServerError, match="give http://HOST:PORT"):
        bind("127.0.0.1")


def test_status_points_oip_clients_at_the_gateway():
    url, gateway = "http://127.0.0.1:8080", "http://127.0.0.1:8083"
    assert endpoints(url, "digits", gateway) == {
        "predictions": f"{url}/predictions/digits", "oip": f"{gateway}/v2/models/digits/infer",
        "oip_version": f"{gateway}/v2/models/digits/versions/VERSION/infer",
        "oip_metadata": f"{gateway}/v2/models/digits"}
    status = {"running": True, "pid": 1, "started_at": "t", "healthy": False, "ping": "Healthy", "inference_url": url,
              "oip_url": gateway, "oip_gateway": {"url": gateway, "pid": 7, "running": False},
              "models": {"digits": [{"version": "1.0", "default": True, "workers": "1/1 ready", "batch_size": 8}]}}
    text = format_status(status)
    assert f"OIP v2: POST {gateway}/v2/models/digits[/versions/VERSION]/infer" in text
    assert f"OIP v2 gateway {gateway} (pid 7): NOT RUNNING" in text
