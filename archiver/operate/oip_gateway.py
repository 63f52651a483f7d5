"""The tspack OIP gateway: the Open Inference Protocol v2 routes TorchServe 0.12 lacks, on a port of its own.

TorchServe 0.12 answers 404 to `/v2/models/NAME` and `/v2/models/NAME/ready`, 501 to a versioned infer, and wants
the inference token even on its probes, so real OIP clients (tritonclient, KServe) give up before they infer.
The gateway (config.properties' `tspack_oip_address`, `tspack config --oip-port`) serves:
- probes without a token, like Triton's and KServe's: `/v2/health/live`, `/v2/health/ready` (TorchServe's
  management API answers and every model's default version has a READY worker) and
  `/v2/models/NAME[/versions/V]/ready`; they answer yes or no and reveal nothing else;
- metadata to the inference token: `/v2` and `/v2/models/NAME[/versions/V]`, from the archive's manifest
  (archiver/operate/oip_metadata.py);
- infer, forwarded to `/predictions/NAME[/V]` with the client's body and headers (its token included: TorchServe
  checks it) over kept-alive connections. TorchServe's answer comes back as it is, except that TorchServe's own
  error bodies (unknown model, bad token, full queue) are rephrased as OIP `{"error": ...}`.

`tspack serve start` (server.start) binds the gateway's socket before TorchServe starts and hands it to this
process (archiver/operate/oip_process.py); `serve stop` ends it, and it exits by itself within half a second of
TorchServe's launcher.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hmac
import http.client
import json
import os
import re
import socket
import sys
import threading
import zipfile
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

from archiver.errors import ApiError
from archiver.operate.client import TOKEN_FAILED, TorchServeClient
from archiver.operate.oip_metadata import ManifestCache, model_metadata, server_metadata
from archiver.operate.oip_process import MODULE, WATCH_S, watch
from handlers.errors import (
    InvalidInput,
    MethodNotAllowed,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
    RouteNotFound,
    TokenRefused,
    TspackError,
    UpstreamUnavailable,
    error_response,
)

# Above any response timeout TorchServe applies (its default is 120 s), so TorchServe is the one that gives up.
UPSTREAM_TIMEOUT_S = 600.0
IDLE_CLIENT_S = 600.0
# Headers for one connection, not for the request (plus Host and Content-Length, which the hop sets anew, and
# Expect, which the gateway has already answered).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "host", "content-length", "expect"})
TOKEN_MESSAGE = (f"{TOKEN_FAILED}: send the inference key of key_file.json as `Authorization: Bearer <key>` "
                 "(probes need none)")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, document: object, status: int = 200) -> Reply:
        return cls(status, json.dumps(document).encode("utf-8"), [("Content-Type", "application/json")])

    @classmethod
    def error(cls, exc: BaseException) -> Reply:
        status, _, body = error_response(exc)
        return cls.json(body, status)


@dataclass(frozen=True)
class Call:
    """One request, as a route sees it."""

    model: Optional[str]
    version: Optional[str]
    headers: Message
    body: bytes


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    action: str        # the Gateway method that answers
    token: bool        # the gateway checks the inference token (infer's is checked by TorchServe)


_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES = tuple(Route(method, re.compile(pattern), action, token) for method, pattern, action, token in (
    ("GET", r"/v2/health/live", "live", False),
    ("GET", r"/v2/health/ready", "server_ready", False),
    ("GET", _MODEL + "/ready", "model_ready", False),
    ("GET", r"/v2", "server_metadata", True),
    ("GET", _MODEL, "model_metadata", True),
    ("POST", _MODEL + "/infer", "infer", False),
))


def route(method: str, path: str) -> tuple[Route, dict]:
    """The route of `method path` and its parameters (model, version).

    Raises: RouteNotFound (no such path), MethodNotAllowed (the path exists for another method).
    """
    allowed = []
    for candidate in ROUTES:
        match = candidate.pattern.fullmatch(path)
        if match:
            if candidate.method == method:
                return candidate, match.groupdict()
            allowed.append(candidate.method)
    if allowed:
        raise MethodNotAllowed(f"{method} {path}: this route takes {' or '.join(allowed)}")
    raise RouteNotFound(f"no OIP route {method} {path}; routes: /v2, /v2/health/live, /v2/health/ready, "
                        "/v2/models/NAME[/versions/V][/ready], POST /v2/models/NAME[/versions/V]/infer")


def oip_error(status: int, headers: list[tuple[str, str]], body: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """TorchServe's own error answers (`{"code", "type", "message"}`, or a bare status) as OIP `{"error": ...}`;
    the handlers' errors already carry `error` and pass unchanged."""
    try:
        document = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError):
        document = {"message": body.decode("utf-8", "replace").strip()}
    if isinstance(document, dict) and "error" in document:
        return headers, body
    document = document if isinstance(document, dict) else {}
    message = str(document.get("message") or http.client.responses.get(status, "error"))
    kind = str(document.get("type") or "torchserve_error")
    kept = [(k, v) for k, v in headers if k.lower() != "content-type"]
    rephrased = json.dumps({"error": message, "type": kind, "status": status}).encode("utf-8")
    return kept + [("Content-Type", "application/json")], rephrased


