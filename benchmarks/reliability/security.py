"""Security: the production config's token auth and model API, allowed_urls, size limits, recorded weights."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zipfile
from typing import Any, Optional

import requests

from archiver.deploy.properties import ARCHIVE_NAME, read_properties
from archiver.errors import ApiError
from archiver.operate.client import TorchServeClient
from benchmarks.reliability import inputs
from benchmarks.reliability.result import Result
from benchmarks.reliability.rig import MODEL, SLOW, Rig
from benchmarks.reliability.settings import Settings

MIB = 1024 * 1024


def _status(method: str, url: str, token: Optional[str] = None, **kwargs: Any) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, url, headers=headers, timeout=30, **kwargs).status_code


def check_production(result: Result, rig: Rig) -> None:
    prod = rig.start_production()
    props = read_properties(prod.config_path)
    result.check("config: token authorization on", props.get("disable_token_authorization") == "false")
    result.check("config: model API off", props.get("enable_model_api") == "false")
    store = os.path.abspath(rig.store)
    result.check("config: allowed_urls = the local model store only",
                 props.get("allowed_urls") == f"file://{re.escape(store)}/{ARCHIVE_NAME}", props.get("allowed_urls"))
    limit = int(props.get("max_request_size", "0"))
    result.check("config: max_request_size set (64 MiB)", 0 < limit <= 64 * MIB, limit)
    with open(prod.key_file, encoding="utf-8") as f:
        keys = json.load(f)
    inference, management = keys["inference"]["key"], keys["management"]["key"]
    body = {"data": inputs.good_json()}
    refused = {f"{what} {label}": _status(method, url, token, **kw)
               for label, token in (("without a token", None), ("with a wrong token", "not-the-key"))
               for what, method, url, kw in (("ping", "GET", prod.inference_url + "/ping", {}),
                                             ("predict", "POST", prod.inference_url + f"/predictions/{MODEL}", body),
                                             ("list models", "GET", prod.management_url + "/models", {}))}
    result.check("requests without or with a wrong token refused (400)", set(refused.values()) == {400}, refused)
    result.check("the right inference key is accepted", _status("GET", prod.inference_url + "/ping", inference) == 200)
    register = _status("POST", prod.management_url + "/models", management, params={"url": f"{MODEL}_v1.0.mar"})
    result.check("register refused: model API off (405)", register == 405, register)
    result.check("metrics port answers without a token", _status("GET", prod.metrics_url + "/metrics") == 200)
    result.figures["production"] = {"refused": refused, "register": register, "max_request_size": limit}
    result["requests"] += len(refused) + 3
    rig.stop_production()


class _EvilServer:
    """A loopback HTTP server offering evil.mar (a real archive), counting how often it is fetched."""

    def __init__(self, payload: bytes):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/evil.mar"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def register_status(client: TorchServeClient, url: str, **params: Any) -> tuple[int, str]:
    """(200, "") when TorchServe registers `url`, else (its HTTP status, the start of its message)."""
    try:
        client.register(url, **params)
        return 200, ""
    except ApiError as exc:
        return exc.status, str(exc)[:200]


def check_allowed_urls(result: Result, rig: Rig) -> None:
    client = rig.client()
    with open(os.path.join(rig.store, f"{SLOW}_v1.0.mar"), "rb") as f:
        payload = f.read()  # a real archive (the 1-worker one, in case a check lets it through)
    evil = _EvilServer(payload)
    try:
        status, message = register_status(client, evil.url, model_name="evil", initial_workers=0)
    finally:
        evil.close()
    result.check("model API on: registering http://127.0.0.1:<port>/evil.mar refused, never fetched",
                 400 <= status < 500 and not evil.hits, f"{status} {message}; fetched {len(evil.hits)}x")
    outside = os.path.join(rig.root, "outside")
    os.makedirs(outside, exist_ok=True)
    with open(os.path.join(outside, "evil.mar"), "wb") as f:
        f.write(payload)
    status2, message2 = register_status(client, f"file://{outside}/evil.mar", model_name="evil", initial_workers=0)
    result.check("registering a file outside the model store refused", 400 <= status2 < 500, f"{status2} {message2}")
    status4, message4 = register_status(client, f"file://{os.path.abspath(rig.store)}/../outside/evil.mar",
                                        model_name="evil", initial_workers=0)
    result.check("registering <store>/../outside/evil.mar refused", 400 <= status4 < 500, f"{status4} {message4}")
    status5, message5 = register_status(client, f"file://{os.path.abspath(rig.store)}/%2e%2e/outside/evil.mar",
                                        model_name="evil", initial_workers=0)
    result.check("registering <store>/%2e%2e/outside/evil.mar refused", 400 <= status5 < 500, f"{status5} {message5}")
    status3, message3 = _allowed_control(client, rig.store, payload)
    result.check("control: an archive in the model store is accepted", status3 == 200, f"{status3} {message3}")
    result["requests"] += 4
    result.figures["allowed_urls"] = {"http": [status, message], "outside_store": [status2, message2],
                                      "store": status3}


def _allowed_control(client: TorchServeClient, store: str, payload: bytes) -> tuple[int, str]:
    """Register an archive placed directly in the model store, by its name (how tspack registers), then clean up."""
    path = os.path.join(os.path.abspath(store), "allowed-probe.mar")
    with open(path, "wb") as f:
        f.write(payload)
    status, message = register_status(client, "allowed-probe.mar", model_name="allowed-probe", initial_workers=0)
    if status == 200:
        client.unregister("allowed-probe")
    if os.path.exists(path):
        os.remove(path)
    return status, message


def archive_limits(store: str, max_request_size: int) -> list[dict]:
    """For every tspack manifest in every archive: the recorded SHA-256 matches the weights, limits are set."""
    found = []
    for name in sorted(os.listdir(store)):
        if not name.endswith(".mar"):
            continue
        with zipfile.ZipFile(os.path.join(store, name)) as archive:
            for member in archive.namelist():
                if not member.endswith("tspack-manifest.json"):
                    continue
                manifest = json.loads(archive.read(member))
                folder = member[: -len("tspack-manifest.json")]
                weights = archive.read(folder + manifest["runtime"]["file"])
                image = manifest.get("image") or {}
                found.append({"archive": name, "manifest": member, "format": manifest["runtime"]["format"],
                              "sha256_matches": _sha256(weights) == manifest["runtime"]["sha256"],
                              "max_body_bytes": manifest.get("max_body_bytes"),
                              "image_max_bytes": image.get("max_bytes"),
                              "limits_below_frontend_cap": 0 < manifest.get("max_body_bytes", 0) < max_request_size
                              and image.get("max_bytes", 1) < max_request_size})
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def scenario_security(rig: Rig, settings: Settings) -> dict:
    result = Result("security", "Security: token auth, model API, allowed_urls, size limits, weights",
                    "1 client, sequential")
    check_production(result, rig)
    check_allowed_urls(result, rig)
    limit = int(read_properties(rig.handle.config_path).get("max_request_size", "0"))
    archives = archive_limits(rig.store, limit)
    result.check("every archive records the SHA-256 of its weights (and it matches)",
                 archives and all(a["sha256_matches"] for a in archives), archives)
    result.check("every archive sets per-model limits below the frontend cap",
                 all(a["limits_below_frontend_cap"] for a in archives), archives)
    result.figures.update({"archives": archives, "integrity_refusal": "tests/integration/test_end_to_end.py::"
                           "test_worker_that_dies_at_start_fails_fast_with_its_error (a tampered model.pt: the "
                           "worker refuses to load with IntegrityError)",
                           "static_checks": "tests/unit/test_security.py"})
    return result.done()
