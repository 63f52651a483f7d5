"""The README's nginx rate-limit snippet: `nginx -t` accepts it, and a running nginx answers 429 over the limit.

The snippet is read from README.md itself, so the docs cannot drift from what is tested. Only its listen port
and upstream are rewritten to free loopback ports; the upstream is a stand-in HTTP server counting what reaches
it. nginx comes from Debian's `nginx` package (scripts/check_tools.sh installs it for root).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from archiver.operate.server import free_ports

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed: apt-get install nginx (or run "
                                "scripts/check_tools.sh as root)")
RATE, BURST = 20, 40  # what the README's snippet says; checked below


def readme_snippet() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```nginx\n(.*?)```", f.read(), re.S)
    assert len(blocks) == 1, "README.md should have exactly one ```nginx block"
    return blocks[0]


def _config(tmp_path, listen: int, upstream: int) -> str:
    snippet = readme_snippet()
    assert f"rate={RATE}r/s" in snippet and f"burst={BURST} nodelay" in snippet and "limit_req_status 429" in snippet
    assert "listen 80;" in snippet and "proxy_pass http://127.0.0.1:8080;" in snippet
    snippet = snippet.replace("listen 80;", f"listen 127.0.0.1:{listen};")
    snippet = snippet.replace("proxy_pass http://127.0.0.1:8080;", f"proxy_pass http://127.0.0.1:{upstream};")
    (tmp_path / "tspack.conf").write_text(snippet)
    # The frame a Debian nginx.conf gives a conf.d file: the snippet sits in the http block.
    main = (f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\n"
            + ("user root;\n" if os.geteuid() == 0 else "")  # workers read nothing outside tmp_path (0700 here)
            + "events { worker_connections 64; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n"
            f"  proxy_temp_path {tmp_path}/proxy;\n  include {tmp_path}/tspack.conf;\n}}\n")
    path = tmp_path / "nginx.conf"
    path.write_text(main)
    return str(path)


def _nginx(*args: str, prefix: str) -> list[str]:
    return [NGINX, "-p", prefix, "-e", os.path.join(prefix, "error.log"), *args]


def test_nginx_accepts_the_readme_snippet(tmp_path):
    listen, upstream = free_ports(2)
    config = _config(tmp_path, listen, upstream)
    checked = subprocess.run(_nginx("-t", "-c", config, prefix=str(tmp_path)), capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "syntax is ok" in checked.stderr and "test is successful" in checked.stderr


class _Upstream(BaseHTTPRequestHandler):
    served = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with _Upstream.lock:
            _Upstream.served += 1
        body = b'{"model": "digits", "predictions": []}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def _post(url: str) -> int:
    request = urllib.request.Request(url, data=b'{"data": [0]}', headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_nginx_answers_429_over_the_limit(tmp_path):
    listen, upstream_port = free_ports(2)
    config = _config(tmp_path, listen, upstream_port)
    _Upstream.served = 0
    upstream = ThreadingHTTPServer(("127.0.0.1", upstream_port), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    nginx = subprocess.Popen(_nginx("-c", config, "-g", "daemon off;", prefix=str(tmp_path)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{listen}/predictions/digits"
    try:
        deadline = time.monotonic() + 20
        while True:  # poll until nginx listens; a fixed sleep would be too short on a loaded machine or too long
            try:
                first = _post(url)
                break
            except (urllib.error.URLError, ConnectionError):
                assert nginx.poll() is None and time.monotonic() < deadline, nginx.stderr.read().decode()
                time.sleep(0.05)
        started = time.monotonic()
        statuses = [first] + [_post(url) for _ in range(3 * BURST)]
        elapsed = time.monotonic() - started
    finally:
        nginx.terminate()
        nginx.wait(timeout=20)
        upstream.shutdown()
        upstream.server_close()
    counts = {code: statuses.count(code) for code in set(statuses)}
    assert set(counts) == {200, 429}, counts
    # the bucket: the first request, the burst, and what the rate refilled while the others were sent
    assert counts[200] <= 1 + BURST + RATE * elapsed + 1, (counts, elapsed)
    assert counts[200] >= BURST, counts
    assert _Upstream.served == counts[200]  # a 429 never reaches TorchServe
