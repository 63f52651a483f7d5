"""Open Inference Protocol v2 metadata of tspack archives, as pure functions over their manifests.

`GET /v2/models/NAME` needs each input's and output's name, datatype and shape (-1 for a free axis). The OIP
gateway reads them from the archive's `tspack-manifest.json` rather than from the handler's `describe`: the
manifest is there whether or not a worker is up, and a describe call waits in the worker's queue behind inference.
Inputs come from the manifest's input specs (with the batch axis in front); outputs from what validation saw the
served runtime return (`validation.output_tensors`, written by the build since the gateway exists).
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from archiver import __version__
from handlers.oip import datatype_of

MANIFEST = "tspack-manifest.json"
ROUTER_VARIANTS = "variants/"  # an A/B router archive holds each variant's manifest under variants/<name>/
EXTENSIONS = ("binary_tensor_data",)
ANY = -1

# The runtime's format -> the platform string OIP clients know (Triton's names where it has one).
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch", "aoti": "pytorch_aoti",
             "state_dict": "pytorch_eager"}
ROUTER_PLATFORM = "tspack_ab_router"


def server_metadata() -> dict:
    return {"name": "tspack", "version": __version__, "extensions": list(EXTENSIONS)}


def _tensor_inputs(manifest: dict) -> list[dict]:
    return [{"name": spec["name"], "datatype": datatype_of(np.empty(0, dtype=spec.get("dtype", "float32"))),
             "shape": [ANY, *spec["shape"]]} for spec in manifest.get("inputs", [])]


def _text_inputs(manifest: dict) -> list[dict]:
    # The text front end takes one BYTES input of any name: one UTF-8 text per element.
    return [{"name": "text", "datatype": "BYTES", "shape": [ANY]}]


def _no_inputs(manifest: dict) -> list[dict]:
    # Image archives take encoded images at /predictions; their OIP infer has no tensor to describe.
    return []


# The archive's front end -> what its OIP infer takes.
FRONTEND_INPUTS: dict[str, Callable[[dict], list[dict]]] = {
    "tensor": _tensor_inputs, "text": _text_inputs, "image": _no_inputs}


def _outputs(manifest: dict) -> list[dict]:
    """Each output as validation saw the served runtime return it; for archives built before that was recorded,
    the datatype every runtime returns (FP32) and, for a classifier, one score per label."""
    seen = (manifest.get("validation") or {}).get("output_tensors") or {}
    labels = (manifest.get("output") or {}).get("labels") or []
    outputs = []
    for name in manifest.get("outputs", ["output"]):
        if name in seen:
            outputs.append({"name": name, **seen[name]})
        else:
            outputs.append({"name": name, "datatype": "FP32", "shape": [ANY, len(labels)] if labels else [ANY]})
    return outputs


def model_metadata(name: str, versions: list[str], manifest: dict, router: bool = False) -> dict:
    """The body of `GET /v2/models/NAME[/versions/V]` for an archive whose manifest is `manifest` (for an A/B
    router, its first variant's: every variant takes the same inputs)."""
    runtime = (manifest.get("runtime") or {}).get("format", "")
    return {"name": name, "versions": list(versions),
            "platform": ROUTER_PLATFORM if router else PLATFORMS.get(runtime, f"tspack_{runtime}"),
            "inputs": FRONTEND_INPUTS.get(manifest.get("frontend", "tensor"), _no_inputs)(manifest),
            "outputs": _outputs(manifest)}


def read_manifest(archive: str) -> tuple[dict, bool]:
    """The manifest in a .mar (an A/B router's first variant's) and whether the archive is a router.

    Raises: OSError, zipfile.BadZipFile, KeyError (no manifest in it), ValueError (not JSON).
    """
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        if MANIFEST in names:
            return json.loads(z.read(MANIFEST)), False
        variants = sorted(n for n in names if n.startswith(ROUTER_VARIANTS) and n.endswith("/" + MANIFEST))
        if not variants:
            raise KeyError(f"{os.path.basename(archive)} holds no {MANIFEST}: not a tspack archive")
        return json.loads(z.read(variants[0])), True


class ManifestCache:
    """Manifests by archive path, read again only when the file changes (a registered archive rarely does)."""

    def __init__(self):
        self._cache: dict[str, tuple[tuple, tuple[dict, bool]]] = {}
        self._lock = threading.Lock()

    def get(self, archive: str) -> tuple[dict, bool]:
        stat = os.stat(archive)
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached: Optional[tuple[tuple, Any]] = self._cache.get(archive)
        if cached and cached[0] == stamp:
            return cached[1]
        value = read_manifest(archive)
        with self._lock:
            self._cache[archive] = (stamp, value)
        return value
