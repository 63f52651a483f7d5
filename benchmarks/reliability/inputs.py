"""The bad-input matrix of `make reliability`: every case, on every path, with the answer it must get.

Paths ("targets"): `tensor` (/predictions/digits), `image` (/predictions/image), `router` (the A/B router
archive, /predictions/ab) and `workflow` (the `.war`, /wfpredict/ab). TorchServe 0.12's workflow executor
always answers HTTP 200, so through the workflow the error arrives as the JSON body, whose "status" field
carries the 4xx. Cells listed in KNOWN_ISSUES are product bugs found by this matrix: they are run apart
(last, since one of them kills a worker) and reported with the answer they should get.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from archiver.zoo.digits_deploy import png_declaring
from benchmarks.reliability.load import Target
from benchmarks.reliability.rig import AB, IMAGE, MODEL, WORKFLOW, Rig, good_png, good_sample

TARGETS = {
    "tensor": f"/predictions/{MODEL}",
    "image": f"/predictions/{IMAGE}",
    "router": f"/predictions/{AB}",
    "workflow": f"/wfpredict/{WORKFLOW}",
    "node": f"/predictions/{WORKFLOW}__a",  # a workflow node model, which TorchServe also serves directly
}
MATRIX_TARGETS = ("tensor", "image", "router", "workflow")
TENSOR_LIKE = ("tensor", "router", "workflow")
JSON = "application/json"
PNG = "image/png"
JUNK_HEADER_KEYS = {"control characters": "ab\x01\x7fcd", "UTF-8 junk": "ünï©ødé💥".encode(),
                    "300 characters": "k" * 300}


@dataclass(frozen=True)
class Expect:
    status: int
    type: Optional[str] = None  # the JSON error's "type"; None: any type (and no error for a 200)


@dataclass(frozen=True)
class Case:
    """One bad input. `body(target)` gives the bytes per target (a PNG where the path takes images)."""

    name: str
    body: Callable[[str], bytes]
    expect: dict[str, Expect]
    content_type: Callable[[str], str] = lambda target: JSON
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class KnownIssue:
    id: str
    target: str
    case: str
    where: str
    summary: str


def good_json() -> bytes:
    return json.dumps({"data": good_sample().tolist()}).encode()


def good_body(target: str) -> bytes:
    return good_png() if target == "image" else good_json()


def good_type(target: str) -> str:
    return PNG if target == "image" else JSON


def good_target(rig: Rig, path: str = TARGETS["tensor"]) -> Target:
    """A good JSON tensor request to `path` of the rig's main server (the load of the fault scenarios)."""
    return Target(rig.url(path), good_json())


def _tensor_json(data) -> Callable[[str], bytes]:
    """A JSON tensor body for the tensor paths; the image path gets the same JSON (not an image)."""
    return lambda target: json.dumps({"data": data}).encode()


def _per_kind(tensor: Expect, image: Expect) -> dict[str, Expect]:
    return {t: tensor for t in TENSOR_LIKE} | {"image": image}


def _header_only(refused: Expect) -> dict[str, Expect]:
    """Junk in the routing key header: only the paths that route read it; the others ignore it."""
    return {"tensor": Expect(200), "image": Expect(200), "router": refused, "workflow": refused}


_BIG: dict[int, bytes] = {}


def big_json(megabytes: int) -> bytes:
    """A JSON tensor body of about `megabytes` MB (10**6 bytes): {"data": [0.5, 0.5, ...]}."""
    if megabytes not in _BIG:
        count = megabytes * 1_000_000 // 4
        _BIG[megabytes] = b'{"data": [' + b"0.5," * count + b"0.5]}"
    return _BIG[megabytes]


def big_image(megabytes: int) -> bytes:
    """`megabytes` MB that start like a PNG (the signature only), for the image path's byte limit."""
    return b"\x89PNG\r\n\x1a\n" + bytes(megabytes * 1_000_000 - 8)


def random_bytes(size: int = 4096, seed: int = 8) -> bytes:
    return b"\x00junk" + random.Random(seed).randbytes(size)


def deep_json(depth: int = 100_000) -> bytes:
    return b'{"data": ' + b"[" * depth + b"]" * depth + b"}"


