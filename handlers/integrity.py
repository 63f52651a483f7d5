"""SHA-256 of model files: the archiver records it, the handlers refuse to load on mismatch."""

from __future__ import annotations

import hashlib

from handlers.errors import IntegrityError

_CHUNK = 1 << 20


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
    """Raise IntegrityError when the file at `path` is not the one the build recorded."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise IntegrityError(
            f"{path}: SHA-256 {actual[:12]}... does not match the {expected[:12]}... recorded at build; "
            "the archive was modified after it was validated")
