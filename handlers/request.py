"""One inference request as the handlers see it, independent of TorchServe's batch layout."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# TorchServe names the payload of a raw body "body", and multipart fields by their form name; clients
# following its docs use "data" for both.
PAYLOAD_KEYS = ("data", "body", "input", "file")


@dataclass
class Request:
    """A request's payload and metadata.

    payload: bytes for raw bodies (the pack's configs set decode_input_request=false), or whatever
        TorchServe already decoded (dict/list for JSON, str for text) under its default config.
    content_type: media type without parameters, lower case ("" when the client sent none).
    headers: HTTP request headers with lower-case names.
    """

    payload: Any
    content_type: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Decoded:
    """A request turned into model input: every array in `inputs` has a leading axis of `rows` samples.

    inputs: input name -> array, in the model's input order; all share the request's rows.
    single: the request carried one sample without a batch axis, so its answer is not a list.
    protocol: how the request was phrased ("json", "oip", "npy", "npz", "image", "text"); the answer mirrors it.
    meta: protocol details the encoder needs (e.g. the OIP request id, requested outputs).
    """

    inputs: dict[str, np.ndarray]
    single: bool
    protocol: str
    meta: dict = field(default_factory=dict)

    @functools.cached_property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    @property
    def array(self) -> np.ndarray:
        """The input of a one-input model."""
        return next(iter(self.inputs.values()))


def requests_from_batch(data: list, context: Any) -> list[Request]:
    """Turn TorchServe's `data` list (one dict per request) into `Request`s."""
    requests = []
    for idx, row in enumerate(data):
        headers: dict[str, str] = {}
        content_types: dict[str, str] = {}
        if context is not None and getattr(context, "request_processor", None):
            for key, value in context.get_all_request_header(idx).items():
                if isinstance(value, dict):  # per-parameter metadata, e.g. {"content-type": ...}
                    content_types[key] = str(value.get("content-type") or "")
                else:
                    headers[str(key).lower()] = str(value)
        key = _payload_key(row)
        payload = row.get(key) if key is not None else None
        content_type = content_types.get(key or "", "") or headers.get("content-type", "")
        requests.append(Request(payload=payload, content_type=_media_type(content_type), headers=headers))
    return requests


def _payload_key(row: Any) -> str | None:
    if not isinstance(row, dict) or not row:
        return None
    for key in PAYLOAD_KEYS:
        if key in row:
            return key
    return next(iter(row))


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()
