"""AOTInductor packages (.pt2): a torch.export program compiled ahead of time to C++ kernels, no Python model code.

Ships inside archives, so it imports only torch, numpy and handlers.*. The package was built by
archiver/optimize/aoti.py from a NamedIO program: inputs positional in the manifest's input order, outputs a flat
tuple in the manifest's output order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from handlers.device import Placement
from handlers.errors import ModelLoadError, RowCountMismatch, ShapeMismatch
from handlers.runtimes.torch import set_torch_threads
from handlers.spec import ArtifactManifest

logger = logging.getLogger(__name__)


THREADS_METADATA = "tspack.threads"  # these two are written by archiver/optimize/aoti.py
AXES_METADATA = "tspack.input_axes"


def _metadata(loader: object) -> dict:
    """The package's metadata (device, ISA, tspack.threads); empty when the loader has none."""
    try:
        return dict(loader.get_metadata())
    except Exception:  # older packages, or a loader without metadata
        return {}


def _load(path: str, device_index: int) -> object:
    """The package's C++ loader, called with a flat list of tensors (NamedIO programs take and return flat tuples).

    torch._inductor.aoti_load_package would import all of inductor and dynamo first (2-4.5 s of a worker's cold
    start here) and re-parses the call spec on every call (digits CNN at batch 1: 119 us per call against 58 us
    through the loader). Falls back to it when this torch has no torch._C._aoti.
    """
    aoti = getattr(torch._C, "_aoti", None)
    if aoti is not None and hasattr(aoti, "AOTIModelPackageLoader"):
        return aoti.AOTIModelPackageLoader(path, "model", False, 1, device_index)
    from torch._inductor import aoti_load_package

    return _Unboxed(aoti_load_package(path, device_index=device_index))


