"""ONNX through torch.export: torch.onnx.export(dynamo=True), the legacy TorchScript exporter only as a fallback.

torch 2.9+ defaults to the dynamo exporter and warns on the legacy one; the fallback exists for models the new
one cannot convert yet, and the build report names it with the reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence
from contextlib import redirect_stdout
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.export import ExportedProgram

from archiver.errors import BuildError

__all__ = ["OnnxExportFailed", "to_onnx_dynamo", "MIN_DYNAMO_OPSET"]

# The dynamo exporter emits opset 18 and newer; an older requested opset is converted down by onnx's version
# converter, which fails on some ops. We raise the request to 18 rather than fail.
MIN_DYNAMO_OPSET = 18


class OnnxExportFailed(BuildError):
    """Neither the dynamo nor the legacy ONNX exporter could convert the model."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _legacy_axes(dynamic_shapes: Optional[Sequence[Any]], input_names: Sequence[str],
                 output_names: Sequence[str]) -> dict[str, dict[int, str]]:
    """torch.export dynamic_shapes (one {axis: Dim} per input) -> the legacy exporter's dynamic_axes."""
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in [*input_names, *output_names]}
    for name, spec in zip(input_names, dynamic_shapes or ()):
        for axis, dim in (spec or {}).items():
            axes[name][axis] = getattr(dim, "__name__", f"{name}_{axis}")
    return axes


def to_onnx_dynamo(program_or_module: Union[ExportedProgram, nn.Module], example: Mapping[str, torch.Tensor],
                   path: str, input_names: Sequence[str], output_names: Sequence[str], opset: int = MIN_DYNAMO_OPSET,
                   dynamic_shapes: Optional[Sequence[Any]] = None, legacy_reason: Optional[str] = None) -> list[str]:
    """Write an ONNX file of a positional-inputs, tuple-output model (NamedIO or its ExportedProgram).

    Args:
        program_or_module: the ExportedProgram from export_program (preferred: its dynamic shapes are already in
            it), or a NamedIO module (then `dynamic_shapes` applies, as from dynamic_shapes_for).
        example: input name -> example tensor.
        path: the .onnx file; weights are kept inside it (one file per archive; this caps models at 2 GB).
        input_names, output_names: the ONNX graph's names, in NamedIO's order.
        opset: requested opset; raised to MIN_DYNAMO_OPSET for the dynamo exporter (a note says so).
        dynamic_shapes: per input {axis: Dim}, for a module (ignored for a program).
        legacy_reason: use the legacy exporter straight away, for this reason (custom symbolics registered with
            torch.onnx.register_custom_op_symbolic reach only the legacy exporter).
    Returns:
        notes for the build report: opset raised, legacy exporter used and why.
    Raises:
        OnnxExportFailed: both exporters failed (message: both first lines).
    """
    args = tuple(example[name] for name in input_names)
    notes: list[str] = []
    if opset < MIN_DYNAMO_OPSET:
        notes.append(f"onnx: opset {opset} raised to {MIN_DYNAMO_OPSET}, the dynamo exporter's lowest")
    is_program = isinstance(program_or_module, ExportedProgram)
    try:
        if legacy_reason:
            raise _LegacyWanted(legacy_reason)
        # The exporter prints its progress ("[torch.onnx] Obtain model graph...") to stdout; keep the CLI's clean.
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(program_or_module, args, path, input_names=list(input_names),
                              output_names=list(output_names), opset_version=max(opset, MIN_DYNAMO_OPSET),
                              dynamo=True, external_data=False,
                              dynamic_shapes=None if is_program else ((dynamic_shapes,) if dynamic_shapes else None))
        return notes
    except Exception as exc:  # the dynamo exporter fails with many types; the fallback is tried for each
        dynamo_error = exc
    module = program_or_module.module() if is_program else program_or_module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its own deprecation warning: the note below says it instead
            torch.onnx.export(module, args, path, input_names=list(input_names), output_names=list(output_names),
                              opset_version=opset, dynamo=False,
                              dynamic_axes=_legacy_axes(dynamic_shapes, input_names, output_names))
    except Exception as exc:
        raise OnnxExportFailed(f"format 'onnx': the dynamo exporter failed ({_first_line(dynamo_error)}) and the "
                               f"legacy one too ({_first_line(exc)}); build format aoti or torchscript") from exc
    notes = [n for n in notes if "raised" not in n]
    why = legacy_reason or f"the dynamo exporter failed ({_first_line(dynamo_error)})"
    notes.append(f"onnx: {why}; used the legacy TorchScript-based exporter (deprecated upstream)")
    return notes


class _LegacyWanted(Exception):
    """The caller asked for the legacy exporter."""
