"""Image front end: JPEG/PNG/WebP bytes, base64 or multipart -> a normalised CHW float array.

Preprocessing is declared at build time (`ImageSpec`) and done with Pillow and numpy alone. Size limits
are checked on the compressed bytes and on the header's pixel count before anything is decoded, so a
decompression bomb costs a header read. Pillow's global settings are never changed.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import math
import struct
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from handlers import jsonio
from handlers.errors import (
    EmptyBody,
    ImageTooLarge,
    MalformedJSON,
    MalformedPayload,
    UndecodableImage,
    UnsupportedMediaType,
)
from handlers.frontends import Batch, stack_by_shape
from handlers.postprocess import answer_rows
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest, ImageSpec

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST, "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
}
WIDE_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # 16-bit greyscale, e.g. a 16-bit PNG
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
# Header errors Pillow raises for files it recognised but cannot parse.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
BASE64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n")


def _looks_like_image(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _geometry(width: int, height: int, spec: ImageSpec) -> tuple[tuple[float, float, float, float], float]:
    """Source box to resample straight into height x width (resize + center crop in one step), and the scale."""
    if spec.resize is None:
        return (0.0, 0.0, float(width), float(height)), max(spec.width / width, spec.height / height)
    scale = spec.resize / min(width, height)
    box_w, box_h = min(width, spec.width / scale), min(height, spec.height / scale)
    left, top = (width - box_w) / 2.0, (height - box_h) / 2.0
    return (left, top, left + box_w, top + box_h), scale


def preprocess(raw: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode and preprocess one image into a (channels, height, width) float32 array.

    Raises:
        EmptyBody, ImageTooLarge, UnsupportedMediaType (not an image), UndecodableImage (corrupt,
        truncated, or 0 pixels).
    """
    image = _decode_resized(open_checked(raw, spec), spec)
    table = _lookup_table(spec)
    bands = image.split() if spec.channels > 1 else (image,)
    out = np.empty((spec.channels, spec.height, spec.width), dtype=np.float32)
    for channel, band in enumerate(bands):
        # (x * scale - mean) / std for all 256 byte values, looked up: one pass, no temporaries.
        np.take(table[channel], np.asarray(band), out=out[channel])
    return out


@functools.lru_cache(maxsize=64)
def _lookup_table(spec: ImageSpec) -> np.ndarray:
    values = np.arange(256, dtype=np.float64)
    mean = np.broadcast_to(np.asarray(spec.mean, dtype=np.float64), (spec.channels,))
    std = np.broadcast_to(np.asarray(spec.std, dtype=np.float64), (spec.channels,))
    return (values[None, :] * spec.scale / std[:, None] - (mean / std)[:, None]).astype(np.float32)


def open_checked(raw: bytes, spec: ImageSpec) -> Image.Image:
    """Open (header only) and enforce the byte and pixel limits before any pixel is decoded."""
    if not raw:
        raise EmptyBody("empty request: send image bytes (JPEG, PNG, WebP), base64, or {\"data\": \"<base64>\"}")
    if len(raw) > spec.max_bytes:
        raise ImageTooLarge(f"image has {len(raw)} bytes; at most {spec.max_bytes} allowed")
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image declares too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        if _looks_like_image(raw):  # a known signature that does not parse: a damaged image, not a wrong type
            raise UndecodableImage("corrupt image header: the file starts like an image but does not parse") from exc
        raise UnsupportedMediaType(
            "body is not an image this server can read (JPEG, PNG, WebP, GIF, BMP, TIFF)") from exc
    except DECODE_ERRORS as exc:
        raise UndecodableImage(f"corrupt image header: {exc}") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"image has 0 pixels ({width}x{height})")
    if width * height > spec.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} ({width * height} pixels); at most {spec.max_pixels} allowed")
    return image


