"""int8 quantization: torch (dynamic, static, QAT) before TorchScript export, ONNX Runtime after ONNX export.

torch.ao.quantization still works on torch 2.13 but warns that it is deprecated (torchao and ONNX
Runtime are its successors); we silence that one warning here and record the fact in the build report.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

import numpy as np
import torch
from torch import nn

from archiver.errors import BuildError

DEPRECATION_NOTE = "torch.ao.quantization is deprecated upstream (successors: torchao, ONNX Runtime quantization)"
DYNAMIC_TYPES = {nn.Linear, nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell, nn.RNNCell}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation warnings of torch.ao and the per-tensor chatter ONNX Runtime logs at WARNING."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
            warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
            yield
    finally:
        logging.disable(previous)


def _engine() -> str:
    from handlers.runtimes.quantized import choose_quantized_engine

    engine = choose_quantized_engine()
    torch.backends.quantized.engine = engine
    return engine


def quantize_dynamic_torch(model: nn.Module) -> nn.Module:
    """int8 weights, activations quantized on the fly: Linear, LSTM and GRU layers.

    nn.TransformerEncoderLayer's fast path crashes on quantized Linear in torch 2.13, so models holding
    one are refused with a pointer to the ONNX Runtime path instead of failing at serve time.
    """
    fragile = [name for name, m in model.named_modules() if isinstance(m, (nn.TransformerEncoderLayer,
                                                                            nn.TransformerDecoderLayer))]
    if fragile:
        raise BuildError(
            f"quantize: torch dynamic int8 breaks nn.TransformerEncoderLayer/DecoderLayer in torch 2.13 (its fast "
            f"path crashes on quantized Linear; found '{fragile[0]}'); use format: onnx with quantize mode dynamic")
    if not any(type(m) in DYNAMIC_TYPES for m in model.modules()):
        raise BuildError("quantize: mode 'dynamic' needs Linear, LSTM or GRU layers; this model has none "
                         "(use mode 'static' for convolutions)")
    _engine()
    with _quiet():
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), DYNAMIC_TYPES, dtype=torch.qint8)


def quantize_static_torch(model: nn.Module, calibration: np.ndarray, batch: int = 32) -> nn.Module:
    """Post-training static int8 (FX graph mode): observers calibrated on `calibration`, then converted."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = _engine()
    example = (torch.from_numpy(calibration[:2]),)
    with _quiet():
        try:
            prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping(engine), example)
        except Exception as exc:
            raise BuildError(f"quantize: FX tracing of the model failed ({type(exc).__name__}: {exc}); "
                             "use format: onnx for static int8") from exc
        with torch.inference_mode():
            for start in range(0, len(calibration), batch):
                prepared(torch.from_numpy(calibration[start:start + batch]))
        return convert_fx(prepared)


Finetune = Callable[[nn.Module, int], Optional[nn.Module]]


def quantization_aware_training(model: nn.Module, example: np.ndarray, finetune: Finetune,
                                epochs: int = 1) -> nn.Module:
    """QAT: insert fake-quant observers, let the caller's `finetune(model, epoch)` train, then convert to int8."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    engine = _engine()
    with _quiet():
        prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping(engine),
                                  (torch.from_numpy(example[:2]),))
        for epoch in range(epochs):
            prepared = finetune(prepared, epoch) or prepared
        return convert_fx(prepared.eval())


def quantize_dynamic_onnx(source: str, target: str) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target + ".pre.onnx"
    try:
        with _quiet():
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            quantize_dynamic(prepared, target, weight_type=QuantType.QInt8)
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)


class ArrayCalibrationReader:
    """ONNX Runtime CalibrationDataReader over named arrays of samples, `batch` rows at a time."""

    def __init__(self, samples: dict[str, np.ndarray], batch: int = 16):
        rows = len(next(iter(samples.values())))
        self.batches = [{name: a[i:i + batch] for name, a in samples.items()} for i in range(0, rows, batch)]
        self.position = 0

    def get_next(self) -> Optional[dict]:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_static_onnx(source: str, target: str, calibration: dict[str, np.ndarray],
                         per_channel: bool = True) -> None:
    """QDQ static int8 with calibration data (MinMax), after ORT's recommended pre-processing."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(ArrayCalibrationReader, CalibrationDataReader):
        pass

    # The exporter drops inputs the graph does not use; ORT refuses feeds the graph does not have.
    graph_inputs = {i.name for i in onnx.load(source, load_external_data=False).graph.input}
    feeds = {name: a for name, a in calibration.items() if name in graph_inputs}
    prepared = target + ".pre.onnx"
    try:
        with _quiet():
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            quantize_static(prepared, target, Reader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        if os.path.exists(prepared):
            os.remove(prepared)
