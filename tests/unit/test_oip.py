"""handlers/oip.py against the exact bytes tritonclient sends and reads back (no server)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers import oip
from handlers.errors import (
    BinarySizeMismatch,
    DTypeMismatch,
    InvalidInput,
    MalformedJSON,
    MalformedOipRequest,
    ShapeMismatch,
    TspackError,
    UnknownOutput,
    UnprocessableInput,
    UnsupportedDatatype,
    error_response,
)

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput, InferResult  # noqa: E402

RNG = np.random.default_rng(0)
NUMERIC = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
           "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        words = np.array([b"", b"hi", "héllo".encode(), b"\x00\xff binary"], dtype=object)
        return words[RNG.integers(0, len(words), size=shape)]
    dtype = NUMERIC[datatype]
    if datatype == "BOOL":
        return RNG.integers(0, 2, size=shape).astype(bool)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return RNG.standard_normal(shape).astype(dtype)


def triton_body(inputs: dict[str, np.ndarray], binary: bool = True, outputs=None, request_id: str = "",
                parameters=None) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient's HTTP client sends for these arrays."""
    tensors = []
    for name, array in inputs.items():
        datatype = "BYTES" if array.dtype == object else oip.datatype_of(array)
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        tensors.append(tensor)
    body, length = InferenceServerClient.generate_request_body(tensors, outputs=outputs, request_id=request_id,
                                                               parameters=parameters)
    return body, None if length is None else str(length)


def read_back(response: oip.OipResponse) -> InferResult:
    return InferResult.from_response_body(response.body, header_length=response.header_length)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", [*NUMERIC, "BYTES"])
def test_every_datatype_round_trips_through_tritonclient(datatype, binary):
    if datatype == "BYTES" and not binary:
        array = np.array([b"hi", "héllo".encode(), b""], dtype=object).reshape(1, 3)  # JSON BYTES are UTF-8 text
    else:
        array = sample(datatype, (2, 3))
    body, length = triton_body({"x": array}, binary=binary)
    request = oip.parse_request(body, length)
    assert request.datatypes == {"x": datatype}
    decoded = request.inputs["x"]
    assert decoded.shape == array.shape and decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)
    if datatype != "BYTES":
        assert decoded.flags.writeable

    result = read_back(oip.encode_response("m", "1.0", {"y": decoded}, oip.reply_meta(request)))
    np.testing.assert_array_equal(result.as_numpy("y"), array)
    assert result.get_output("y")["datatype"] == datatype


def test_several_inputs_mixed_binary_and_json_with_id_parameters_and_output_subset():
    a, b, c = sample("FP32", (4, 8)), sample("INT64", (4,)), sample("BYTES", (4, 2))
    tensors = [InferInput("a", [4, 8], "FP32"), InferInput("b", [4], "INT64"), InferInput("c", [4, 2], "BYTES")]
    tensors[0].set_data_from_numpy(a, binary_data=True)
    tensors[1].set_data_from_numpy(b, binary_data=False)
    tensors[2].set_data_from_numpy(c, binary_data=True)
    wanted = [InferRequestedOutput("probs", binary_data=False), InferRequestedOutput("ids", binary_data=True)]
    body, length = InferenceServerClient.generate_request_body(tensors, outputs=wanted, request_id="req-7",
                                                               parameters={"tenant": "t1"})
    request = oip.parse_request(body, str(length))
    assert list(request.inputs) == ["a", "b", "c"]
    np.testing.assert_array_equal(request.inputs["a"], a)
    np.testing.assert_array_equal(request.inputs["b"], b)
    np.testing.assert_array_equal(request.inputs["c"], c)
    assert request.id == "req-7" and request.parameters == {"tenant": "t1"}
    assert request.outputs == (oip.RequestedOutput("probs", False), oip.RequestedOutput("ids", True))

    outputs = {"logits": np.zeros((4, 3), np.float32), "probs": np.full((4, 3), 0.25, np.float32),
               "ids": np.arange(4, dtype=np.int64)}
    response = oip.encode_response("m", "2.0", outputs, oip.reply_meta(request))
    result = read_back(response)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["probs", "ids"]
    assert result.get_response()["id"] == "req-7"
    assert result.get_response()["parameters"] == {"tenant": "t1"}
    assert "data" in result.get_output("probs") and "data" not in result.get_output("ids")
    np.testing.assert_array_equal(result.as_numpy("ids"), outputs["ids"])
    np.testing.assert_array_equal(result.as_numpy("probs"), outputs["probs"])
    assert response.headers == {oip.HEADER_LENGTH: str(response.header_length)}
    assert response.content_type == oip.BINARY_CONTENT_TYPE


