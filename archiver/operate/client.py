"""A client for TorchServe's inference, management and metrics APIs, token-aware.

TorchServe writes `key_file.json` (management, inference and API keys) into its working folder;
management and inference keys expire after `token_expiration_min`. The client reads the file on
each call, renews a key through the token API shortly before it expires, and retries once when the
server says the token failed (TorchServe answers 400, not 401).
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
from typing import Any, Optional

import requests

from archiver.errors import ApiError

TOKEN_FAILED = "Token Authorization failed"
RENEW_BEFORE_S = 120


class KeyFile:
    """Reads TorchServe's key_file.json and renews expiring keys with the API key."""

    def __init__(self, path: Optional[str], management_url: str, session: requests.Session):
        self.path = path
        self.management_url = management_url
        self.session = session
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def _read(self) -> dict:
        with open(self.path, encoding="utf-8") as f:
            return json.load(f)

    def key(self, kind: str) -> Optional[str]:
        """The current key of `kind` ("inference" or "management"), renewed when about to expire."""
        if not self.path:
            return None
        data = self._read()
        entry = data.get(kind, {})
        expires = entry.get("expiration time")
        if expires and _seconds_until(expires) < RENEW_BEFORE_S:
            self.renew(kind)
            entry = self._read().get(kind, {})
        return entry.get("key")

    def renew(self, kind: str) -> None:
        with self._lock:
            api_key = self._read().get("API", {}).get("key")
            response = self.session.get(f"{self.management_url}/token", params={"type": kind},
                                        headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            if response.status_code != 200:
                raise ApiError(response.status_code, f"renewing the {kind} key failed: {response.text.strip()}")


def _seconds_until(timestamp: str) -> float:
    when = _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (when - _dt.datetime.now(_dt.timezone.utc)).total_seconds()


class TorchServeClient:
    """Calls one TorchServe. `key_file` is None when token authorization is off."""

    def __init__(self, inference_url: str, management_url: str, metrics_url: Optional[str] = None,
                 key_file: Optional[str] = None, timeout: float = 60.0):
        self.inference_url = inference_url.rstrip("/")
        self.management_url = management_url.rstrip("/")
        self.metrics_url = metrics_url.rstrip("/") if metrics_url else None
        self.session = requests.Session()
        self.keys = KeyFile(key_file, self.management_url, self.session)
        self.timeout = timeout

    # --- plumbing ---------------------------------------------------------------------------------------

    def request(self, api: str, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send with the right key; renew and retry once if the server refuses the token."""
        base = self.inference_url if api == "inference" else self.management_url
        kwargs.setdefault("timeout", self.timeout)
        headers = dict(kwargs.pop("headers", None) or {})
        for attempt in range(2):
            key = self.keys.key(api) if self.keys.enabled else None
            if key:
                headers["Authorization"] = f"Bearer {key}"
            response = self.session.request(method, base + path, headers=headers, **kwargs)
            if response.status_code == 400 and TOKEN_FAILED in response.text and self.keys.enabled and attempt == 0:
                self.keys.renew(api)
                continue
            return response
        return response

    def _json(self, api: str, method: str, path: str, ok: tuple = (200,), **kwargs: Any) -> Any:
        response = self.request(api, method, path, **kwargs)
        if response.status_code not in ok:
            raise ApiError(response.status_code, _message(response))
        try:
            return response.json()
        except ValueError:
            return response.text

    # --- inference --------------------------------------------------------------------------------------

    def ping(self) -> dict:
        return self._json("inference", "GET", "/ping")

    def predict(self, model: str, body: Any = None, version: Optional[str] = None, data: Optional[bytes] = None,
                content_type: str = "application/json", headers: Optional[dict] = None,
                files: Optional[dict] = None) -> requests.Response:
        """POST a prediction; returns the raw response (callers check status and JSON)."""
        path = f"/predictions/{model}" + (f"/{version}" if version else "")
        all_headers = dict(headers or {})
        if files is None:
            all_headers.setdefault("Content-Type", content_type)
            if data is None:
                data = json.dumps(body).encode("utf-8")
        return self.request("inference", "POST", path, data=data, files=files, headers=all_headers)

    def workflow_predict(self, workflow: str, body: Any = None, data: Optional[bytes] = None,
                         headers: Optional[dict] = None) -> requests.Response:
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        payload = data if data is not None else json.dumps(body).encode("utf-8")
        return self.request("inference", "POST", f"/wfpredict/{workflow}", data=payload, headers=all_headers)

    # --- management -------------------------------------------------------------------------------------

    def register(self, url: str, model_name: Optional[str] = None, initial_workers: int = 1,
                 synchronous: bool = True, **params: Any) -> dict:
        query = {"url": url, "initial_workers": initial_workers, "synchronous": str(synchronous).lower()}
        if model_name:
            query["model_name"] = model_name
        query.update({k: v for k, v in params.items() if v is not None})
        return self._json("management", "POST", "/models", ok=(200, 202), params=query, timeout=max(self.timeout, 300))

    def set_default(self, model: str, version: str) -> dict:
        return self._json("management", "PUT", f"/models/{model}/{version}/set-default")

    def unregister(self, model: str, version: Optional[str] = None) -> dict:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        return self._json("management", "DELETE", path, timeout=max(self.timeout, 180))

    def scale(self, model: str, version: Optional[str] = None, min_worker: int = 1,
              max_worker: Optional[int] = None, synchronous: bool = True) -> Any:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        params = {"min_worker": min_worker, "max_worker": max_worker if max_worker is not None else min_worker,
                  "synchronous": str(synchronous).lower()}
        return self._json("management", "PUT", path, ok=(200, 202), params=params, timeout=max(self.timeout, 300))

    def models(self) -> list[dict]:
        return self._json("management", "GET", "/models", params={"limit": 1000}).get("models", [])

    def versions(self, model: str) -> list[dict]:
        """Every registered version of `model`, with workers and the default flag."""
        return self._json("management", "GET", f"/models/{model}/all")

    def describe(self, model: str, version: Optional[str] = None, customized: bool = False) -> list[dict]:
        path = f"/models/{model}" + (f"/{version}" if version else "")
        params = {"customized": "true"} if customized else None
        return self._json("management", "GET", path, params=params)

    def register_workflow(self, url: str, workflow_name: Optional[str] = None) -> dict:
        params = {"url": url}
        if workflow_name:
            params["workflow_name"] = workflow_name
        return self._json("management", "POST", "/workflows", params=params, timeout=max(self.timeout, 300))

    def unregister_workflow(self, name: str) -> dict:
        return self._json("management", "DELETE", f"/workflows/{name}")

    # --- metrics ----------------------------------------------------------------------------------------

    def metrics(self) -> str:
        """The Prometheus text of the metrics port (which takes no token)."""
        if not self.metrics_url:
            raise ApiError(0, "no metrics address configured")
        response = self.session.get(self.metrics_url + "/metrics", timeout=self.timeout)
        if response.status_code != 200:
            raise ApiError(response.status_code, _message(response))
        return response.text


def _message(response: requests.Response) -> str:
    try:
        body = response.json()
        if isinstance(body, dict):
            return str(body.get("message") or body.get("error") or body)
    except ValueError:
        pass
    return response.text.strip()[:500] or response.reason
