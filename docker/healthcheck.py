"""Health check of the tspack serving image: Docker's HEALTHCHECK and the Kubernetes readiness probe.

Default check: `GET /ping` on TorchServe's inference API. With token authorization on (the production
profile), /ping needs the inference key, and a missing or wrong key gets HTTP 400, not 401. TorchServe
writes the keys into `key_file.json` in its working folder (the state folder, /home/model-server/state in
the image); the check reads the inference key there on every run. Inference keys expire after
`token_expiration_min` (60 by default): when TorchServe refuses the key, the check renews it once through the
management API's `/token?type=inference` with the API key (which does not expire), exactly as the tspack
client does, and pings again. It never renews a key that still works, so a key a client holds stays valid
until it expires. Healthy means HTTP 200 with status "Healthy": every model has its ready workers.

When the config names the tspack OIP gateway (`tspack_oip_address`, which the entrypoint then starts beside
TorchServe), healthy also needs the gateway's `GET /v2/health/live` (no token) to answer 200: OIP clients reach
the models only through it, and `tspack serve status` counts a server without its gateway as unhealthy too.

`--liveness`: `GET /metrics` on the metrics port, which takes no token and changes nothing; it proves the
frontend is up, not that models are loaded. (The Kubernetes manifests use an httpGet probe for this.)

Ports and token mode come from the server's config.properties (bind 0.0.0.0 is reached on 127.0.0.1).
Exit status 0 = healthy, 1 = not, with one line saying why. Standard library only: it runs every few
seconds, so it imports nothing heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

HOME = os.environ.get("TSPACK_HOME", "/home/model-server")
DEFAULT_CONFIG = os.environ.get("TSPACK_TS_CONFIG", os.path.join(HOME, "config", "config.properties"))
DEFAULT_KEY_FILE = os.environ.get("TSPACK_KEY_FILE", os.path.join(
    os.environ.get("TSPACK_STATE_DIR", os.path.join(HOME, "state")), "key_file.json"))
TOKEN_FAILED = "Token Authorization failed"
# archiver.deploy.properties.OIP_ADDRESS_KEY, spelled out: this script imports nothing of tspack.
OIP_ADDRESS_KEY = "tspack_oip_address"
DEFAULTS = {"inference": "http://127.0.0.1:8080", "management": "http://127.0.0.1:8081",
            "metrics": "http://127.0.0.1:8082"}


def read_properties(path: str) -> dict[str, str]:
    props: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                props[key.strip()] = value.strip()
    return props


def local_url(address: str) -> str:
    """An address from config.properties as reachable from inside the container (0.0.0.0 -> 127.0.0.1)."""
    parts = urllib.parse.urlsplit(address)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme or 'http'}://{host}{port}"


def get(url: str, token: Optional[str], timeout: float) -> tuple[int, str]:
    request = urllib.request.Request(url, method="GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def read_key(key_file: str, kind: str) -> Optional[str]:
    with open(key_file, encoding="utf-8") as f:
        return json.load(f).get(kind, {}).get("key")


def ping(urls: dict[str, str], key_file: Optional[str], timeout: float) -> tuple[bool, str]:
    """/ping with the inference key; renews an expired key once with the API key."""
    token = read_key(key_file, "inference") if key_file else None
    status, body = get(urls["inference"] + "/ping", token, timeout)
    if key_file and status == 400 and TOKEN_FAILED in body:
        api_key = read_key(key_file, "API")
        renew_url = urls["management"] + "/token?" + urllib.parse.urlencode({"type": "inference"})
        renew_status, renew_body = get(renew_url, api_key, timeout)
        if renew_status != 200:
            return False, f"inference key refused and renewing it failed: HTTP {renew_status} {renew_body.strip()}"
        status, body = get(urls["inference"] + "/ping", read_key(key_file, "inference"), timeout)
    try:
        health = json.loads(body).get("status")
    except (ValueError, AttributeError):
        health = None
    if status == 200 and health == "Healthy":
        return True, "Healthy"
    return False, f"/ping answered HTTP {status}: {body.strip()[:200]}"


def metrics(urls: dict[str, str], timeout: float) -> tuple[bool, str]:
    status, _ = get(urls["metrics"] + "/metrics", None, timeout)
    return status == 200, f"/metrics answered HTTP {status}"


def gateway_live(url: str, timeout: float) -> tuple[bool, str]:
    """The OIP gateway's liveness probe, which takes no token."""
    try:
        status, _ = get(url + "/v2/health/live", None, timeout)
    except OSError as exc:  # refused: the gateway is not running
        return False, f"OIP gateway {url}: {exc}"
    return status == 200, f"OIP gateway {url}/v2/health/live answered HTTP {status}"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="TorchServe's config.properties")
    parser.add_argument("--key-file", default=DEFAULT_KEY_FILE, help="TorchServe's key_file.json")
    parser.add_argument("--liveness", action="store_true", help="only check the token-free metrics port")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request")
    args = parser.parse_args(argv)
    try:
        props = read_properties(args.config)
        urls = {kind: local_url(props.get(f"{kind}_address", default)) for kind, default in DEFAULTS.items()}
        if args.liveness:
            healthy, reason = metrics(urls, args.timeout)
        else:
            token_auth = props.get("disable_token_authorization", "false").lower() != "true"
            healthy, reason = ping(urls, args.key_file if token_auth else None, args.timeout)
            if healthy and props.get(OIP_ADDRESS_KEY):
                live, said = gateway_live(local_url(props[OIP_ADDRESS_KEY]), args.timeout)
                healthy, reason = live, f"{reason}; {said}"
    except (OSError, ValueError) as exc:  # connection refused, timeout, no key file yet, bad JSON
        healthy, reason = False, f"{type(exc).__name__}: {exc}"
    print(("healthy: " if healthy else "unhealthy: ") + reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