class Tokens:
    """Checks `Authorization` against key_file.json's current inference key, as TorchServe does (the file is
    read again whenever it changes: keys are renewed)."""

    def __init__(self, key_file: Optional[str]):
        self.key_file = key_file
        self._stamp: Optional[tuple] = None
        self._key: Optional[str] = None
        self._expires: Optional[_dt.datetime] = None
        self._lock = threading.Lock()

    def check(self, authorization: Optional[str]) -> None:
        if not self.key_file:
            return
        key, expires = self._current()
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not key or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise TokenRefused(TOKEN_MESSAGE)
        if expires and expires < _dt.datetime.now(_dt.timezone.utc):
            raise TokenRefused(f"{TOKEN_FAILED}: the inference key expired; read the renewed one from key_file.json")

    def _current(self) -> tuple[Optional[str], Optional[_dt.datetime]]:
        try:
            stat = os.stat(self.key_file)
        except OSError:
            return None, None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    with open(self.key_file, encoding="utf-8") as f:
                        entry = json.load(f).get("inference", {})
                except (OSError, ValueError):  # TorchServe is rewriting it: refuse this once, read it next time
                    return None, None
                expires = entry.get("expiration time")
                self._key = entry.get("key")
                self._expires = _dt.datetime.fromisoformat(expires.replace("Z", "+00:00")) if expires else None
                self._stamp = stamp
            return self._key, self._expires


class Upstream:
    """TorchServe's inference port over one kept-alive connection per gateway thread."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self.connection_class(self.host, self.port, timeout=UPSTREAM_TIMEOUT_S)
            self._local.connection = connection
        return connection

    def forward(self, method: str, path: str, headers: Message, body: bytes) -> tuple[int, list, bytes]:
        """Send the request on; returns TorchServe's status, headers (hop-by-hop ones dropped) and body.

        Raises: UpstreamUnavailable when TorchServe does not answer.
        """
        sent = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in range(2):
            connection = self._connection()
            reused = connection.sock is not None
            try:
                connection.request(method, path, body=body, headers=sent)
                response = connection.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError) as exc:
                connection.close()
                # A kept-alive connection TorchServe has closed fails at once; a fresh one then carries it.
                if reused and attempt == 0 and isinstance(exc, (ConnectionError, http.client.RemoteDisconnected)):
                    continue
                raise UpstreamUnavailable(f"TorchServe at {self.url} did not answer: {exc}") from exc
            if response.will_close:
                connection.close()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
            return response.status, kept, data
        raise AssertionError("unreachable")


class Gateway:
    """The routes' answers. One instance serves every thread; TorchServe clients are per thread."""

    def __init__(self, inference_url: str, management_url: str, model_store: str, key_file: Optional[str],
                 max_body_bytes: int):
        self.upstream = Upstream(inference_url)
        self.inference_url, self.management_url = inference_url, management_url
        self.model_store = model_store
        self.key_file = key_file
        self.max_body_bytes = max_body_bytes
        self.tokens = Tokens(key_file)
        self.manifests = ManifestCache()
        self._local = threading.local()

    def handle(self, method: str, target: str, headers: Message, body: bytes) -> Reply:
        chosen, params = route(method, urlsplit(target).path)
        if chosen.token:
            self.tokens.check(headers.get("Authorization"))
        return getattr(self, chosen.action)(Call(params.get("model"), params.get("version"), headers, body))

    def client(self) -> TorchServeClient:
        """This thread's management client (it renews the management key when it is about to expire)."""
        client = getattr(self._local, "client", None)
        if client is None:
            client = TorchServeClient(self.inference_url, self.management_url, key_file=self.key_file, timeout=30)
            self._local.client = client
        return client

    # --- probes -----------------------------------------------------------------------------------------

    def live(self, call: Call) -> Reply:
        return Reply(200)

    def server_ready(self, call: Call) -> Reply:
        try:
            models = [m["modelName"] for m in self.client().models()]
            waiting = [m for m in models if not self._ready(m, None)]
        except (ApiError, OSError, UpstreamUnavailable, ModelNotFound) as exc:
            raise NotReady(f"TorchServe's management API did not answer: {exc}") from exc
        if waiting:
            raise NotReady(f"no READY worker yet for: {', '.join(waiting)}")
        return Reply(200)

    def model_ready(self, call: Call) -> Reply:
        if not self._ready(call.model, call.version):
            raise NotReady(f"{_named(call.model, call.version)} has no READY worker")
        return Reply(200)

    def _ready(self, model: str, version: Optional[str]) -> bool:
        return any(w.get("status") == "READY" for d in self._describe(model, version) for w in d.get("workers", []))

    # --- metadata ---------------------------------------------------------------------------------------

    def server_metadata(self, call: Call) -> Reply:
        return Reply.json(server_metadata())

    def model_metadata(self, call: Call) -> Reply:
        described = self._describe(call.model, call.version)[0]
        versions = [call.version] if call.version else [d["modelVersion"] for d in self._describe(call.model, "all")]
        try:
            manifest, router = self.manifests.get(self._archive(described.get("modelUrl", "")))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):  # registered, but not from a tspack archive
            return Reply.json({"name": call.model, "versions": versions, "platform": "torchserve",
                               "inputs": [], "outputs": []})
        return Reply.json(model_metadata(call.model, versions, manifest, router))

    def _archive(self, url: str) -> str:
        path = url.removeprefix("file://")
        return path if os.path.isabs(path) else os.path.join(self.model_store, path)

    def _describe(self, model: str, version: Optional[str]) -> list[dict]:
        try:
            return self.client().describe(model, version)
        except ApiError as exc:
            if exc.status == 404:
                raise ModelNotFound(f"{_named(model, version)} is not registered: {exc}") from exc
            raise UpstreamUnavailable(f"TorchServe's management API refused: {exc}") from exc
        except OSError as exc:  # requests' errors, and key_file.json not written yet while TorchServe starts
            raise UpstreamUnavailable(f"TorchServe's management API did not answer: {exc}") from exc

    # --- infer ------------------------------------------------------------------------------------------

    def infer(self, call: Call) -> Reply:
        # /predictions/NAME/V takes the same OIP bodies as /v2/models/NAME/infer, and is the one versioned route
        # TorchServe 0.12 has (its /v2/models/NAME/versions/V/infer answers 501).
        path = f"/predictions/{call.model}" + (f"/{call.version}" if call.version else "")
        status, headers, body = self.upstream.forward("POST", path, call.headers, call.body)
        if status >= 400:
            headers, body = oip_error(status, headers, body)
        return Reply(status, body, headers)