def damaged_npy() -> bytes:
    """A .npy of the right shape whose header dict has a NUL byte where its first quote should be."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, good_sample())
    raw = bytearray(buffer.getvalue())
    raw[10] = 0
    return bytes(raw)


def with_user(target: str, user: str) -> bytes:
    if target == "image":
        return json.dumps({"data": base64.b64encode(good_png()).decode(), "user": user}).encode()
    return json.dumps({"data": good_sample().tolist(), "user": user}).encode()


def cases(big_mb: int = 50) -> list[Case]:
    png = good_png()
    image_ct = lambda target: PNG if target == "image" else JSON  # noqa: E731
    octet = lambda target: "application/octet-stream"  # noqa: E731
    malformed = Expect(400, "malformed_json")
    unsupported = Expect(415, "unsupported_media_type")
    nonfinite = _per_kind(Expect(422, "non_finite_input"), malformed)
    route_key = Expect(400, "invalid_route_key")
    junk_keys = json.dumps({"\ud800\u0000\u202e": 1, "\uffff": [1]}).encode()
    matrix = [
        Case("empty body", lambda t: b"", {t: Expect(400, "empty_body") for t in MATRIX_TARGETS}, image_ct),
        Case("malformed JSON", lambda t: b'{"data": [[0.5, 0.5', {t: malformed for t in MATRIX_TARGETS}),
        Case("wrong shape", _tensor_json([[1.0, 2.0, 3.0]]), _per_kind(Expect(422, "shape_mismatch"), malformed)),
        Case("wrong dtype (strings)", _tensor_json([[["x"] * 8] * 8]),
             _per_kind(Expect(422, "dtype_mismatch"), malformed)),
        Case("NaN", _tensor_json([[[float("nan")] * 8] * 8]), nonfinite),
        Case("infinity", _tensor_json([[[float("inf")] * 8] * 8]), nonfinite),
        Case("huge numbers (1e300)", _tensor_json([[[1e300] * 8] * 8]), nonfinite),
        Case(f"{big_mb} MB body", lambda t: big_image(big_mb) if t == "image" else big_json(big_mb),
             _per_kind(Expect(413, "payload_too_large"), Expect(413, "image_too_large")), image_ct),
        Case("truncated PNG", lambda t: png[:40], _per_kind(unsupported, Expect(422, "undecodable_image")),
             lambda t: PNG),
        Case("PNG declaring 30000x30000", lambda t: png_declaring(30000, 30000),
             _per_kind(unsupported, Expect(413, "image_too_large")), lambda t: PNG),
        Case("random bytes", lambda t: random_bytes(), {t: unsupported for t in MATRIX_TARGETS}, octet),
        Case("wrong content type (text/csv)", lambda t: b"1,2,3\n4,5,6\n", {t: unsupported for t in MATRIX_TARGETS},
             lambda t: "text/csv"),
        Case("JSON sent as a form (curl -d)", lambda t: good_json(), {t: unsupported for t in MATRIX_TARGETS},
             lambda t: "application/x-www-form-urlencoded"),
        Case("JSON nested 100000 deep", lambda t: deep_json(), {t: malformed for t in MATRIX_TARGETS}),
        Case("damaged .npy header", lambda t: damaged_npy(), _per_kind(Expect(400, "malformed_payload"), unsupported),
             octet),
        Case("junk unicode keys in the JSON body", lambda t: junk_keys, {t: malformed for t in MATRIX_TARGETS}),
        Case("control characters in the routing field", lambda t: with_user(t, "\u0000\u0007\ud800"),
             _header_only(route_key)),
    ]
    for label, value in JUNK_HEADER_KEYS.items():
        matrix.append(Case(f"X-Request-Key with {label}", good_body, _header_only(route_key), good_type,
                           headers={"X-Request-Key": value}))
    return matrix


KNOWN_ISSUES = (
    KnownIssue("K1", "router", "{big} MB body", "handlers/ab_router.py ABRouterHandler.route + handlers/routing.py "
               "json_body", "with a sticky JSON field the router parses any body before the variant's size check, "
               "so an oversized JSON body is parsed in full (seconds of worker CPU, hundreds of MB) and answered "
               "422 shape_mismatch instead of 413 payload_too_large"),
    KnownIssue("K3", "image", "{big} MB JSON body", "handlers/frontends/image.py ImageFrontend.image_bytes",
               "a JSON body is parsed before any size check: a huge JSON body costs a full parse and gets 400 "
               "malformed_json instead of 413 image_too_large"),
    KnownIssue("K4", "tensor", "JSON sent as a form (curl -d)", "handlers/request.py requests_from_batch / "
               "handlers/frontends/tensor.py TensorFrontend.decode", "TorchServe parses an "
               "application/x-www-form-urlencoded body into form fields; a JSON body (curl -d without -H) arrives "
               "as a field name with an empty value and is answered 400 empty_body, not 415"),
    KnownIssue("K4", "router", "JSON sent as a form (curl -d)", "same as K4 (tensor)", "same as K4 (tensor)"),
    KnownIssue("K4", "image", "JSON sent as a form (curl -d)", "same as K4 (tensor)", "same as K4 (tensor)"),
    KnownIssue("K5", "node", "routing envelope with a non-object route", "handlers/routing.py unwrap + "
               "handlers/base.py TspackHandler.decode", "a body {\"tspack_route\": 5} (or an error that is not an "
               "object, or a body that is not base64) sent to a workflow node model raises AttributeError/"
               "binascii.Error out of handle(): the whole batch gets 503 'Prediction failed'"),
    KnownIssue("K6", "tensor", "damaged .npy header", "handlers/frontends/tensor.py TensorFrontend._from_npy",
               "numpy raises tokenize.TokenError (not ValueError) for some damaged .npy headers; it is not caught, "
               "so the request answers 500 internal_error instead of 400 malformed_payload"),
    KnownIssue("K6", "router", "damaged .npy header", "same as K6 (tensor)", "same as K6 (tensor)"),
    KnownIssue("K6", "workflow", "damaged .npy header", "same as K6 (tensor)", "same as K6 (tensor)"),
    KnownIssue("K9", "management", "register file://<store>/%2e%2e/outside/k9.mar", "archiver/deploy/properties.py "
               "ServerConfig.render (allowed_urls)", "allowed_urls=file://<store>/.* matches percent-encoded dot "
               "segments; TorchServe 0.12 refuses a literal '..' but decodes %2e%2e, so with the model API on an "
               "archive outside the model store is registered"),
    KnownIssue("K10", "status", "`tspack serve status` after 7 good + 3 malformed predictions",
               "archiver/operate/status.py _request_counts / _error_rate", "the error rate divides by TorchServe's "
               "host-level Requests2XX/4XX/5XX, which also count management calls, pings and the status "
               "command's own describe calls: 3 errors in 10 predictions show as ~10%, not 30%"),
    # last: it takes the workflow's route worker down for a while
    KnownIssue("K2", "workflow", "{big} MB body", "handlers/ab_workflow.py route", "the route node wraps any body "
               "in a base64 envelope; above ~12 MiB the envelope exceeds max_response_size (16 MiB), TorchServe's "
               "frontend drops the route worker (TooLongFrameException) and the workflow answers 500 "
               "'Error executing route' to this and to every request until the worker is back"),
)


# Found by tests/unit/test_fuzz_decoders.py; not reachable through the rig's archives, so shown by unit tests only.
UNIT_ISSUES = (
    KnownIssue("K7", "tensor (a free -1 axis)", "OIP shape [0, 8] or .npy (0, 8) for input (-1, 8)",
               "handlers/frontends/tensor.py TensorFrontend._shaped / _matches", "a free axis of length 0 passes "
               "the decoder; the runtime then fails (the zoo's SequenceLSTM: 'Expected sequence length to be "
               "larger than 0') and the request answers 500 inference_failed instead of 422 shape_mismatch "
               "(tests/unit/test_fuzz_decoders.py::test_tensor_free_axis_of_length_zero_is_refused)"),
    KnownIssue("K8", "image, under TorchServe's default decode_input_request=true", "a JSON number as the body",
               "handlers/frontends/image.py ImageFrontend.image_bytes", "bytes(payload) on the number TorchServe "
               "decoded: -1 raises ValueError and 1.5 TypeError (500), and n allocates n bytes (a 12-byte body "
               "can ask for 100 GB); the pack's own config (decode_input_request=false) is not exposed "
               "(tests/unit/test_fuzz_decoders.py::test_image_decode_of_a_decoded_json_number)"),
)


# Seen in the swap scenario's figures (latency, not errors), so reported there rather than probed.
SWAP_ISSUES = (
    KnownIssue("K11", "management + inference", "swap under load: `swap_version` registers v2 synchronously",
               "archiver/operate/swap.py swap_version (client.register(..., synchronous=True))", "TorchServe 0.12 "
               "holds a Netty I/O thread for a synchronous register until the new workers are READY: inference "
               "requests on the connections of that thread (4 of 16 here) stall for the whole worker start. No "
               "error, but a 5-10 s stall; registering with synchronous=false and polling describe until READY "
               "stalled nothing (max 0.26-0.39 s in a side trial)"),
)


def known(target: str, case_name: str, big_mb: int) -> Optional[KnownIssue]:
    """The known product issue of a matrix cell, if it has one."""
    for issue in KNOWN_ISSUES:
        if issue.target == target and issue.case.replace("{big}", str(big_mb)) == case_name:
            return issue
    return None


def known_cases(big_mb: int) -> list[tuple[KnownIssue, Optional[Case]]]:
    """Each known issue with the request that shows it and the answer it should get."""
    by_name = {c.name: c for c in cases(big_mb)}
    extra = {
        f"{big_mb} MB JSON body": Case(f"{big_mb} MB JSON body", lambda t: big_json(big_mb),
                                       {"image": Expect(413, "image_too_large")}),
        "routing envelope with a non-object route": Case(
            "routing envelope with a non-object route", lambda t: b'{"tspack_route": 5}',
            {"node": Expect(400)}),
    }
    found = []
    for issue in KNOWN_ISSUES:
        name = issue.case.replace("{big}", str(big_mb))
        found.append((issue, by_name.get(name) or extra.get(name)))  # None: a probe of its own (K9, K10)
    return found