class _Unboxed:
    """aoti_load_package's model behind the loader's boxed_run(list) -> list."""

    def __init__(self, model: object):
        self.model = model

    def boxed_run(self, inputs: list) -> list:
        out = self.model(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def get_metadata(self) -> dict:
        return self.model.get_metadata()


class _AxesGuard:
    """Checks inputs against the program's shapes before the kernels see them: the kernels check nothing, and read
    out of bounds when rows differ between inputs, a static axis has another size, or a length passes its max."""

    def __init__(self, names: tuple[str, ...], shapes: list[list], ranges: dict[str, list]):
        self.names, self.shapes, self.ranges = names, shapes, ranges

    @classmethod
    def from_metadata(cls, text: Optional[str], names: tuple[str, ...]) -> Optional[_AxesGuard]:
        """None for packages built without the metadata (then only the manifest's shapes are checked)."""
        if not text:
            return None
        data = json.loads(text)
        return cls(names, data["inputs"], data.get("ranges", {})) if len(data["inputs"]) == len(names) else None

    def check(self, arrays: list[np.ndarray]) -> None:
        seen: dict[str, tuple[str, int, int]] = {}
        for name, array, dims in zip(self.names, arrays, self.shapes):
            if array.ndim != len(dims):
                raise ShapeMismatch(f"input '{name}': expected {len(dims)} axes (rows first), got {array.ndim}")
            for axis, (want, got) in enumerate(zip(dims, array.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise ShapeMismatch(f"input '{name}': axis {axis} must be {want}, got {got}")
                    continue
                if want in seen and seen[want][2] != got:
                    other, other_axis, size = seen[want]
                    error = RowCountMismatch if axis == 0 and other_axis == 0 else ShapeMismatch
                    raise error(f"input '{name}': axis {axis} has {got} but input '{other}' axis {other_axis} has "
                                f"{size}; the model needs them equal")
                seen.setdefault(want, (name, axis, got))
                low, high = self.ranges.get(want, (None, None))
                if (low is not None and got < low) or (high is not None and got > high):
                    raise ShapeMismatch(f"input '{name}': axis {axis} is {got}; the model takes {low} to {high}")


class AotiRuntime:
    """Runs an AOTInductor package on the worker's device with the worker's threads.

    A CPU package on a GPU worker runs on the CPU (kernels are compiled for one device type); the reverse cannot
    load and fails with ModelLoadError.
    """

    name = "aoti"

    def __init__(self, manifest: ArtifactManifest, path: str, placement: Placement, model_dir: Optional[str] = None,
                 input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None):
        self.input_names = tuple(input_names or (i.name for i in manifest.inputs))
        self.output_names = tuple(output_names or manifest.outputs)
        # Compiled kernels trust their inputs: a static axis of another size is read out of bounds, not refused.
        self.specs = {i.name: (tuple(i.shape), np.dtype(i.dtype)) for i in manifest.inputs
                      if i.name in self.input_names}
        self.placement = placement
        set_torch_threads(placement.threads)
        device = torch.device(placement.device)
        try:
            self.loader = _load(path, device.index if device.type == "cuda" else -1)
        except Exception as exc:
            raise ModelLoadError(f"cannot load AOTInductor package '{path}': {type(exc).__name__}: {exc}; it must be "
                                 "built with the same torch version and for this device type") from exc
        metadata = _metadata(self.loader)
        self.axes = _AxesGuard.from_metadata(metadata.get(AXES_METADATA), self.input_names)
        compiled_threads = metadata.get(THREADS_METADATA, "")
        self.compiled_threads = int(compiled_threads) if compiled_threads.isdigit() else None
        if self.compiled_threads and self.compiled_threads != placement.threads:
            # The CPU kernels run `omp parallel num_threads(N)` with N fixed at compile time: measured on the digits
            # CNN, a package built for 2 threads ran 20x slower in a 1-thread worker on a busy 2-core host.
            logger.warning("tspack aoti: the package's CPU kernels were compiled for %d threads and this worker has "
                           "%d; rebuild with runtime.intra_op_threads: %d", self.compiled_threads, placement.threads,
                           placement.threads)
        if metadata.get("AOTI_DEVICE_KEY", "cpu") == "cpu" and device.type == "cuda":
            logger.warning("tspack aoti: the package is compiled for the CPU; running it on the CPU, not %s", device)
            device = torch.device("cpu")
        self.device = device
        logger.info("tspack aoti: device=%s threads=%d inputs=%s outputs=%s", self.device, placement.threads,
                    ",".join(self.input_names), ",".join(self.output_names))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Named arrays in (axis 0 = rows), named arrays out, in the manifest's output order."""
        arrays = [self._checked(name, inputs[name]) for name in self.input_names]
        if self.axes:
            self.axes.check(arrays)
        args = []
        for array in arrays:
            tensor = torch.from_numpy(array)
            args.append(tensor.to(self.device, non_blocking=True) if self.device.type != "cpu" else tensor)
        with torch.inference_mode():
            values = self.loader.boxed_run(args)  # takes the list: its tensors are released as the model runs
        if len(values) != len(self.output_names):
            raise ModelLoadError(f"the package returned {len(values)} outputs; the manifest names "
                                 f"{len(self.output_names)}: {', '.join(self.output_names)}")
        return {name: value.detach().cpu().numpy() for name, value in zip(self.output_names, values)}

    def _checked(self, name: str, array: np.ndarray) -> np.ndarray:
        """The array in the declared dtype, contiguous; ShapeMismatch when a static axis differs from the spec."""
        if name not in self.specs:
            return np.ascontiguousarray(array)
        shape, dtype = self.specs[name]
        sample = array.shape[1:]
        if len(sample) != len(shape) or any(want not in (-1, got) for want, got in zip(shape, sample)):
            raise ShapeMismatch(f"input '{name}': expected rows of shape {list(shape)} (-1: any), got {list(sample)}")
        return np.ascontiguousarray(array, dtype=dtype)

    def describe(self) -> dict:
        return {
            "runtime": self.name, "device": str(self.device), "intra_op_threads": torch.get_num_threads(),
            "compiled_threads": self.compiled_threads,
            "inputs": list(self.input_names), "outputs": list(self.output_names), "torch": torch.__version__,
        }
