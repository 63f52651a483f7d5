"""Property-based fuzzing of every request decoder, in-process (GitHub issue 8).

For arbitrary bytes, JSON, headers and images, each decoder either returns a valid result or raises a
`TspackError` with a 4xx status (which `error_response` turns into a JSON error body). Any other exception,
or a 5xx, is a bug: a handler would answer a client's bad input with a 500 (or fail its whole batch).

Cases hypothesis found while this suite was written (K5-K8 in RELIABILITY.md: envelopes of the wrong shape, a
damaged .npy header, an empty free axis, a decoded JSON number sent to the image handler) are pinned at the end
with their failing input, as regression tests.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from handlers.errors import TspackError, error_response
from handlers.frontends.image import ImageFrontend, preprocess
from handlers.frontends.tensor import NPY_MAGIC, OIP_DATATYPES, TensorFrontend
from handlers.request import PAYLOAD_KEYS, Decoded, Request, requests_from_batch
from handlers.routing import ENVELOPE_KEY, MAX_KEY_LENGTH, RoutingPolicy, Variant, json_body, unwrap, wrap
from handlers.spec import ArtifactManifest, ImageSpec, InputSpec, RuntimeSpec
from tests import support

pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:PIL"),  # Pillow's notes on the damaged images
              pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")]

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])

CONTENT_TYPES = ["application/json", "text/plain", "", "application/octet-stream", "image/png", "image/jpeg",
                 "application/x-www-form-urlencoded", "multipart/form-data", "text/csv", "APPLICATION/JSON"]
content_types = st.one_of(st.sampled_from(CONTENT_TYPES), st.text(max_size=20))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=6), st.dictionaries(st.text(max_size=8), children, max_size=5)), max_leaves=40)

TENSOR_INPUTS = [
    InputSpec(shape=(1, 8, 8)),
    InputSpec(shape=(3,), dtype="int64", max_rows=4),
    InputSpec(shape=(2, 2), dtype="uint8", max_rows=3),
    InputSpec(shape=(-1,), dtype="float16", max_rows=2),
    InputSpec(shape=(2,), dtype="bool"),
    InputSpec(shape=(2,), dtype="int8", allow_nonfinite=True),
    InputSpec(shape=(2, -1), dtype="float64", allow_nonfinite=True),
]
IMAGE_SPECS = [
    ImageSpec(height=8, width=8, mode="L", resample="box", max_bytes=64 * 1024, max_pixels=200_000),
    ImageSpec(height=6, width=5, mode="RGB", resize=7, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4),
              max_bytes=64 * 1024, max_pixels=200_000),
]


def manifest(spec: InputSpec = TENSOR_INPUTS[0], image: ImageSpec | None = None,
             max_body_bytes: int = 64 * 1024) -> ArtifactManifest:
    return ArtifactManifest(name="fuzz", version="1.0", frontend="image" if image else "tensor",
                            runtime=RuntimeSpec(format="torchscript", file="model.pt", sha256="0" * 64), input=spec,
                            image=image, max_body_bytes=max_body_bytes)


TENSOR_FRONTENDS = [TensorFrontend(manifest(spec)) for spec in TENSOR_INPUTS]
IMAGE_FRONTENDS = [ImageFrontend(manifest(InputSpec(shape=(1 if s.mode == "L" else 3, s.height, s.width)), s))
                   for s in IMAGE_SPECS]


def outcome(call):
    """The call's result, or None when it raised a TspackError with a 4xx (anything else propagates)."""
    try:
        return call()
    except TspackError as exc:
        status, _, body = error_response(exc)
        assert 400 <= status < 500, f"{type(exc).__name__} answers {status}: {exc}"
        assert body["status"] == status and body["type"] == exc.type and body["error"]
        json.dumps(body)
        return None


def check_tensor(decoded, spec: InputSpec) -> None:
    if decoded is None:
        return
    assert isinstance(decoded, Decoded)
    array = decoded.array
    assert array.dtype == np.dtype(spec.dtype)
    assert array.ndim == len(spec.shape) + 1
    assert all(e == -1 or s == e for s, e in zip(array.shape[1:], spec.shape)), array.shape
    assert 1 <= array.shape[0] <= spec.max_rows
    assert not decoded.single or array.shape[0] == 1
    if array.dtype.kind == "f" and not spec.allow_nonfinite:
        assert np.isfinite(array).all()


def check_image(decoded, frontend: ImageFrontend) -> None:
    if decoded is None:
        return
    spec = frontend.spec
    assert isinstance(decoded, Decoded)
    assert decoded.array.shape == (1, spec.channels, spec.height, spec.width)
    assert decoded.array.dtype == np.float32 and np.isfinite(decoded.array).all()


