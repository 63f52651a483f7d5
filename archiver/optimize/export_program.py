"""One torch.export.export per model: dynamic batch, the spec's free axes as Dims, strict first, then non-strict.

Every later stage (AOTInductor, dynamo ONNX, pt2e int8) starts from the ExportedProgram made here, so a model is
traced once and all its artifacts agree on the graph.
"""

from __future__ import annotations

import linecache
import re
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from archiver.errors import BuildError
from archiver.optimize.named_io import NamedIO

__all__ = ["ExportFailed", "DataDependentControlFlow", "export_program", "dynamic_shapes_for", "FreeAxes"]

# input name -> its free axes (tensor axes, batch = 0 excluded), either a list or {axis: axis name}. Axes that
# share a name share one Dim (sequence length of input_ids and attention_mask); unnamed axes get their own Dim,
# and torch.export's suggested equalities are applied when the model needs them equal.
FreeAxes = Mapping[str, Union[Sequence[int], Mapping[int, str]]]

BATCH = "batch"
# torch.export treats sizes 0 and 1 as static ("0/1 specialization"): a dynamic axis needs an example of >= 2.
MIN_DYNAMIC_EXAMPLE = 2
_TORCH_FRAME = re.compile(r"[/\\](torch|torchao|functorch)[/\\]")
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


class ExportFailed(BuildError):
    """torch.export could not capture the model, strict or not."""


class DataDependentControlFlow(ExportFailed):
    """The model branches on tensor values (`if x.sum() > 0:`), which a captured graph cannot hold."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _identifier(text: str) -> str:
    name = re.sub(r"\W", "_", text)
    return name if name[:1].isalpha() else f"d_{name}"


def dynamic_shapes_for(example: Mapping[str, torch.Tensor], free_axes: Optional[FreeAxes] = None,
                       input_names: Optional[Sequence[str]] = None) -> tuple[dict[int, Dim], ...]:
    """torch.export's dynamic_shapes for positional inputs in `input_names` order (default: the example's order).

    Axis 0 of every input is the one shared batch Dim (min 1); each free axis is a Dim, one per axis name.

    Raises:
        BuildError: a free axis is out of range or its example size is below 2 (torch.export would fix it).
    """
    names = list(input_names or example)
    free_axes = free_axes or {}
    unknown = [n for n in free_axes if n not in names]
    if unknown:
        raise BuildError(f"free axes: '{unknown[0]}' is not an input; inputs: {', '.join(names)}")
    dims: dict[str, Dim] = {BATCH: Dim(BATCH, min=1)}
    shapes = []
    for name in names:
        tensor = example[name]
        axes = free_axes.get(name, ())
        named = dict(axes) if isinstance(axes, Mapping) else {a: f"{name}_{a}" for a in axes}
        spec = {0: dims[BATCH]} if tensor.dim() >= 1 else {}
        for axis, axis_name in named.items():
            if not 1 <= axis < tensor.dim():
                raise BuildError(f"inputs.{name}: free axis {axis} is not an axis of its {tensor.dim()}-d example "
                                 "(axis 0 is the batch; free axes count from 1)")
            if tensor.shape[axis] < MIN_DYNAMIC_EXAMPLE:
                raise BuildError(f"inputs.{name}: the example's free axis {axis} has size {tensor.shape[axis]}; "
                                 f"use >= {MIN_DYNAMIC_EXAMPLE} (torch.export makes sizes 0 and 1 static)")
            key = _identifier(axis_name)
            spec[axis] = dims.setdefault(key, Dim(key, min=1))
        shapes.append(spec)
    return tuple(shapes)


def _batch_of_two(args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Repeat a batch-1 example to two rows: torch.export would otherwise bake batch 1 into the program."""
    if all(a.dim() >= 1 and a.shape[0] >= MIN_DYNAMIC_EXAMPLE for a in args):
        return args
    rows = max((a.shape[0] for a in args if a.dim() >= 1), default=1)
    if rows >= MIN_DYNAMIC_EXAMPLE:
        raise BuildError(f"inputs: the examples' batch sizes differ ({[tuple(a.shape)[:1] for a in args]}); "
                         "give every input the same number of rows")
    return tuple(torch.cat([a] * MIN_DYNAMIC_EXAMPLE) if a.dim() >= 1 else a for a in args)


def _is_data_dependent(exc: BaseException) -> bool:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    text = str(exc).lower()
    return isinstance(exc, GuardOnDataDependentSymNode) or "data-dependent" in text or "data dependent" in text