def _named(model: str, version: Optional[str]) -> str:
    return f"model '{model}'" + (f" version '{version}'" if version else "")


# --- HTTP ----------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: OIP clients send many requests on one connection
    server_version = "tspack-oip-gateway"
    disable_nagle_algorithm = True
    wbufsize = -1  # the status line, headers and body leave in one write (handle_one_request flushes)
    timeout = IDLE_CLIENT_S

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def _serve(self, method: str) -> None:
        try:
            body = self._body()
            reply = self.server.gateway.handle(method, self.path, self.headers, body)
        except Exception as exc:  # every failure is an OIP error answer, never a dropped connection
            if not isinstance(exc, TspackError):
                self.log_error("%s %s failed: %r", method, self.path, exc)
            reply = Reply.error(exc)
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise InvalidInput(f"Content-Length {self.headers.get('Content-Length')!r} is not a number") from None
        self._check_size(length)
        return self.rfile.read(length) if length > 0 else b""

    def _chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise InvalidInput("malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(parts)
            total += size
            self._check_size(total)
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _check_size(self, length: int) -> None:
        if length > self.server.gateway.max_body_bytes:
            self.close_connection = True  # the body stays unread, so this connection cannot carry another request
            raise PayloadTooLarge(f"request body of {length} bytes exceeds max_request_size "
                                  f"({self.server.gateway.max_body_bytes} bytes)")

    def log_request(self, code: object = "-", size: object = "-") -> None:
        pass  # one line per request would cost more than the forward itself


class GatewayServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, listening: socket.socket, gateway: Gateway):
        super().__init__(listening.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listening
        self.server_name, self.server_port = str(listening.getsockname()[0]), listening.getsockname()[1]
        self.gateway = gateway


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE, description="The tspack OIP gateway (started by `tspack serve "
                                     "start`, next to TorchServe).")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket, bound by the caller")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--inference-url", required=True)
    parser.add_argument("--management-url", required=True)
    parser.add_argument("--model-store", required=True)
    parser.add_argument("--key-file", help="TorchServe's key_file.json (absent: token authorization is off)")
    parser.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    parser.add_argument("--server-pid", type=int, required=True, help="TorchServe's launcher: exit when it does")
    args = parser.parse_args(argv)
    gateway = Gateway(args.inference_url, args.management_url, args.model_store, args.key_file, args.max_body_bytes)
    server = GatewayServer(socket.socket(fileno=args.fd), gateway)
    threading.Thread(target=watch, args=(args.server_pid, server.shutdown), daemon=True).start()
    print(f"tspack OIP gateway (pid {os.getpid()}) on {server.server_name}:{server.server_port} for "
          f"{args.inference_url}", flush=True)
    try:
        server.serve_forever(poll_interval=WATCH_S)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