def _decode_resized(image: Image.Image, spec: ImageSpec) -> Image.Image:
    width, height = image.size
    box, scale = _geometry(width, height, spec)
    needed = scale * (1.0 - spec.draft_slack)
    if image.format == "JPEG" and needed <= 0.5:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the work; draft picks the smallest
        # scale that still gives `needed` of the source's resolution.
        image.draft(spec.mode, (math.ceil(width * needed), math.ceil(height * needed)))
        factor = image.size[0] / width
        box = tuple(v * factor for v in box)
    try:
        image.load()
        if image.mode in WIDE_GREY_MODES:
            # Pillow's I;16 -> L conversion clips at 255 (40000 of 65535 would read as white): scale to 8 bits first.
            image = image.convert("I").point(lambda value: value / 256.0).convert("L")
        if image.mode != spec.mode:
            image = image.convert(spec.mode)
        return image.resize((spec.width, spec.height), RESAMPLE[spec.resample], box=box)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image declares too many pixels: {exc}") from exc
    except DECODE_ERRORS as exc:
        kind = f"{image.format} " if image.format else ""
        raise UndecodableImage(f"truncated or corrupt {kind}image: {exc}") from exc


class ImageFrontend:
    """Decodes image requests with the archive's `ImageSpec` and answers with top-k classes."""

    def __init__(self, manifest: ArtifactManifest, model_dir: str = ""):
        self.manifest = manifest
        self.spec = manifest.image
        self.input_name = manifest.inputs[0].name

    def decode(self, request: Request) -> Decoded:
        raw = self.image_bytes(request)
        return Decoded({self.input_name: preprocess(raw, self.spec)[np.newaxis]}, single=True, protocol="image")

    def example_input(self) -> Decoded:
        shape = (1, self.spec.channels, self.spec.height, self.spec.width)
        return Decoded({self.input_name: np.zeros(shape, dtype=np.float32)}, single=True, protocol="image")

    def collate(self, items: list[Decoded]) -> list[Batch]:
        return stack_by_shape(items)

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> dict:
        return {**meta, **answer_rows(self.manifest, outputs)[0]}

    def image_bytes(self, request: Request) -> bytes:
        """The image inside the request: raw bytes, multipart field, base64 text, or JSON {"data": base64}."""
        payload = request.payload
        if payload is None:
            raise EmptyBody("empty request: send image bytes, base64, or {\"data\": \"<base64>\"}")
        if isinstance(payload, (dict, list)):
            return self._from_json(payload)
        if isinstance(payload, str):
            return self._from_base64(payload.encode("ascii", "replace"))
        if not isinstance(payload, (bytes, bytearray, memoryview)):  # e.g. a JSON number TorchServe decoded
            raise MalformedPayload(f"expected image bytes, base64 or a JSON object, got a {type(payload).__name__}")
        data = bytes(payload)
        if _looks_like_image(data) or request.content_type.startswith("image/"):
            return data
        if request.content_type == "application/json" or data.lstrip()[:1] in (b"{", b"["):
            self._check_base64_size(len(data))  # before parsing: a huge JSON body costs a full parse
            try:
                return self._from_json(jsonio.loads(data))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise MalformedJSON(f"malformed JSON: {exc}") from exc
        if data[:5] == b"data:" or _is_base64_text(data):
            return self._from_base64(data)
        return data  # let Pillow decide: it identifies more formats than the magic numbers above

    def _from_json(self, body: Any) -> bytes:
        value = body.get("data", body.get("b64")) if isinstance(body, dict) else None
        if isinstance(value, dict):
            value = value.get("b64")
        if not isinstance(value, str) or not value:
            raise MalformedJSON("JSON image requests look like {\"data\": \"<base64 image>\"}")
        return self._from_base64(value.encode("ascii", "replace"))

    def _check_base64_size(self, length: int) -> None:
        limit = self.spec.max_bytes * 4 // 3 + 4
        if length > limit + 1024:
            raise ImageTooLarge(f"base64 image has {length} characters; at most {limit} allowed")

    def _from_base64(self, text: bytes) -> bytes:
        self._check_base64_size(len(text))
        if b"," in text[:100] and text[:5] == b"data:":  # a data URL: data:image/png;base64,....
            text = text.split(b",", 1)[1]
        try:
            return base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedPayload(f"not valid base64: {exc}") from exc


def _is_base64_text(data: bytes) -> bool:
    head = data[:256].strip()
    return bool(head) and BASE64_ALPHABET.issuperset(head)
