"""Runtimes: what runs a decoded batch through the model. Chosen by the archive, not by the handler class,
so any front end (tensor, image) pairs with any runtime (TorchScript, eager, ONNX Runtime, int8)."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from handlers.device import Placement
from handlers.errors import ModelLoadError, TspackError
from handlers.integrity import verify_sha256
from handlers.spec import ArtifactManifest


class Runtime(Protocol):
    name: str

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch (leading axis = samples) and return the first output, one row per sample."""

    def describe(self) -> dict:
        """What runs the model, for `GET /models/{name}?customized=true`."""


def load_runtime(manifest: ArtifactManifest, model_dir: str, placement: Placement) -> Runtime:
    """Verify the model file's SHA-256, then load it with the runtime its manifest names.

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
        if spec.format == "onnx":
            from handlers.runtimes.onnx import OnnxRuntime

            return OnnxRuntime(manifest, path, placement)
        if spec.quantization:
            from handlers.runtimes.quantized import QuantizedTorchRuntime

            return QuantizedTorchRuntime(manifest, path, placement, model_dir)
        from handlers.runtimes.torch import TorchRuntime

        return TorchRuntime(manifest, path, placement, model_dir)
    except TspackError:
        raise
    except Exception as exc:  # any loader failure becomes one typed error naming the file
        raise ModelLoadError(f"cannot load '{spec.file}' as {spec.format}: {type(exc).__name__}: {exc}") from exc
