"""Exporters: eager model -> TorchScript (trace or script) or ONNX. Export only; `validate` checks the result."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import Any, Optional

import torch
from torch import nn

from archiver.errors import BuildError
from archiver.spec import SourceSpec


def import_object(reference: str, key: str = "source.model_class") -> object:
    """Import `path/to/file.py:Name` from a file path (the file need not be on sys.path)."""
    path, _, name = reference.partition(":")
    module_name = "tspack_src_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"{key}: cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise BuildError(f"{key}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    if not name:
        return module
    if not hasattr(module, name):
        raise BuildError(f"{key}: {path} defines no '{name}'")
    return getattr(module, name)


def load_eager(source: SourceSpec) -> nn.Module:
    """The reference model every artifact is validated against, in eval mode on the CPU.

    State dicts are read with weights_only=True: a checkpoint cannot run code on load.
    """
    if source.torchscript:
        try:
            return torch.jit.load(source.torchscript, map_location="cpu").eval()
        except Exception as exc:
            raise BuildError(f"source.torchscript: {source.torchscript} is not a TorchScript file: {exc}") from exc
    cls = import_object(source.model_class)
    try:
        model = cls(**source.kwargs)
    except TypeError as exc:
        raise BuildError(f"source.kwargs: {source.class_name}(**{source.kwargs}) failed: {exc}") from exc
    try:
        state = torch.load(source.weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BuildError(f"source.weights: {source.weights} is not a loadable state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"source.weights: do not fit {source.class_name}: {first}") from exc
    return model.eval()


class TraceUnsafe(BuildError):
    """Tracing recorded one path through data-dependent control flow."""


def to_torchscript(model: nn.Module, example: torch.Tensor, method: str) -> torch.jit.ScriptModule:
    """Trace or script `model`. A trace that depends on the input's values is refused.

    Raises:
        TraceUnsafe: the tracer warned that the trace may not generalise (a Python bool from a tensor,
            data-dependent control flow): such a trace bakes in the branch the example took.
        BuildError: scripting failed (unsupported Python in the model).
    """
    if isinstance(model, torch.jit.ScriptModule):
        return model
    if method == "script":
        try:
            return torch.jit.script(model)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0]
            raise BuildError(f"method 'script': TorchScript cannot compile the model: {first}") from exc
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    # torch's own modules (nn.LSTM's argument checks) warn too; only the model's own code can bake in a branch.
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    tracer_warnings = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                       and not os.path.abspath(w.filename).startswith(torch_dir)]
    if tracer_warnings:
        first = str(tracer_warnings[0].message).splitlines()[0]
        raise TraceUnsafe(
            f"method 'trace': the model has data-dependent control flow, so a trace would bake in one branch "
            f"({first}); use method: script")
    return traced


def to_onnx(model: nn.Module, example: torch.Tensor, path: str, opset: int, input_name: str = "input",
            output_name: str = "output", dynamic_axes: Optional[dict[str, Any]] = None) -> None:
    """Export with named input/output and a dynamic batch axis (plus any free axes given)."""
    axes = dynamic_axes or {input_name: {0: "batch"}, output_name: {0: "batch"}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), path, opset_version=opset, input_names=[input_name],
                              output_names=[output_name], dynamic_axes=axes, dynamo=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"format 'onnx': export failed: {first}") from exc


def optimize_onnx_graph(source: str, target: str) -> None:
    """ONNX Runtime's offline graph optimization (constant folding, fusions), saved as a model file.

    Extended level, not 'all': the layout rewrites of 'all' tie the file to the CPU that wrote it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = target + ".opt"
    options.optimized_model_filepath = tmp
    try:
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BuildError(f"optimize_graph: ONNX Runtime could not optimize the model: {exc}") from exc
    os.replace(tmp, target)
