"""int8 TorchScript models (dynamic or static quantization) with the quantized engine suited to this CPU."""

from __future__ import annotations

import platform

import torch

from handlers.device import Placement
from handlers.runtimes.torch import TorchRuntime
from handlers.spec import ArtifactManifest


def choose_quantized_engine() -> str:
    """x86 (fbgemm + onednn) on Intel/AMD, qnnpack on ARM; the first the build supports."""
    supported = torch.backends.quantized.supported_engines
    arm = platform.machine().lower() in ("aarch64", "arm64")
    preferred = ("qnnpack", "x86", "fbgemm") if arm else ("x86", "fbgemm", "onednn", "qnnpack")
    for engine in preferred:
        if engine in supported:
            return engine
    return torch.backends.quantized.engine


class QuantizedTorchRuntime(TorchRuntime):
    """A TorchRuntime that selects the quantized engine before the int8 model loads."""

    def __init__(self, manifest: ArtifactManifest, path: str, placement: Placement, model_dir: str):
        self.engine = choose_quantized_engine()
        torch.backends.quantized.engine = self.engine
        # int8 kernels run on the CPU only.
        cpu = Placement(device="cpu", gpu_id=placement.gpu_id, threads=placement.threads)
        super().__init__(manifest, path, cpu, model_dir)
        self.scheme = manifest.runtime.quantization
        self.name = f"{self.name}-int8"

    def describe(self) -> dict:
        return {**super().describe(), "quantization": self.scheme, "quantized_engine": self.engine}
