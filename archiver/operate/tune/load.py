"""Load for `tspack tune`: wrk POSTing one fixed body from N connections, and the body itself.

The idea of benchmarks/loadgen.py (wrk with a Lua script whose `done` prints the numbers as one JSON line), kept
small and separate: the library does not import the benchmarks.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

import numpy as np

from archiver.errors import TuneError

LUA = r"""
wrk.method = "POST"
local f = assert(io.open(os.getenv("TUNE_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("TUNE_CONTENT_TYPE")
local auth = os.getenv("TUNE_AUTHORIZATION")
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('TUNE_JSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p99_us":%d}\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Body:
    """What every request of a tuning run sends."""

    path: str
    content_type: str


@dataclass(frozen=True)
class Level:
    """One concurrency's numbers. requests_per_s counts 2xx answers only; the rest are `errors`."""

    concurrency: int
    requests_per_s: float
    p50_ms: Optional[float]
    p99_ms: Optional[float]
    errors: int


def run(url: str, body: Body, concurrency: int, duration_s: float, authorization: str, folder: str) -> Level:
    """POST `body` to `url` from `concurrency` connections for `duration_s` seconds (one wrk thread).

    Raises:
        TuneError: wrk is not installed, or printed no numbers.
    """
    wrk = shutil.which("wrk")
    if wrk is None:
        raise TuneError("wrk is not installed (`apt-get install -y wrk`); tspack tune measures with it")
    script = os.path.join(folder, "tune.lua")
    if not os.path.exists(script):
        with open(script, "w", encoding="utf-8") as f:
            f.write(LUA)
    env = dict(os.environ, TUNE_BODY=os.path.abspath(body.path), TUNE_CONTENT_TYPE=body.content_type,
               TUNE_AUTHORIZATION=authorization)
    seconds = max(1, round(duration_s))
    done = subprocess.run([wrk, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout=30s", "-s", script, url],
                          env=env, capture_output=True, text=True, timeout=seconds + 60)
    match = re.search(r"^TUNE_JSON (\{.*\})$", done.stdout, re.MULTILINE)
    if not match:
        raise TuneError(f"wrk printed no numbers: {(done.stdout + done.stderr).strip()[-400:]}")
    raw = json.loads(match.group(1))
    ok = raw["requests"] - raw["non2xx"]
    p50, p99 = ((raw[k] / 1000.0 if raw["requests"] else None) for k in ("p50_us", "p99_us"))
    return Level(concurrency=concurrency, requests_per_s=ok / (raw["duration_us"] / 1e6), p50_ms=p50, p99_ms=p99,
                 errors=raw["errors"] + raw["non2xx"])


def request_body(manifest, folder: str, samples=None) -> Body:
    """One typical request for the archive's front end (`samples`: the spec's SamplesSpec): a tensor model gets
    the first sample of the samples file, else zeros (free axes of length 8); a text model the first sample text;
    an image model a gray image of its input size."""
    path = os.path.join(folder, "body")
    frontend = manifest.frontend
    if frontend == "text":
        texts = getattr(samples, "texts", ()) or ("a short example sentence",)
        data, content_type = json.dumps({"text": texts[0]}), "application/json"
    elif frontend == "image":
        data, content_type = _image(manifest.image), "image/png"
    else:
        data, content_type = json.dumps(_tensors(manifest, samples)), "application/json"
    with open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Body(path, content_type)


def _tensors(manifest, samples) -> dict:
    file = getattr(samples, "file", None)
    stored = np.load(file) if file and os.path.isfile(file) else None
    body = {}
    for spec in manifest.inputs:
        shape = tuple(8 if d == -1 else d for d in spec.shape)
        value = np.zeros(shape, dtype=np.dtype(spec.dtype))
        if stored is not None:
            for key in (spec.name, samples.inputs_key):
                if key in stored.files and tuple(stored[key].shape[1:]) == shape:
                    value = stored[key][0].astype(spec.dtype)
                    break
        body[spec.name] = value[None].tolist()
    return {"data": body[manifest.inputs[0].name]} if len(body) == 1 else body


def _image(image) -> bytes:
    from PIL import Image

    size = (image.width, image.height) if image else (224, 224)
    buffer = io.BytesIO()
    Image.new(image.mode if image else "RGB", size, color=128).save(buffer, "PNG")
    return buffer.getvalue()
