"""JSON in and out of the handlers: orjson when the serving environment has it, else the standard library.

Parsing a 28x28 request takes ~45 us with orjson and ~250-500 us with `json`, as much as the model itself,
so the pack installs orjson; archives still serve without it. orjson refuses the non-standard NaN and
Infinity literals that Python's json emits and accepts, so a document it rejects is retried with `json`:
the slow path costs only malformed or non-standard bodies.
"""

from __future__ import annotations

import json
from typing import Any

try:
    import orjson
except ImportError:  # pragma: no cover - exercised where orjson is absent
    orjson = None


def loads(raw: bytes | str) -> Any:
    """Parse JSON; raises json.JSONDecodeError (or UnicodeDecodeError, RecursionError) like `json.loads`."""
    if orjson is not None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return json.loads(raw)


def dumps(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    if orjson is not None:
        try:
            return orjson.dumps(value)
        except TypeError:  # types orjson refuses (e.g. int > 64 bit): the standard library takes them
            pass
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
