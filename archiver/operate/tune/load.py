"""Load for `tspack tune`: wrk POSTing one fixed body from N connections, and the body itself (one builder per
front end, in EXAMPLE_REQUESTS).

wrk runs through the pack's one load generator, archiver/operate/load.py, the same as the benchmarks use.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from archiver.errors import TuneError
from archiver.operate import load as wrk_load
from archiver.spec import SamplesSpec
from handlers.registry import FRONTENDS
from handlers.spec import ArtifactManifest


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


def request_body(manifest: ArtifactManifest, folder: str, samples: Optional[SamplesSpec] = None) -> Body:
    """One typical request for the archive's front end, built by its EXAMPLE_REQUESTS entry and written to
    `folder`/body (`samples`: the spec's SamplesSpec)."""
    data, content_type = EXAMPLE_REQUESTS[manifest.frontend](manifest, samples)
    path = os.path.join(folder, "body")
    with open(path, "wb") as f:
        f.write(data)
    return Body(path, content_type)


def tensor_request(manifest: ArtifactManifest, samples: Optional[SamplesSpec]) -> tuple[bytes, str]:
    """JSON of the samples file's first row for every input (zeros, free axes of length 8, when it has none);
    a one-input model as `{"data": ...}`, several by input name."""
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
    document = {"data": body[manifest.inputs[0].name]} if len(body) == 1 else body
    return json.dumps(document).encode("utf-8"), "application/json"


def image_request(manifest: ArtifactManifest, samples: Optional[SamplesSpec]) -> tuple[bytes, str]:
    """A mid-gray PNG of the declared size and mode (224 x 224 RGB when the manifest declares none)."""
    from PIL import Image

    image = manifest.image
    size = (image.width, image.height) if image else (224, 224)
    buffer = io.BytesIO()
    Image.new(image.mode if image else "RGB", size, color=128).save(buffer, "PNG")
    return buffer.getvalue(), "image/png"


def text_request(manifest: ArtifactManifest, samples: Optional[SamplesSpec]) -> tuple[bytes, str]:
    """`{"text": ...}` with the spec's first sample text, or a short stock sentence."""
    texts = getattr(samples, "texts", ()) or ("a short example sentence",)
    return json.dumps({"text": texts[0]}).encode("utf-8"), "application/json"


# The load generator's body per front end, keyed like handlers/registry.py's FRONTENDS. It is a table of its own
# rather than a field there because handlers/ is copied into every .mar and must not carry load-generator code.
ExampleRequest = Callable[[ArtifactManifest, Optional[SamplesSpec]], tuple[bytes, str]]
EXAMPLE_REQUESTS: dict[str, ExampleRequest] = {
    "tensor": tensor_request,
    "image": image_request,
    "text": text_request,
}
if set(EXAMPLE_REQUESTS) != set(FRONTENDS):  # pragma: no cover - a registration mistake, caught by any import
    raise RuntimeError(f"front ends without an example request, or example requests without a front end: "
                       f"{sorted(set(EXAMPLE_REQUESTS) ^ set(FRONTENDS))}; add them to EXAMPLE_REQUESTS")
