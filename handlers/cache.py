"""A response cache inside the worker: a bounded LRU of encoded answers, keyed on the decoded request (issue 21).

The key is the SHA-256 of the model name and version, the answer's context (the `meta` the encoder reads: model,
version, A/B variant), the request's protocol details (`Decoded.protocol`, `single`, `meta`: an OIP id or the
requested outputs change the answer's form) and every decoded input: name, dtype, shape and bytes. It is taken
after decoding, so the same image sent as PNG bytes or as base64 is one entry, and another version never hits.
What is stored is the answer's exact body bytes, so a hit answers byte for byte what the miss answered.

Only for deterministic models: a model with randomness (dropout at inference, sampling) would answer the first
draw forever. Off unless model-config.yaml's `handler: {cache: {...}}` turns it on (`serving.cache` in the spec).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from handlers import jsonio
from handlers.errors import ModelLoadError, SpecError
from handlers.request import Decoded
from handlers.spec import parse, require

logger = logging.getLogger(__name__)

HIT, MISS, EVICTED = "hit", "miss", "evicted"  # the `Outcome` label of tspack_cache_total
MB = 1024 * 1024
# Python's own cost per entry beyond the body bytes (key string, entry object, LRU link, timestamp): 419 B
# measured with tracemalloc on CPython 3.11, rounded up; counted so that many tiny answers cannot outgrow max_mb.
ENTRY_OVERHEAD_BYTES = 512


@dataclass(frozen=True)
class CacheConfig:
    """Bounds of one model's cache. max_mb counts the answers' bytes plus ENTRY_OVERHEAD_BYTES per entry;
    ttl_s: seconds an entry may answer (None: until evicted)."""

    max_entries: int = 4096
    max_mb: float = 64.0
    ttl_s: Optional[float] = None

    def __post_init__(self):
        require(self.max_entries >= 1, f"cache.max_entries: must be >= 1, got {self.max_entries}")
        require(self.max_mb > 0, f"cache.max_mb: must be > 0, got {self.max_mb}")
        require(self.max_mb * MB >= ENTRY_OVERHEAD_BYTES,
                f"cache.max_mb: {self.max_mb} holds no entry; give at least {ENTRY_OVERHEAD_BYTES / MB:.4f}")
        require(self.ttl_s is None or self.ttl_s > 0,
                f"cache.ttl_s: must be > 0 seconds, or null for no expiry; got {self.ttl_s}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * MB)


def cache_config(model_yaml_config: Optional[dict]) -> Optional[CacheConfig]:
    """The archive's `handler.cache` section, or None (no section, or `cache: null`): caching is off.

    Raises:
        ModelLoadError: the section is there but invalid (a hand-edited model-config.yaml; builds check it).
    """
    section = ((model_yaml_config or {}).get("handler") or {}).get("cache")
    if section is None or section is False:
        return None
    try:
        return parse(CacheConfig, section, "handler.cache")
    except SpecError as exc:
        raise ModelLoadError(f"model-config.yaml: {exc}") from exc


class Uncacheable(TypeError):
    """A request detail the key cannot hash faithfully (an object array, an unknown type): the request bypasses
    the cache rather than risk two different requests sharing an answer."""


def response_key(model: str, version: str, meta: dict, decoded: Decoded) -> str:
    """SHA-256 (hex) of everything the answer depends on: model, version, answer meta and the decoded request.

    Raises:
        Uncacheable: something in the request cannot be hashed faithfully.
    """
    digest = hashlib.sha256()
    for part in (model, version, meta, decoded.protocol, decoded.single, decoded.meta):
        _feed(digest, part)
    _feed(digest, len(decoded.inputs))
    for name, array in decoded.inputs.items():  # in the model's input order: the order is part of the request
        _feed(digest, name)
        _feed(digest, array)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    """Type-tagged, length-prefixed: [1, 2] and "1,2", or 1 and 1.0 and True, never feed the same bytes."""
    if isinstance(value, (list, tuple)):
        digest.update(b"L%d;" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(b"D%d;" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, str(k))):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (np.ndarray, np.generic)):
        if value.dtype.hasobject:  # the bytes of an object array are pointers, not values
            raise Uncacheable("cannot key an object array")
        array = np.asarray(value)
        digest.update(b"A" + array.dtype.str.encode() + b"%r;" % (array.shape,))
        digest.update(np.ascontiguousarray(array).data)
    else:
        digest.update(_scalar_bytes(value))


def _scalar_bytes(value: Any) -> bytes:
    if value is None:
        return b"N"
    if isinstance(value, bool):  # before int: True == 1
        return b"T" if value else b"F"
    if isinstance(value, int):
        return b"I%d;" % value
    if isinstance(value, float):
        return b"R" + value.hex().encode() + b";"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogatepass")
        return b"S%d;" % len(value) + value
    if isinstance(value, (bytes, bytearray)):
        return b"Y%d;" % len(value) + bytes(value)
    raise Uncacheable(f"cannot key a {type(value).__name__}")


@dataclass(frozen=True)
class CachedAnswer:
    """A 200 answer as stored: its exact body bytes. `body_json` is the JSON body (the metrics and the shadow
    read it parsed); `raw` is a binary body a front end answered instead, if any."""

    status: int
    body_json: bytes
    raw: Optional[bytes]
    content_type: str
    headers: tuple[tuple[str, str], ...]
    rows: int

    @classmethod
    def of(cls, answer: Any) -> CachedAnswer:
        return cls(answer.status, jsonio.dumps(answer.body), answer.raw, answer.content_type,
                   tuple(answer.headers.items()), answer.rows)

    @property
    def body(self) -> bytes:
        """The bytes the client gets."""
        return self.raw if self.raw is not None else self.body_json

    @property
    def size(self) -> int:
        return len(self.body_json) + (len(self.raw) if self.raw is not None else 0) + ENTRY_OVERHEAD_BYTES

    def answer_fields(self) -> dict:
        """Keyword arguments of a fresh `Answer` (a new body dict each time: a caller may change its own)."""
        return {"status": self.status, "body": jsonio.loads(self.body_json), "raw": self.body, "rows": self.rows,
                "content_type": self.content_type, "headers": dict(self.headers)}


class ResponseCache:
    """LRU of CachedAnswers within max_entries and max_bytes; entries older than ttl_s are dropped when met.

    `counts` arguments are a caller's {outcome: n}: hits, misses and evictions (LRU or expiry) are added there
    for the metrics, and to this cache's totals for `describe`.
    """

    def __init__(self, config: CacheConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.bytes = 0
        self.totals = {HIT: 0, MISS: 0, EVICTED: 0}
        self._entries: OrderedDict[str, tuple[CachedAnswer, float]] = OrderedDict()
        self._lock = threading.Lock()  # the worker is one thread today; a shadow or a future thread stays safe
        self._bypassed: set[str] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, counts: dict) -> Optional[CachedAnswer]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._expired(entry[1]):
                self._drop(key, counts)
                entry = None
            if entry is None:
                self._count(counts, MISS)
                return None
            self._entries.move_to_end(key)
            self._count(counts, HIT)
            return entry[0]

    def store(self, key: str, answer: CachedAnswer, counts: dict) -> bool:
        """Keep `answer` under `key`, evicting the least recently used entries to stay within bounds.

        Returns False (nothing stored, nothing evicted) for an answer larger than the whole cache.
        """
        if answer.size > self.config.max_bytes:
            return False
        with self._lock:
            if key in self._entries:  # two identical requests in one batch: both missed, one entry
                self.bytes -= self._entries.pop(key)[0].size
            while self._entries and (len(self._entries) >= self.config.max_entries
                                     or self.bytes + answer.size > self.config.max_bytes):
                self._drop(next(iter(self._entries)), counts)
            self._entries[key] = (answer, self.clock())
            self.bytes += answer.size
            return True

    def bypass(self, reason: BaseException) -> None:
        """A request or answer the cache leaves alone: served uncached, said once per kind in the worker log."""
        kind = type(reason).__name__
        if kind not in self._bypassed:
            self._bypassed.add(kind)
            logger.warning("response cache bypassed (said once): %s: %s", kind, reason)

    def describe(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "max_entries": self.config.max_entries,
                "max_bytes": self.config.max_bytes, "ttl_s": self.config.ttl_s, **self.totals}

    def _expired(self, stored_at: float) -> bool:
        return self.config.ttl_s is not None and self.clock() - stored_at > self.config.ttl_s

    def _drop(self, key: str, counts: dict) -> None:
        self.bytes -= self._entries.pop(key)[0].size
        self._count(counts, EVICTED)

    def _count(self, counts: dict, outcome: str) -> None:
        counts[outcome] = counts.get(outcome, 0) + 1
        self.totals[outcome] += 1


def cache_for(context: Any) -> Optional[ResponseCache]:
    """A new cache for one pipeline when the archive's model-config.yaml turns caching on, else None."""
    config = cache_config(getattr(context, "model_yaml_config", None))
    return ResponseCache(config) if config is not None else None
