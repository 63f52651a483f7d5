"""A/B routing: which variant answers a request, decided the same way on every worker and host.

Sticky keys are hashed with SHA-256 (never Python's salted `hash()`), so a key reaches the same variant
across workers, restarts and machines. Requests without a key are split by weight at random.

The routing envelope carries a request through a TorchServe workflow: the `route` node wraps each
request with the chosen variant, every model node receives it (TorchServe's DAG sends every request
to every node), and the base handler of a node that was not chosen answers at once, without inference.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from handlers import jsonio
from handlers.errors import InvalidRouteKey, MalformedPayload, SpecError, TspackError
from handlers.request import Request

ENVELOPE_KEY = "tspack_route"
SKIPPED = {"tspack_skipped": True}
ROUTER_MANIFEST_FILE = "tspack-router.json"
MAX_KEY_LENGTH = 256


@dataclass(frozen=True)
class Variant:
    name: str
    weight: float
    folder: str = ""


@dataclass(frozen=True)
class Shadow:
    """A variant that also runs, off the answer path; its agreement with the primary is only measured."""

    name: str
    folder: str = ""
    sample_rate: float = 1.0
    queue_size: int = 64


@dataclass(frozen=True)
class RoutingPolicy:
    """Weighted, optionally sticky routing over two or more variants."""

    variants: tuple[Variant, ...]
    sticky_header: Optional[str] = "X-Request-Key"
    sticky_field: Optional[str] = None
    salt: str = ""

    def __post_init__(self):
        names = [v.name for v in self.variants]
        if len(names) < 2 or len(set(names)) != len(names):
            raise SpecError(f"variants: need two or more variants with distinct names, got {names}")
        if any(v.weight < 0 for v in self.variants):
            raise SpecError("variants.weight: weights must be >= 0")
        total = sum(v.weight for v in self.variants)
        if abs(total - 1.0) > 1e-6:
            raise SpecError(f"variants.weight: weights must sum to 1, got {total:g}")

    def key_of(self, request: Request, body: Any = None) -> Optional[str]:
        """The sticky key: the header first, then the JSON body field; None when neither is present."""
        value = request.header(self.sticky_header) if self.sticky_header else None
        if value is None and self.sticky_field and isinstance(body, dict):
            raw = body.get(self.sticky_field)
            value = None if raw is None else str(raw)
        if value is not None and (not value or len(value) > MAX_KEY_LENGTH):
            raise InvalidRouteKey(f"routing key must be 1 to {MAX_KEY_LENGTH} characters, got {len(value)}")
        if value is not None and not value.isprintable():
            raise InvalidRouteKey("routing key holds control or unprintable characters")
        return value

    def choose(self, key: Optional[str], rng: Optional[random.Random] = None) -> Variant:
        """Same key -> same variant, everywhere; no key -> a weighted random draw."""
        point = stable_fraction(self.salt, key) if key is not None else (rng or random).random()
        cumulative = 0.0
        for variant in self.variants:
            cumulative += variant.weight
            if point < cumulative:
                return variant
        return self.variants[-1]


def stable_fraction(salt: str, key: str) -> float:
    """A number in [0, 1) that depends only on (salt, key)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def json_body(request: Request, max_bytes: Optional[int] = None) -> Any:
    """The request's JSON object when it has one (for a sticky field), else None. Never raises.

    Bodies over `max_bytes` are not parsed: the variant's own size check answers them.
    """
    payload = request.payload
    if isinstance(payload, dict):
        return payload
    if max_bytes is not None and isinstance(payload, (bytes, bytearray)) and len(payload) > max_bytes:
        return None
    if isinstance(payload, (bytes, bytearray)) and payload[:1] == b"{":
        try:
            return jsonio.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
    return None


