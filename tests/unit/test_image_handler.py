"""ImageHandler on a real TorchServe Context, with real PNG/JPEG/WebP images written by Pillow."""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, features

from handlers.frontends.image import preprocess
from handlers.image import ImageHandler
from handlers.spec import ImageSpec
from tests import support


@pytest.fixture(scope="module")
def image_archive(digits_store, tmp_path_factory):
    store = str(tmp_path_factory.mktemp("image-store"))
    support.build_models(store, [support.digits_model(
        "digits", "1.0", digits_store["weights"]["1.0"], digits_store["samples"], frontend="image",
        image=dict(support.IMAGE_SPEC, max_pixels=1_000_000, max_bytes=200_000),
        artifacts=[{"format": "torchscript"}, {"format": "onnx", "id": "onnx"}])])
    return store


@pytest.fixture(params=["digits_v1.0.mar", "digits-onnx_v1.0.mar"], ids=["torchscript", "onnx"])
def handler(request, image_archive, tmp_path):
    model_dir = support.extract(os.path.join(image_archive, request.param), str(tmp_path / "model"))
    h = ImageHandler()
    h.initialize(support.make_context(model_dir))
    return h


def samples(count: int = 4) -> np.ndarray:
    return np.random.default_rng(1).random((count, 1, 8, 8)).astype(np.float32)


def call(handler, bodies, field="body"):
    data = support.torchserve_batch(handler.context, bodies, field=field)
    out = handler.handle(data, handler.context)
    return support.statuses(handler.context, len(bodies)), [json.loads(o) for o in out]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_png_answers_like_the_eager_model_on_the_same_pixels(handler, digits_store):
    x = samples()
    statuses, bodies = call(handler, [(support.digit_png(row), "image/png") for row in x])
    assert statuses == [200] * len(x)
    pixels = np.stack([preprocess(support.digit_png(row), ImageSpec(**support.IMAGE_SPEC)) for row in x])
    np.testing.assert_allclose(pixels, np.round(x * 255) / 255, atol=1e-6)  # box resampling of 4x NEAREST is exact
    expected = support.softmax(support.eager_outputs(digits_store["weights"]["1.0"], pixels))
    for body, probabilities in zip(bodies, expected):
        top = body["predictions"][0]
        assert top["index"] == int(probabilities.argmax())
        assert top["probability"] == pytest.approx(float(probabilities.max()), abs=1e-5)
        assert top["label"] == support.LABELS[top["index"]] and len(body["predictions"]) == 3


def test_every_transport_of_the_same_image_gives_the_same_answer(handler):
    png = support.digit_png(samples(1)[0])
    b64 = base64.b64encode(png)
    forms = [
        (png, "image/png"),                                   # raw bytes (curl --data-binary)
        (png, "application/octet-stream"),                    # raw bytes, generic type
        (b64, "text/plain"),                                  # base64 text
        (b"data:image/png;base64," + b64, "text/plain"),      # a data URL
        (json.dumps({"data": b64.decode()}).encode(), "application/json"),
        ({"data": {"b64": b64.decode()}}, "application/json"),  # already decoded by TorchServe
    ]
    statuses, bodies = call(handler, forms)
    assert statuses == [200] * len(forms)
    assert all(b["predictions"][0]["index"] == bodies[0]["predictions"][0]["index"] for b in bodies)
    multipart_status, (multipart,) = call(handler, [(png, "image/png")], field="data")  # curl -F data=@x.png
    assert multipart_status == [200] and multipart["predictions"][0]["index"] == bodies[0]["predictions"][0]["index"]


def paletted(index_rgb: tuple[int, int, int]) -> Image.Image:
    image = Image.new("P", (12, 12), 3)
    image.putpalette([0, 0, 0] * 3 + list(index_rgb))
    return image


# (image file, the 8x8 L pixel value preprocessing must give, tolerance in byte steps). Colour goes to grey with
# ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), alpha is ignored, 1-bit white is 255, 16-bit grey is scaled to
# 8 bits (40000 -> 156); JPEG is lossy by a step.
MODES = [
    pytest.param(lambda: encode(Image.new("RGB", (640, 480), (30, 60, 90)), "JPEG", quality=90), 54, 1,
                 id="rgb-jpeg-640x480"),
    pytest.param(lambda: encode(Image.new("L", (17, 9), 128), "JPEG"), 128, 1, id="gray-jpeg"),
    pytest.param(lambda: encode(Image.new("RGBA", (33, 21), (10, 200, 30, 128)), "PNG"), 124, 0, id="rgba-png"),
    pytest.param(lambda: encode(paletted((200, 100, 50)), "PNG"), 124, 0, id="palette-png"),
    pytest.param(lambda: encode(Image.new("I;16", (8, 8), 40000), "PNG"), 156, 0, id="16bit-png"),
    pytest.param(lambda: encode(Image.new("1", (64, 8), 1), "BMP"), 255, 0, id="1bit-bmp"),
]


@pytest.mark.parametrize("make,grey,steps", MODES)
def test_sizes_and_modes_are_converted(handler, digits_store, make, grey, steps):
    raw = make()
    pixels = preprocess(raw, ImageSpec(**support.IMAGE_SPEC))
    assert pixels.shape == (1, 8, 8)
    np.testing.assert_allclose(pixels, np.full((1, 8, 8), grey / 255, np.float32), atol=steps / 255 + 1e-6)
    statuses, (body,) = call(handler, [(raw, "application/octet-stream")])
    assert statuses == [200], body
    expected = support.softmax(support.eager_outputs(digits_store["weights"]["1.0"], pixels[None]))[0]
    top = body["predictions"][0]
    assert top["index"] == int(expected.argmax())
    assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow build has no WebP")
