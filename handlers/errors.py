"""Typed errors of the serving path, each carrying its HTTP status.

Every error a handler can answer a request with is defined here, once. `error_response` is the one
place where an exception becomes an HTTP status and a JSON body, so the mapping cannot drift between
handlers.
"""

from __future__ import annotations

import http


class TspackError(Exception):
    """Root of all tspack errors. `status` is the HTTP code, `type` a stable machine-readable name."""

    status: int = 500
    type: str = "internal_error"


class SpecError(TspackError, ValueError):
    """A spec, manifest or config value is missing, unknown or out of range. The message names the key."""

    type = "spec_error"


# --- request errors: the client sent something we refuse (4xx) ---------------------------------------


class InvalidInput(TspackError):
    status = 400
    type = "invalid_input"


class EmptyBody(InvalidInput):
    type = "empty_body"


class MalformedJSON(InvalidInput):
    type = "malformed_json"


class MalformedPayload(InvalidInput):
    """Bytes that claim a format (npy, base64, multipart) but do not parse as it."""

    type = "malformed_payload"


class InvalidRouteKey(InvalidInput):
    type = "invalid_route_key"


class UnprocessableInput(TspackError):
    """Well-formed input that does not fit the model: wrong shape, dtype, or values."""

    status = 422
    type = "unprocessable_input"


class ShapeMismatch(UnprocessableInput):
    type = "shape_mismatch"


class DTypeMismatch(UnprocessableInput):
    type = "dtype_mismatch"


class NonFiniteInput(UnprocessableInput):
    type = "non_finite_input"


class UndecodableImage(UnprocessableInput):
    type = "undecodable_image"


class MissingInput(UnprocessableInput):
    """A model input the request does not carry."""

    type = "missing_input"


class UnknownInput(UnprocessableInput):
    """A named input (or requested output) the model does not have."""

    type = "unknown_input"


class RowCountMismatch(UnprocessableInput):
    """The inputs of one request disagree on their rows (the batch axis they share)."""

    type = "row_count_mismatch"


class UnknownOutput(UnknownInput):
    """An OIP request asks for an output the model does not produce."""

    type = "unknown_output"


# OIP v2 (handlers/oip.py): the client's own framing is wrong, so these are 400 like MalformedJSON.


class MalformedOipRequest(InvalidInput):
    """An OIP body whose structure is wrong: no inputs, a tensor without name or shape, a bad header length."""

    type = "malformed_oip_request"


class BinarySizeMismatch(InvalidInput):
    """OIP binary tensor data whose sizes disagree: with the body, with the shape, or BYTES element lengths."""

    type = "binary_size_mismatch"


class UnsupportedDatatype(InvalidInput):
    """An OIP datatype outside the protocol's list (or one the model's output cannot be phrased in)."""

    type = "unsupported_datatype"


class NotText(UnprocessableInput):
    """A text model sent a JSON value that is not a string or a list of strings."""

    type = "not_text"


class EmptyText(InvalidInput):
    """A text (or the whole list of texts) with nothing but whitespace in it."""

    type = "empty_text"


class NotUTF8(InvalidInput):
    """A text body, or a JSON body, whose bytes are not UTF-8."""

    type = "not_utf8"


class PayloadTooLarge(TspackError):
    status = 413
    type = "payload_too_large"


class ImageTooLarge(PayloadTooLarge):
    type = "image_too_large"


class TooManyTexts(PayloadTooLarge):
    """More texts in one request than the archive's `text.max_texts`."""

    type = "too_many_texts"


class UnsupportedMediaType(TspackError):
    status = 415
    type = "unsupported_media_type"


# --- the OIP gateway (archiver/operate/oip_gateway.py): refusals of the server in front of the handlers ---


class TokenRefused(TspackError):
    """A metadata request without the current inference key. 400, not 401: TorchServe 0.12 answers a bad token
    with 400 on every route, so the gateway's own routes answer alike and a client meets one behaviour."""

    status = 400
    type = "token_refused"


class NotReady(TspackError):
    """A readiness probe's "no": the OIP spec answers false with a 4xx."""

    status = 400
    type = "not_ready"


class RouteNotFound(TspackError):
    status = 404
    type = "route_not_found"


class ModelNotFound(RouteNotFound):
    """A model name (or version) TorchServe has not registered."""

    type = "model_not_found"


class MethodNotAllowed(TspackError):
    status = 405
    type = "method_not_allowed"


class UpstreamUnavailable(TspackError):
    """TorchServe did not answer the gateway."""

    status = 502
    type = "upstream_unavailable"


# --- server errors: our side failed (5xx) --------------------------------------------------------------


class ModelLoadError(TspackError):
    status = 500
    type = "model_load_error"


class IntegrityError(ModelLoadError):
    """The weights in the archive are not the ones the build validated (SHA-256 mismatch)."""

    type = "integrity_error"


class InferenceFailed(TspackError):
    status = 500
    type = "inference_failed"


class Overloaded(TspackError):
    """A zero-wait worker already holds its limit of queued requests (TorchServe's full job queue answers 503 too)."""

    status = 503
    type = "overloaded"


class OutOfResources(TspackError):
    status = 507
    type = "out_of_resources"


def error_response(exc: BaseException) -> tuple[int, str, dict]:
    """Map any exception to (HTTP status, reason phrase, JSON body).

    tspack errors keep their own status and message; anything else is an unexpected server fault,
    answered 500 without leaking internals beyond the exception's class name.
    """
    if isinstance(exc, TspackError):
        status, kind, message = exc.status, exc.type, str(exc) or exc.type
    elif isinstance(exc, MemoryError):
        status, kind, message = OutOfResources.status, OutOfResources.type, "out of memory"
    else:
        status, kind, message = 500, "internal_error", f"{type(exc).__name__}: {exc}"
    phrase = http.HTTPStatus(status).phrase
    return status, phrase, {"error": message, "type": kind, "status": status}
