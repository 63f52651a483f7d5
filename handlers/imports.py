"""Importing a Python file by path: a model class shipped in an archive, or a user's file at build time."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from types import ModuleType


def import_file(path: str, prefix: str = "tspack_src") -> ModuleType:
    """Import the file at `path` as a module of its own.

    The module is named after the file's full path (`<prefix>_<stem>_<sha256 of the path>`), so two files both
    called model.py do not replace each other in sys.modules. Exceptions of the file's own code propagate.

    Raises:
        ImportError: `path` is not an importable Python file.
    """
    digest = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
    name = f"{prefix}_{os.path.splitext(os.path.basename(path))[0]}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