# --- tensor front end ----------------------------------------------------------------------------------


@FUZZ
@given(index=st.integers(0, len(TENSOR_INPUTS) - 1), payload=st.binary(max_size=300), content_type=content_types)
@example(index=0, payload=b"", content_type="application/json")
@example(index=0, payload=NPY_MAGIC + b"\x01\x00garbage", content_type="application/octet-stream")
@example(index=0, payload=b"[" * 5000 + b"]" * 5000, content_type="application/json")
@example(index=0, payload=b'{"data": NaN}', content_type="")
def test_tensor_decode_arbitrary_bytes(index, payload, content_type):
    frontend = TENSOR_FRONTENDS[index]
    check_tensor(outcome(lambda: frontend.decode(Request(payload, content_type.lower()))), frontend.spec)


@FUZZ
@given(index=st.integers(0, len(TENSOR_INPUTS) - 1), value=json_values,
       form=st.sampled_from(["bytes", "object", "str"]))
@example(index=0, value={"data": [[[1e300] * 8] * 8]}, form="bytes")
@example(index=1, value={"data": [2**70, 1, 2]}, form="object")
@example(index=4, value={"data": [True, 1.5]}, form="bytes")
def test_tensor_decode_arbitrary_json(index, value, form):
    frontend = TENSOR_FRONTENDS[index]
    text = json.dumps(value)
    payload = {"bytes": text.encode(), "object": value, "str": text}[form]
    check_tensor(outcome(lambda: frontend.decode(Request(payload, "application/json"))), frontend.spec)


def nested(shape: list[int], element: st.SearchStrategy) -> st.SearchStrategy:
    if not shape:
        return element
    return st.lists(nested(shape[1:], element), min_size=shape[0], max_size=shape[0])


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.integers(-300, 300),
                    st.integers(-2**70, 2**70), st.booleans())
near_valid_shapes = st.one_of(st.lists(st.integers(0, 4), max_size=4),
                              st.sampled_from([[1, 8, 8], [2, 1, 8, 8], [3], [2, 3], [2, 2], [1, 2, 2], [2], [5, 2]]))


@FUZZ
@given(index=st.integers(0, len(TENSOR_INPUTS) - 1), data=st.data(), wrap_as=st.sampled_from(["data", "bare", "oip"]))
def test_tensor_decode_near_valid_arrays(index, data, wrap_as):
    frontend = TENSOR_FRONTENDS[index]
    shape = data.draw(near_valid_shapes)
    element = data.draw(st.sampled_from([numbers, st.one_of(numbers, st.none(), st.text(max_size=2))]))
    values = data.draw(nested(shape, element))
    if wrap_as == "oip":
        datatype = data.draw(st.one_of(st.sampled_from(sorted(OIP_DATATYPES)), st.text(max_size=5)))
        oip_shape = data.draw(st.one_of(st.just(shape), st.lists(st.integers(-1, 9), max_size=4), json_scalars))
        flat = np.asarray(values, dtype=object).reshape(-1).tolist() if shape and 0 not in shape else values
        body = {"inputs": [{"name": "input", "shape": oip_shape, "datatype": datatype, "data": flat}], "id": "x"}
    else:
        body = {"data": values} if wrap_as == "data" else values
    payload = json.dumps(body).encode()
    check_tensor(outcome(lambda: frontend.decode(Request(payload, "application/json"))), frontend.spec)