def body_limit(manifest: Any) -> int:
    """The largest request body a variant accepts: its tensor limit, or its image limit as base64."""
    limit = manifest.max_body_bytes
    if manifest.image is not None:
        limit = max(limit, manifest.image.max_bytes * 4 // 3 + 1024)
    return limit


@dataclass
class RouterManifest:
    """What a router archive holds: the routing policy, the variant folders, the optional shadow."""

    name: str
    version: str
    policy: RoutingPolicy
    shadow: Optional[Shadow] = None
    built_at: str = ""
    sources: dict = field(default_factory=dict)
    max_body_bytes: Optional[int] = None  # the workflow's route node refuses larger bodies (413)

    def to_json(self) -> dict:
        from handlers.spec import to_dict

        return to_dict(self)

    @classmethod
    def from_json(cls, data: dict) -> RouterManifest:
        from handlers.spec import parse

        return parse(cls, data)


# --- the workflow envelope -----------------------------------------------------------------------------


def wrap(variant: str, request: Request, key: Optional[str]) -> str:
    """The envelope the workflow's route node sends to every model node."""
    payload = request.payload
    if isinstance(payload, (dict, list)):
        payload = json.dumps(payload).encode("utf-8")
    elif isinstance(payload, str):
        payload = payload.encode("utf-8")
    return json.dumps({ENVELOPE_KEY: {"variant": variant, "key": key, "content_type": request.content_type,
                                      "body": base64.b64encode(bytes(payload or b"")).decode("ascii")}})


def wrap_error(body: dict) -> str:
    """An envelope that makes every node answer the same error (e.g. an invalid routing key)."""
    return json.dumps({ENVELOPE_KEY: {"variant": None, "error": body}})


def unwrap(request: Request) -> Optional[tuple[Optional[str], Request | dict]]:
    """(chosen variant, original request) when `request` is a routing envelope, else None.

    For an error envelope the variant is None and the second item is the error body to answer with.

    Raises:
        MalformedPayload: an envelope that is not of the shape `wrap` writes.
    """
    payload = request.payload
    if isinstance(payload, (bytes, bytearray)):
        if not payload.startswith(b'{"' + ENVELOPE_KEY.encode()):
            return None
        try:
            payload = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return None
    if not isinstance(payload, dict) or ENVELOPE_KEY not in payload:
        return None
    route = payload[ENVELOPE_KEY]
    if not isinstance(route, dict):
        raise MalformedPayload(f"'{ENVELOPE_KEY}' must be an object")
    error = route.get("error")
    if error:
        if not (isinstance(error, dict) and isinstance(error.get("status"), int) and 400 <= error["status"] < 600
                and isinstance(error.get("type"), str)):
            raise MalformedPayload(f"'{ENVELOPE_KEY}.error' must be an error object with a status and a type")
        return None, error
    try:
        body = base64.b64decode(str(route.get("body", "")), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedPayload(f"'{ENVELOPE_KEY}.body' is not base64: {exc}") from exc
    original = Request(payload=body, content_type=str(route.get("content_type") or ""), headers=request.headers)
    return str(route.get("variant")), original


def decode_for_node(request: Request, node: str, decode: Callable[[Request], Any]) -> Any:
    """Decode a request that reached the A/B workflow node `node`: a request routed to another variant is answered
    at once without inference (TorchServe's DAG sends every request to every node), a request the route node refused
    is answered with the route node's error, and one routed here is decoded with `decode`."""
    from handlers.pipeline import Answer  # the pipeline loads runtimes; the spec side imports this module too

    try:
        routed = unwrap(request)
    except TspackError as exc:
        return Answer.from_error(exc)
    if routed is None:
        return decode(request)
    variant, original = routed
    if variant is None:
        return Answer(original["status"], original, error_type=original["type"])
    if variant != node:
        return Answer(200, dict(SKIPPED), skipped=True)
    return decode(original)


def workflow_variant(model_name: Optional[str]) -> Optional[str]:
    """TorchServe registers workflow node models as `<workflow>__<node>`; the node name is the variant."""
    if model_name and "__" in model_name:
        return model_name.rsplit("__", 1)[1]
    return None