def _where(exc: BaseException) -> str:
    """The user's file and line from torch.export's message: the last frame outside torch."""
    frames = [(f, int(n)) for f, n in _FRAME.findall(str(exc)) if not _TORCH_FRAME.search(f)]
    if not frames:
        return "in the model"
    path, line = frames[-1]
    code = linecache.getline(path, line).strip()
    return f"{path}:{line}" + (f" ({code})" if code else "")


def _refuse_data_dependent(exc: BaseException) -> DataDependentControlFlow:
    return DataDependentControlFlow(
        f"torch.export: data-dependent control flow at {_where(exc)}: {_first_line(exc)}; rewrite the branch with "
        "torch.cond or torch.where, build format torchscript with method: script, or change the model")


def _export(module: nn.Module, args: tuple, shapes: tuple, strict: bool) -> tuple[ExportedProgram, list[str]]:
    """torch.export.export, applying torch's suggested Dim equalities once (unnamed axes the model ties)."""
    # NamedIO.forward takes *inputs: torch.export binds dynamic_shapes to the signature, one entry for the varargs.
    shapes = (shapes,)
    try:
        return torch.export.export(module, args, dynamic_shapes=shapes, strict=strict), []
    except torch._dynamo.exc.UserError as exc:
        if "Suggested fixes" not in str(exc) or _is_data_dependent(exc):
            raise
        from torch.export.dynamic_shapes import refine_dynamic_shapes_from_suggested_fixes

        message = getattr(exc, "msg", str(exc))  # msg: without the trailer torch appends, which the parser rejects
        fixes = [line.strip() for line in message.split("Suggested fixes:")[1].splitlines() if line.strip()]
        constant = [fix for fix in fixes if re.fullmatch(r"\w+ = \d+", fix)]
        if constant:
            # The model needs a declared free axis to have one fixed size (nn.LSTM does, in torch 2.13): the
            # program would serve only that size. Refuse rather than ship it.
            raise ExportFailed(f"torch.export cannot keep a free axis free: it needs {constant[0]} (the example's "
                               "size); declare that size in the spec's shape, or build format onnx or "
                               "torchscript") from exc
        refined = refine_dynamic_shapes_from_suggested_fixes(message, shapes)
        note = "free axes: applied torch.export's suggested fixes: " + "; ".join(fixes[:4])
        return torch.export.export(module, args, dynamic_shapes=refined, strict=strict), [note]


def export_program(module: nn.Module, example: Mapping[str, torch.Tensor], free_axes: Optional[FreeAxes] = None,
                   output_names: Optional[Sequence[str]] = None,
                   strict: Optional[bool] = None) -> tuple[ExportedProgram, list[str]]:
    """Capture `module` with torch.export: positional inputs in the example's order, a flat tuple out.

    Args:
        module: the eager model, or a NamedIO around it (its input order and output names then apply). A plain
            model is wrapped in NamedIO(module, list(example), output_names); read the names from
            `program.named_io_output_names` or wrap it yourself and call `discover` first.
        example: input name -> example tensor, in the spec's order. Batch 1 is repeated to 2 rows; free axes
            need sizes >= 2.
        free_axes: input name -> free axes (see FreeAxes).
        output_names: the spec's output names (only used when `module` is not a NamedIO).
        strict: True or False forces that mode; None tries strict, then non-strict.
    Returns:
        (ExportedProgram in eval mode, notes for the build report: e.g. that strict export failed and why).
    Raises:
        DataDependentControlFlow: the model branches on tensor values (message: file, line, what to do).
        ExportFailed: torch.export failed for another reason (message: torch's first line).
    """
    named = module if isinstance(module, NamedIO) else NamedIO(module, list(example), output_names)
    named.eval()
    if named.output_names is None:
        named.discover(example)
    args = _batch_of_two(named.ordered(example))
    shapes = dynamic_shapes_for(dict(zip(named.input_names, args)), free_axes, named.input_names)
    notes: list[str] = []
    modes = [strict] if strict is not None else [True, False]
    failures: list[BaseException] = []
    for mode in modes:
        try:
            with torch.no_grad():
                program, fixes = _export(named, args, shapes, mode)
        except BuildError:  # already one line that says what to do
            raise
        except Exception as exc:  # torch.export raises many types; each is reported by its first line
            if _is_data_dependent(exc):
                raise _refuse_data_dependent(exc) from exc
            failures.append(exc)
            if mode and len(modes) > 1:
                notes.append(f"strict torch.export failed ({_first_line(exc)[:300]}); exported with strict=False")
            continue
        program.named_io_output_names = named.output_names  # for callers that passed a plain model
        return program, notes + fixes
    if isinstance(failures[-1], ExportFailed):
        raise failures[-1]
    raise ExportFailed(f"torch.export failed: {_first_line(failures[-1])[:500]}; simplify the model's forward, "
                       "or build format torchscript") from failures[-1]
