"""Load for `tspack tune`: wrk POSTing one fixed body from N connections, and the body itself.

wrk runs through the pack's one load generator, archiver/operate/load.py, the same as the benchmarks use.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from archiver.errors import TuneError
from archiver.operate import load as wrk_load


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


def run(url: str, body: Body, concurrency: int, duration_s: float, authorization: str) -> Level:
    """POST `body` to `url` from `concurrency` connections for `duration_s` seconds, with the pack's one load
    generator (archiver/operate/load.py).

    Raises:
        TuneError: wrk is not installed, or printed no numbers.
    """
    try:
        result = wrk_load.run(url, body.path, body.content_type, concurrency, duration_s, authorization)
    except wrk_load.LoadGenError as exc:
        raise TuneError(f"{exc}; tspack tune measures with wrk") from exc
    return Level(concurrency=concurrency, requests_per_s=result.requests_per_s, p50_ms=result.p50_ms,
                 p99_ms=result.p99_ms, errors=result.errors)


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
