"""Runtimes: what runs a decoded batch through the model. Chosen by the archive's format (handlers/registry.py's
RUNTIMES table), not by the handler class, so any front end pairs with any runtime."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from handlers.device import Placement
from handlers.errors import ModelLoadError, TspackError
from handlers.integrity import verify_sha256
from handlers.registry import RUNTIMES, load_class
from handlers.spec import ArtifactManifest


class Runtime(Protocol):
    name: str

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch: named inputs in, named outputs out, axis 0 = samples."""

    def describe(self) -> dict:
        """What runs the model, for `GET /models/{name}?customized=true`."""


def load_runtime(manifest: ArtifactManifest, model_dir: str, placement: Placement) -> Runtime:
    """Verify the model file's SHA-256, then load it with the runtime its manifest's format names.

    Raises:
        IntegrityError: the file differs from the one validated at build time.
        ModelLoadError: the file is missing or does not load.
    """
    spec = manifest.runtime
    path = os.path.join(model_dir, spec.file)
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file '{spec.file}' named in the manifest is not in the archive")
    verify_sha256(path, spec.sha256)
    try:
        return load_class(RUNTIMES[spec.format].cls)(manifest, path, placement, model_dir)
    except TspackError:
        raise
    except Exception as exc:  # any loader failure becomes one typed error naming the file
        raise ModelLoadError(f"cannot load '{spec.file}' as {spec.format}: {type(exc).__name__}: {exc}") from exc


def named_outputs(manifest: ArtifactManifest, out: object) -> dict[str, np.ndarray]:
    """A model's return value (a tensor or array, a tuple/list, or a dict) -> {output name: array}."""
    names = manifest.outputs
    if isinstance(out, dict):
        missing = [n for n in names if n not in out]
        if missing:
            raise ModelLoadError(f"model returned no output '{missing[0]}' (it returned {', '.join(out)})")
        values = [out[n] for n in names]
    elif isinstance(out, (tuple, list)):
        values = list(out)[:len(names)]
    else:
        values = [out]
    if len(values) != len(names):
        raise ModelLoadError(f"model returned {len(values)} outputs; the manifest names {len(names)}")
    return dict(zip(names, values))
