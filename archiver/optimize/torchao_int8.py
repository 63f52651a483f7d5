"""int8 with torchao's `quantize_` (dynamic activations + int8 weights, or int8 weights only), then torch.export.

Measured on the digits MLP (batch 32, 1 thread): eager torchao int8 runs no faster than fp32 eager (39 vs 30 ms);
compiled with AOTInductor it reaches 7.6 ms, against 6.1 ms for pt2e static int8 and 7.9 ms for the deprecated
torch.ao quantize_dynamic. Use it through export_program + compile_aoti(freezing=True), not eagerly.
"""

from __future__ import annotations

import copy
from typing import Literal

from torch import nn

from archiver.optimize.pt2e import QuantizationFailed, torchao_available

__all__ = ["quantize_torchao"]

Mode = Literal["dynamic", "weight_only"]


def quantize_torchao(model: nn.Module, mode: Mode = "dynamic") -> nn.Module:
    """A quantized copy of `model`: its nn.Linear weights become torchao int8 tensors (the original is untouched).

    Args:
        model: the eager model, eval mode.
        mode: "dynamic" (Int8DynamicActivationInt8WeightConfig) or "weight_only" (Int8WeightOnlyConfig).
    Raises:
        QuantizationFailed: torchao is missing or quantize_ failed.
    """
    if not torchao_available():
        raise QuantizationFailed("int8 torchao: torchao is not installed or does not import; pip install the "
                                 "torchao version setup.cfg pins, or use quantization: onnx-dynamic")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()
    quantized = copy.deepcopy(model).eval()
    try:
        quantize_(quantized, config)
    except Exception as exc:  # torchao raises assorted types for unsupported layers
        raise QuantizationFailed(f"int8 torchao ({mode}): quantize_ failed: {type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}; use "
                                 "quantization: pt2e or leave the model in fp32") from exc
    return quantized
