"""TorchScript and eager (state_dict) models on CPU or CUDA."""

from __future__ import annotations

import inspect
import logging
import os

import numpy as np
import torch

from handlers.device import Placement
from handlers.errors import ModelLoadError
from handlers.imports import import_file
from handlers.runtimes import named_outputs
from handlers.spec import ArtifactManifest

logger = logging.getLogger(__name__)


def set_torch_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel op; a second model in-process lands here
        pass


def load_model_class(model_dir: str, model_class: str) -> type:
    """Import `file.py:ClassName` shipped in the archive, under a module name unique to this archive."""
    filename, _, class_name = model_class.partition(":")
    path = os.path.join(model_dir, filename)
    if not class_name or not os.path.isfile(path):
        raise ModelLoadError(f"model_class '{model_class}': expected 'file.py:ClassName' with the file in the archive")
    module = import_file(path, prefix="tspack_model")
    try:
        return getattr(module, class_name)
    except AttributeError as exc:
        raise ModelLoadError(f"model_class '{model_class}': {filename} defines no class {class_name}") from exc


def _takes_keywords(model: torch.nn.Module, names: list[str]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return len(names) > 1 and all(name in parameters for name in names)


class TorchRuntime:
    """Runs a TorchScript file (torch.jit.load) or a state_dict loaded into the archive's model class.

    Never unpickles a whole module: state dicts load with weights_only=True.
    """

    def __init__(self, manifest: ArtifactManifest, path: str, placement: Placement, model_dir: str):
        spec = manifest.runtime
        self.manifest = manifest
        set_torch_threads(placement.threads)
        self.device = torch.device(placement.device)
        self.placement = placement
        if spec.format == "torchscript":
            self.name = "torchscript"
            model = torch.jit.load(path, map_location=self.device)
        else:
            self.name = "eager"
            cls = load_model_class(model_dir, spec.model_class)
            model = cls(**spec.model_kwargs)
            state = torch.load(path, map_location=self.device, weights_only=True)
            model.load_state_dict(state)
            model.to(self.device)
        model.eval()
        self.half = spec.precision == "fp16"
        if self.half and not placement.is_cuda:
            # fp16 kernels on CPU are slow or missing; serve the same weights in fp32 rather than fail.
            logger.warning("fp16 artifact on CPU: running it in float32")
            model = model.float()
            self.half = False
        self.model = model
        self.precision = "fp16" if self.half else "fp32"
        self.input_names = [i.name for i in manifest.inputs]
        # An eager class is called the way its forward is written: by input name when it names them all.
        self.by_keyword = spec.format != "torchscript" and _takes_keywords(model, self.input_names)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            args = []
            for spec in self.manifest.inputs:
                x = torch.from_numpy(inputs[spec.name])
                if self.device.type != "cpu":
                    x = x.to(self.device, non_blocking=True)
                if self.half and x.is_floating_point():
                    x = x.half()
                args.append(x)
            out = self.model(**dict(zip(self.input_names, args))) if self.by_keyword else self.model(*args)
            return {name: value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
                    for name, value in named_outputs(self.manifest, out).items()}

    def describe(self) -> dict:
        return {
            "runtime": self.name, "device": str(self.device), "precision": self.precision,
            "intra_op_threads": torch.get_num_threads(), "torch": torch.__version__,
        }


def torchscript_runtime(manifest: ArtifactManifest, path: str, placement: Placement, model_dir: str) -> TorchRuntime:
    """TorchScript archives: int8 ones need the quantized engine chosen before they load."""
    if manifest.runtime.quantization:
        from handlers.runtimes.quantized import QuantizedTorchRuntime

        return QuantizedTorchRuntime(manifest, path, placement, model_dir)
    return TorchRuntime(manifest, path, placement, model_dir)