def test_webp(handler):
    statuses, _ = call(handler, [(encode(Image.new("RGB", (20, 20), (1, 2, 3)), "WEBP"), "image/webp")])
    assert statuses == [200]


def test_one_corrupt_image_in_a_batch_of_four(handler):
    good = [support.digit_png(row) for row in samples(3)]
    corrupt = good[0][: len(good[0]) // 2]
    statuses, bodies = call(handler, [(good[0], "image/png"), (corrupt, "image/png"), (good[1], "image/png"),
                                      (good[2], "image/png")])
    assert statuses == [200, 422, 200, 200]
    assert bodies[1]["type"] == "undecodable_image" and "truncated" in bodies[1]["error"]


BAD_IMAGES = [
    (lambda: b"", 400, "empty_body", "empty request"),
    (lambda: os.urandom(300), 415, "unsupported_media_type", "not an image"),
    (lambda: b"GIF89a" + b"\x00" * 5, 422, "undecodable_image", "corrupt image header"),
    (lambda: support.png_declaring(30000, 30000), 413, "image_too_large", "too many pixels"),
    (lambda: support.png_declaring(2000, 1000), 413, "image_too_large", "2000x1000 (2000000 pixels)"),
    (lambda: support.png_declaring(0, 5), 422, "undecodable_image", "starts like an image but does not parse"),
    (lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 250_000, 413, "image_too_large", "at most 200000"),
    (lambda: b"!!!not base64!!!", 415, "unsupported_media_type", "not an image this server can read"),
    (lambda: json.dumps({"data": "@@@"}).encode(), 400, "malformed_payload", "not valid base64"),
    (lambda: json.dumps({"image": 1}).encode(), 400, "malformed_json", "{\"data\": \"<base64 image>\"}"),
]


@pytest.mark.parametrize("make,status,kind,words", BAD_IMAGES, ids=[b[2] + str(i) for i, b in enumerate(BAD_IMAGES)])
def test_bad_images_get_a_4xx_naming_the_problem(handler, make, status, kind, words):
    good = support.digit_png(samples(1)[0])
    statuses, bodies = call(handler, [(good, "image/png"), (make(), "application/octet-stream")])
    assert statuses == [200, status], bodies[1]
    assert bodies[1]["type"] == kind and words in bodies[1]["error"]


def test_pixel_limit_is_enforced_before_decoding(monkeypatch):
    spec = ImageSpec(height=8, width=8, mode="L", max_pixels=100)
    png = encode(Image.new("L", (11, 10)), "PNG")
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(self) or None)
    from handlers.errors import ImageTooLarge

    with pytest.raises(ImageTooLarge, match="11x10"):
        preprocess(png, spec)
    assert loaded == []


def test_large_jpeg_is_decoded_in_draft_mode(monkeypatch):
    from PIL import JpegImagePlugin

    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        calls.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    spec = ImageSpec(height=224, width=224, resize=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    big = encode(Image.new("RGB", (2000, 1500), (120, 30, 200)), "JPEG")
    out = preprocess(big, spec)
    assert out.shape == (3, 224, 224) and calls and max(calls[0]) < 2000
    assert out[0].mean() == pytest.approx((120 / 255 - 0.485) / 0.229, abs=0.05)
    calls.clear()
    preprocess(encode(Image.new("RGB", (300, 260)), "JPEG"), spec)
    assert calls == []  # a small image decodes at full size: no resolution to save


@pytest.mark.parametrize("archive,runtime,scheme", [
    ("image-torch-int8", "torchscript-int8", "dynamic-int8"),
    ("image-int8", "onnxruntime-int8", "static-int8"),
])
def test_int8_handlers_answer_like_eager_and_describe_their_scheme(int8_store, trained, tmp_path, archive,
                                                                    runtime, scheme):
    import torch

    from handlers.runtimes.quantized import choose_quantized_engine

    model_dir = support.extract(support.int8_archive(int8_store, archive), str(tmp_path / "model"))
    handler = ImageHandler()
    handler.initialize(support.make_context(model_dir))
    described = handler.describe()
    assert described["runtime"]["runtime"] == runtime and described["runtime"]["quantization"] == scheme
    if runtime == "torchscript-int8":
        engine = choose_quantized_engine()
        assert engine in torch.backends.quantized.supported_engines
        assert described["runtime"]["quantized_engine"] == engine == torch.backends.quantized.engine
    x = np.load(trained["heldout"])["x"][:8]
    pngs = [support.digit_png(row) for row in x]
    statuses, bodies = call(handler, [(p, "image/png") for p in pngs[:4]] + [(pngs[4][:40], "image/png")]
                            + [(p, "image/png") for p in pngs[5:]])
    assert statuses == [200] * 4 + [422] + [200] * 3
    pixels = np.stack([preprocess(p, ImageSpec(**support.IMAGE_SPEC)) for p in pngs])
    expected = support.softmax(support.eager_outputs(trained["weights"], pixels))
    answered = [(b, e) for i, (b, e) in enumerate(zip(bodies, expected)) if i != 4]
    agree = [b["predictions"][0]["index"] == int(e.argmax()) for b, e in answered]
    assert sum(agree) >= len(agree) - 1, agree
    for body, probabilities in answered:
        top = body["predictions"][0]
        assert top["probability"] == pytest.approx(float(probabilities[top["index"]]), abs=0.1)
