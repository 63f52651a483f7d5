"""int8 on the supported path: pt2e static quantization (torchao's X86InductorQuantizer), then AOTInductor.

In torch 2.13, pt2e lives in torchao only (torch.ao.quantization.quantize_pt2e is gone) and torch.ao's eager
quantization warns that it will be removed. The quantized program keeps quantize/dequantize pairs that inductor's
freezing passes fuse into int8 GEMM/conv kernels, so compile it with freezing=True.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
from torch.export import ExportedProgram

from archiver.errors import BuildError
from archiver.optimize.export_program import FreeAxes, dynamic_shapes_for
from archiver.optimize.named_io import NamedIO

__all__ = ["QuantizationFailed", "quantize_pt2e_static", "torchao_available"]


class QuantizationFailed(BuildError):
    """pt2e quantization could not prepare, calibrate or convert the model."""


def torchao_available() -> bool:
    """True when torchao (which holds pt2e and the X86 quantizer) imports."""
    try:
        import torchao  # noqa: F401
    except Exception:  # a torchao built for another torch fails with ImportError, OSError or RuntimeError
        return False
    return True


def _quantizer():
    # Importing this module sets torch._inductor.config.pre_grad_custom_pass and registers int8 fusion patterns
    # for the whole process: import it only on the int8 path.
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    return X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())


def quantize_pt2e_static(named: NamedIO, example: Mapping[str, torch.Tensor],
                         calibration: Iterable[Mapping[str, torch.Tensor]],
                         free_axes: Optional[FreeAxes] = None) -> tuple[ExportedProgram, list[str]]:
    """Static int8 (per-channel weights, per-tensor activations) calibrated on `calibration`, as an ExportedProgram.

    Args:
        named: the model wrapped in NamedIO (its output names discovered).
        example: input name -> example tensor (batch >= 2 and free axes >= 2, as for export_program).
        calibration: batches of inputs by name; a few hundred samples from the spec's samples are enough.
        free_axes: as for export_program.
    Returns:
        (the quantized ExportedProgram, to compile with compile_aoti(freezing=True); notes for the report).
    Raises:
        QuantizationFailed: torchao is missing, or a pt2e step failed (message: the step and its first line).
    """
    if not torchao_available():
        raise QuantizationFailed("int8 pt2e: torchao is not installed or does not import; pip install the "
                                 "torchao version setup.cfg pins, or use quantization: onnx-dynamic")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    named.eval()
    if named.output_names is None:
        named.discover(example)
    args = named.ordered(example)
    per_input = dynamic_shapes_for(dict(zip(named.input_names, args)), free_axes, named.input_names)
    # NamedIO.forward(*inputs) binds all inputs to one varargs parameter; the converted GraphModule takes them
    # as separate positional parameters.
    shapes = (per_input,)
    step = "export"
    try:
        with torch.no_grad():
            captured = torch.export.export(named, args, dynamic_shapes=shapes).module()
            step = "prepare"
            prepared = prepare_pt2e(captured, _quantizer())
            step = "calibrate"
            batches = 0
            for batch in calibration:
                prepared(*named.ordered(batch))
                batches += 1
            if not batches:
                raise ValueError("no calibration batch was given")
            step = "convert"
            converted = convert_pt2e(prepared)
            step = "re-export"
            program = torch.export.export(converted, args, dynamic_shapes=per_input)
    except BuildError:
        raise
    except Exception as exc:  # each pt2e step fails with its own types
        text = str(exc).strip()
        raise QuantizationFailed(f"int8 pt2e: {step} failed: {type(exc).__name__}: "
                                 f"{text.splitlines()[0][:300] if text else ''}; use quantization: onnx-static or "
                                 "leave the model in fp32") from exc
    return program, [f"int8: pt2e static (X86InductorQuantizer), calibrated on {batches} batches"]