def test_no_outputs_named_means_all_binary_as_tritonclient_asks():
    body, length = triton_body({"x": sample("FP32", (1, 4))})
    request = oip.parse_request(body, length)
    assert request.outputs == () and request.binary_output
    response = oip.encode_response("m", "1.0", {"y": np.ones((1, 2), np.float32), "z": np.zeros(1, np.int32)},
                                   oip.reply_meta(request))
    result = read_back(response)
    assert all("binary_data_size" in result.get_output(n)["parameters"] for n in ("y", "z"))
    assert "id" not in result.get_response()


def test_json_request_answers_json():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2], [3, 4.5]]}]})
    request = oip.parse_request(body.encode())
    np.testing.assert_array_equal(request.inputs["x"], np.array([[1, 2], [3, 4.5]], np.float32))
    response = oip.encode_response("m", "1.0", {"y": request.inputs["x"]}, oip.reply_meta(request))
    assert response.header_length is None and response.content_type == oip.JSON_CONTENT_TYPE
    document = json.loads(response.body)
    assert document["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4.5]}]
    assert document["model_version"] == "1.0" and "parameters" not in document


def with_sizes(body: bytes, length: str, mutate) -> tuple[bytes, str]:
    """Rewrite the JSON header of a binary body (and its length) with `mutate(document)`."""
    header, rest = body[:int(length)], body[int(length):]
    document = json.loads(header)
    mutate(document)
    header = json.dumps(document).encode()
    return header + rest, str(len(header))


def set_size(size):
    return lambda d: d["inputs"][0]["parameters"].update(binary_data_size=size)


def without_binary(body: bytes, length: str) -> tuple[bytes, str]:
    body, length = with_sizes(body, length, lambda d: d["inputs"][0].pop("parameters"))
    return body[:int(length)], length


# Each case turns a good tritonclient binary body (one FP32 input of 64 values, 256 bytes) into a bad one.
MALFORMED = {
    "size_larger_than_payload": (lambda b, n: with_sizes(b, n, set_size(260)),
                                 BinarySizeMismatch, "declares 260 binary bytes but only 256 remain"),
    "size_smaller_than_shape": (lambda b, n: with_sizes(b[:-4], n, set_size(252)),
                                BinarySizeMismatch, "256 bytes, but binary_data_size says 252"),
    "trailing_bytes": (lambda b, n: (b + b"\0\0\0\0", n), BinarySizeMismatch, "4 binary bytes that no input"),
    "header_length_beyond_body": (lambda b, n: (b, str(len(b) + 1)), BinarySizeMismatch, "body has"),
    "header_length_not_a_number": (lambda b, n: (b, "12a"), MalformedOipRequest, "must be an integer"),
    "no_header_length": (lambda b, n: (b, None), MalformedJSON, "needs the Inference-Header-Content-Length"),
    "unknown_datatype": (lambda b, n: with_sizes(b, n, lambda d: d["inputs"][0].update(datatype="FP8")),
                         UnsupportedDatatype, "'FP8'"),
    "no_data": (without_binary, MalformedOipRequest, "neither 'data' nor"),
    "negative_shape": (lambda b, n: with_sizes(b, n, lambda d: d["inputs"][0].update(shape=[1, -64])),
                       MalformedOipRequest, "non-negative integers"),
    "duplicate_input": (lambda b, n: with_sizes(b, n, lambda d: d["inputs"].append(dict(d["inputs"][0]))),
                        MalformedOipRequest, "appears twice"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_binary_requests_get_typed_4xx(case):
    mutate, error, match = MALFORMED[case]
    body, length = mutate(*triton_body({"x": sample("FP32", (1, 64))}))
    with pytest.raises(error, match=match) as caught:
        oip.parse_request(body, length)
    status, _, answer = error_response(caught.value)
    assert 400 <= status < 500 and answer["error"]  # what tritonclient shows: the "error" key


def test_bytes_elements_must_match_shape_and_lengths():
    words = np.array([b"ab", b"cde"], dtype=object)
    body, length = triton_body({"t": words})
    short, short_length = with_sizes(body[:-1], length,
                                     lambda d: d["inputs"][0]["parameters"].update(binary_data_size=12))
    with pytest.raises(BinarySizeMismatch, match="claims 3 bytes; only 2 remain"):
        oip.parse_request(short, short_length)
    padded, padded_length = with_sizes(body, length, lambda d: d["inputs"][0].update(shape=[3]))
    with pytest.raises(BinarySizeMismatch, match="needs 3 elements, the binary data holds 2"):
        oip.parse_request(padded, padded_length)
    cut = body[:int(length)] + struct.pack("<I", 2) + b"ab" + b"\x03\x00"
    cut, cut_length = with_sizes(cut, length, lambda d: d["inputs"][0]["parameters"].update(binary_data_size=8))
    with pytest.raises(BinarySizeMismatch, match="inside an element's 4-byte length"):
        oip.parse_request(cut, cut_length)


@pytest.mark.parametrize("datatype, data, error, match", [
    ("FP32", [1, 2, 3], ShapeMismatch, "has 3 values but shape \\[2, 2\\] needs 4"),
    ("FP32", [1, "2", 3, 4], DTypeMismatch, "values must be numbers"),
    ("INT32", [1, 2.5, 3, 4], DTypeMismatch, "must be integers"),
    ("INT8", [1, 2, 3, 300], DTypeMismatch, "outside the INT8 range"),
    ("BOOL", [1, 0, 1, 0], DTypeMismatch, "true or false"),
    ("BYTES", ["a", 1, "b", "c"], DTypeMismatch, "must be strings"),
])
def test_json_data_that_does_not_fit_its_datatype(datatype, data, error, match):
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": datatype, "data": data}]})
    with pytest.raises(error, match=match) as caught:
        oip.parse_request(body.encode())
    assert isinstance(caught.value, (InvalidInput, UnprocessableInput))


def test_hostile_nesting_is_refused_without_recursion():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(MalformedJSON):
        oip.parse_request(('{"inputs":[{"name":"x","shape":[0],"datatype":"FP32","data":' + deep + "}]}").encode())


def test_unknown_requested_output_is_refused():
    body, length = triton_body({"x": sample("FP32", (1, 2))}, outputs=[InferRequestedOutput("nope")])
    request = oip.parse_request(body, length)
    with pytest.raises(UnknownOutput, match="unknown output 'nope'; this model has: y"):
        oip.encode_response("m", "1", {"y": np.zeros(1, np.float32)}, oip.reply_meta(request))


def test_grpc_bridge_body_base64_bytes_and_always_an_id():
    # What TorchServe 0.12's OpenInferenceProtocolImpl builds from a gRPC ModelInfer (Gson of a HashMap).
    body = json.dumps({"id": "", "model_name": "m", "inputs": [
        {"name": "t", "shape": [2], "datatype": "BYTES", "data": ["aGk=", "AP8="]},
        {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [0.5, 1.5]}]}).encode()
    request = oip.parse_request(body, grpc=True)
    assert list(request.inputs["t"]) == [b"hi", b"\x00\xff"]
    response = oip.encode_response("m", "1.0", {"y": request.inputs["x"]}, oip.reply_meta(request), grpc=True)
    document = json.loads(response.body)
    assert document["id"] == "" and document["outputs"][0]["data"] == [0.5, 1.5]
    error = json.loads(oip.grpc_error_body("m", "1.0", None, "bad input"))
    assert {"id", "model_name", "model_version", "outputs"} <= set(error)
    assert oip.is_grpc_bridge({}, body) and not oip.is_grpc_bridge({"host": "x"}, body)


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4),
       length_shift=st.integers(-8, 8))
def test_damaged_binary_bodies_only_ever_get_a_typed_4xx(cut, flips, length_shift):
    """A real two-input body, cut, with bytes flipped and its header length off: parsed or refused with a 4xx."""
    tensors = [InferInput("a", [2, 3], "FP32"), InferInput("t", [2], "BYTES")]
    tensors[0].set_data_from_numpy(np.ones((2, 3), np.float32))
    tensors[1].set_data_from_numpy(np.array([b"ab", b"c"], dtype=object))
    body, length = InferenceServerClient.generate_request_body(tensors)
    damaged = bytearray(body[:cut] if cut < len(body) else body)
    for at, value in flips:
        if at < len(damaged):
            damaged[at] = value
    try:
        request = oip.parse_request(bytes(damaged), str(length + length_shift))
    except TspackError as exc:
        status, _, answer = error_response(exc)
        assert 400 <= status < 500 and answer["error"]
        return
    for name, array in request.inputs.items():
        assert array.shape == tuple({"a": (2, 3), "t": (2,)}.get(name, array.shape))