npy_dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "complex64",
                              "<U3", "S2", "datetime64[s]"])


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@FUZZ
@given(index=st.integers(0, len(TENSOR_INPUTS) - 1), data=st.data(), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3))
def test_tensor_decode_npy_and_corrupted_npy(index, data, cut, flips):
    """Any array numpy can save, its bytes damaged after the header, or cut anywhere."""
    frontend = TENSOR_FRONTENDS[index]
    array = data.draw(hnp.arrays(npy_dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
    raw = bytearray(npy(array))
    header = len(raw) - array.nbytes
    for position, value in flips:
        if header + position < len(raw):
            raw[header + position] = value
    if data.draw(st.booleans()):
        raw = raw[:max(len(NPY_MAGIC), cut)]
    check_tensor(outcome(lambda: frontend.decode(Request(bytes(raw), "application/octet-stream"))), frontend.spec)


def test_object_npy_is_refused_not_unpickled():
    frontend = TENSOR_FRONTENDS[0]
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert outcome(lambda: frontend.decode(Request(buffer.getvalue(), "application/octet-stream"))) is None


# --- image front end -----------------------------------------------------------------------------------


@FUZZ
@given(index=st.integers(0, len(IMAGE_SPECS) - 1), payload=st.one_of(st.binary(max_size=400), st.text(max_size=100)),
       content_type=content_types)
@example(index=0, payload=b"\x89PNG\r\n\x1a\n", content_type="image/png")
@example(index=0, payload="data:image/png;base64,!!!", content_type="text/plain")
@example(index=0, payload=b'{"data": {"b64": 5}}', content_type="application/json")
def test_image_decode_arbitrary_bytes(index, payload, content_type):
    frontend = IMAGE_FRONTENDS[index]
    check_image(outcome(lambda: frontend.decode(Request(payload, content_type.lower()))), frontend)


@FUZZ
@given(index=st.integers(0, len(IMAGE_SPECS) - 1), value=json_values, as_bytes=st.booleans())
def test_image_decode_arbitrary_json(index, value, as_bytes):
    """JSON bytes, or (TorchServe's default decode_input_request) the object or array it decoded already."""
    frontend = IMAGE_FRONTENDS[index]
    if not as_bytes and not isinstance(value, (dict, list)):
        value = [value]  # decoded scalars: see test_image_decode_of_a_decoded_json_number
    payload = json.dumps(value).encode() if as_bytes else value
    check_image(outcome(lambda: frontend.decode(Request(payload, "application/json"))), frontend)


FORMATS = {"PNG": ("L", "RGB", "RGBA", "P", "1", "I;16", "LA"), "JPEG": ("L", "RGB", "CMYK"),
           "GIF": ("L", "P", "RGB"), "BMP": ("L", "RGB", "1"), "TIFF": ("L", "RGB", "RGBA", "I;16", "F", "CMYK"),
           "WEBP": ("RGB", "RGBA")}


@st.composite
def image_files(draw) -> bytes:
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    size = (draw(st.integers(1, 40)), draw(st.integers(1, 40)))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@FUZZ
@given(index=st.integers(0, len(IMAGE_SPECS) - 1), raw=image_files(), data=st.data(),
       wrapping=st.sampled_from(["raw", "base64", "json", "json-b64", "data-url"]), content_type=content_types)
def test_image_decode_real_and_damaged_images(index, raw, data, wrapping, content_type):
    frontend = IMAGE_FRONTENDS[index]
    damage = data.draw(st.sampled_from(["none", "truncate", "flip"]))
    raw = bytearray(raw)
    if damage == "truncate":
        raw = raw[:data.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif damage == "flip" and raw:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    text = base64.b64encode(bytes(raw))
    payload = {"raw": bytes(raw), "base64": text, "json": json.dumps({"data": text.decode()}).encode(),
               "json-b64": json.dumps({"data": {"b64": text.decode()}}).encode(),
               "data-url": b"data:image/png;base64," + text}[wrapping]
    check_image(outcome(lambda: frontend.decode(Request(payload, content_type.lower()))), frontend)
    if wrapping == "raw":
        result = outcome(lambda: preprocess(bytes(raw), frontend.spec))
        assert result is None or result.shape == (frontend.spec.channels, frontend.spec.height, frontend.spec.width)


@FUZZ
@given(width=st.integers(0, 2**31 - 1), height=st.integers(0, 2**31 - 1))
@example(width=30000, height=30000)
@example(width=0, height=5)
def test_image_with_any_declared_size_costs_a_header_read(width, height):
    check_image(outcome(lambda: IMAGE_FRONTENDS[0].decode(Request(support.png_declaring(width, height), "image/png"))),
                IMAGE_FRONTENDS[0])


# --- routing -------------------------------------------------------------------------------------------

POLICY = RoutingPolicy(variants=(Variant("a", 0.5), Variant("b", 0.5)), sticky_header="X-Request-Key",
                       sticky_field="user", salt="fuzz")
header_maps = st.dictionaries(st.sampled_from(["x-request-key", "content-type", "authorization"]) | st.text(max_size=6),
                              st.text(max_size=300), max_size=4)


@FUZZ
@given(headers=header_maps, body=json_values, key=st.one_of(st.none(), st.text(max_size=300)))
@example(headers={}, body={"user": "\x00"}, key=None)
@example(headers={}, body={"user": {"nested": ["x" * 300]}}, key=None)
@example(headers={}, body={}, key="")
@example(headers={}, body={}, key="\ud800")
def test_key_of_returns_a_printable_key_or_a_400(headers, body, key):
    if key is not None:
        headers = {**headers, "x-request-key": key}
    result = outcome(lambda: POLICY.key_of(Request(b"", "application/json", headers), body))
    if result is not None:
        assert isinstance(result, str) and 1 <= len(result) <= MAX_KEY_LENGTH and result.isprintable()
        assert POLICY.choose(result).name in ("a", "b")


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=100), json_values,
                         json_values.map(lambda v: b"{" + json.dumps(v).encode()),
                         st.builds(lambda v: json.dumps({"user": v}).encode(), json_values)))
