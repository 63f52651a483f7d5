"""Exporters: eager model -> TorchScript (trace or script) or ONNX. Export only; `validate` checks the result."""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
from torch import nn

from archiver.errors import BuildError
from archiver.spec import SourceSpec
from handlers.imports import import_file

# Import failures users meet with model zoos, and what to change. torchvision (and timm, which imports it)
# registers compiled operators at import time, so a torchvision built for another torch fails there.
IMPORT_ADVICE: tuple[tuple[str, str], ...] = (
    ("operator torchvision::", "this torchvision was built for another torch; install the torchvision wheel built "
                               f"for torch {torch.__version__} (for a CPU torch, from the PyTorch CPU wheel index)"),
    ("No module named", "install it where `tspack build` runs; aoti, onnx and torchscript archives do not need "
                        "it to serve (state_dict archives do)"),
)


def import_advice(message: str) -> str:
    return next((f"; {advice}" for marker, advice in IMPORT_ADVICE if marker in message), "")


def import_object(reference: str, key: str = "source.model_class") -> object:
    """Import `path/to/file.py:Name` from a file path (the file need not be on sys.path)."""
    path, _, name = reference.partition(":")
    try:
        module = import_file(path)
    except ImportError as exc:
        raise BuildError(f"{key}: importing {path} failed: {exc}{import_advice(str(exc))}") from exc
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        raise BuildError(f"{key}: importing {path} failed: {message}{import_advice(message)}") from exc
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


def _library_file(path: str) -> bool:
    """Code of an installed package (torch, transformers, ...) rather than the user's own model file."""
    parts = os.path.abspath(path).split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


def to_torchscript(model: nn.Module, example: Optional[tuple], method: str,
                   notes: Optional[list[str]] = None) -> torch.jit.ScriptModule:
    """Trace or script `model`. A trace that depends on the input's values in the user's own code is refused.

    The tracer also warns inside installed libraries (Hugging Face models convert shapes to Python ints, torch's
    nn.LSTM checks its arguments): those warnings are kept as notes, and the build's validation at two lengths
    of every free axis catches a trace that baked one in.

    Raises:
        TraceUnsafe: the tracer warned, in the model's own code, that the trace may not generalise (a Python
            bool from a tensor, data-dependent control flow): such a trace bakes in the branch the example took.
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
            traced = torch.jit.trace(model, example, check_trace=False, strict=False)
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    own = [w for w in tracer if not _library_file(w.filename)]
    if own:
        first = str(own[0].message).splitlines()[0]
        raise TraceUnsafe(
            f"method 'trace': the model has data-dependent control flow at {own[0].filename}:{own[0].lineno}, so "
            f"a trace would bake in one branch ({first}); use method: script, or format aoti (torch.export)")
    if tracer and notes is not None:
        where = sorted({f"{os.path.basename(w.filename)}:{w.lineno}" for w in tracer})[:3]
        notes.append(f"trace: {len(tracer)} tracer warning(s) inside installed libraries ({', '.join(where)}); "
                     "checked by validation at two lengths")
    return traced


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