@example(payload=b"{" * 100_000)
@example(payload=b'{"a": "\xff"}')
def test_json_body_never_raises(payload):
    result = json_body(Request(payload, "application/json"))
    assert result is None or isinstance(result, dict)


@FUZZ
@given(payload=st.one_of(st.binary(max_size=300), st.text(max_size=50),
                         st.binary(max_size=100).map(lambda b: b'{"' + ENVELOPE_KEY.encode() + b'"' + b)))
@example(payload=b'{"tspack_route": {"variant": "a", "body": ""}}')
def test_unwrap_of_non_envelopes_and_broken_json(payload):
    result = outcome(lambda: unwrap(Request(payload, "application/json")))
    assert result is None or (isinstance(result, tuple) and len(result) == 2)


@FUZZ
@given(variant=st.text(max_size=10), body=st.binary(max_size=200), content_type=content_types,
       key=st.one_of(st.none(), st.text(max_size=20)))
def test_unwrap_inverts_wrap(variant, body, content_type, key):
    envelope = wrap(variant, Request(body, content_type), key)
    chosen, original = unwrap(Request(envelope.encode(), "application/json", {"x": "y"}))
    assert chosen == variant and original.payload == body and original.content_type == content_type


# --- TorchServe's batch -> Request ----------------------------------------------------------------------

header_values = st.one_of(st.text(max_size=20), st.dictionaries(st.text(max_size=12), json_scalars, max_size=2),
                          st.integers(), st.none())
rows = st.one_of(
    st.dictionaries(st.one_of(st.sampled_from(PAYLOAD_KEYS), st.text(max_size=8)),
                    st.one_of(st.binary(max_size=40), st.text(max_size=20), json_values), max_size=3),
    json_scalars, st.lists(json_scalars, max_size=2))


@FUZZ
@given(batch=st.lists(st.tuples(rows, st.dictionaries(st.text(max_size=15), header_values, max_size=4)), max_size=5),
       with_context=st.booleans())
def test_requests_from_batch(batch, with_context):
    from ts.context import Context, RequestProcessor

    data = [row for row, _ in batch]
    context = None
    if with_context:
        context = Context("fuzz", "/nonexistent", {"model": {}}, 8, None, "0.12.0")
        context.request_processor = [RequestProcessor(headers) for _, headers in batch]
    requests = outcome(lambda: requests_from_batch(data, context))
    assert requests is not None, "a TorchServe batch must always become requests"
    assert len(requests) == len(data)
    for request in requests:
        assert isinstance(request, Request) and isinstance(request.content_type, str)
        assert request.content_type == request.content_type.lower() and ";" not in request.content_type
        assert all(isinstance(k, str) and k == k.lower() and isinstance(v, str) for k, v in request.headers.items())


# --- found by this fuzzing or the reliability matrix, fixed since: kept as regression tests ------------------


@FUZZ
@given(route=json_values)
@example(route=5)
@example(route={"error": "x"})
@example(route={"variant": "a", "body": "abc"})
def test_unwrap_of_any_envelope(route):
    for payload in (json.dumps({ENVELOPE_KEY: route}).encode(), {ENVELOPE_KEY: route}):
        result = outcome(lambda payload=payload: unwrap(Request(payload, "application/json")))
        if result is not None:
            variant, rest = result
            assert variant is None and isinstance(rest, dict) and 400 <= rest.get("status", 0) < 500 \
                or isinstance(variant, str) and isinstance(rest, Request)


def test_image_decode_deeply_nested_json():
    """Found by the reliability matrix (a 500 for the image path), fixed in ImageFrontend.image_bytes."""
    payload = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    check_image(outcome(lambda: IMAGE_FRONTENDS[0].decode(Request(payload, "application/json"))), IMAGE_FRONTENDS[0])


def test_tensor_free_axis_of_length_zero_is_refused():
    frontend = TENSOR_FRONTENDS[3]
    assert outcome(lambda: frontend.decode(Request(b'{"data": [[]]}', "application/json"))) is None


@FUZZ
@given(position=st.integers(8, 60), value=st.integers(0, 255))
@example(position=10, value=0)
def test_tensor_decode_npy_with_a_damaged_header(position, value):
    raw = bytearray(npy(np.zeros((1, 8, 8), np.float32)))
    raw[position] = value
    frontend = TENSOR_FRONTENDS[0]
    check_tensor(outcome(lambda: frontend.decode(Request(bytes(raw), "application/octet-stream"))), frontend.spec)


@pytest.mark.parametrize("number", [-1, 1.5])
def test_image_decode_of_a_decoded_json_number(number):
    frontend = IMAGE_FRONTENDS[0]
    check_image(outcome(lambda: frontend.decode(Request(number, "application/json"))), frontend)
