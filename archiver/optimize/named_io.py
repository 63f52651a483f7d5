"""Named inputs in, a flat tuple of named tensors out: the calling convention every exporter here relies on.

torch.export, AOTInductor and the ONNX exporter all want positional tensors in and tensors out, while models take
keywords (`input_ids=`, `attention_mask=`) and return dicts, NamedTuples or Hugging Face `ModelOutput`s.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import nn

from archiver.errors import BuildError

__all__ = ["NamedIO", "OutputError", "flatten_output"]


class OutputError(BuildError):
    """The model's return value is not a tensor, a tuple/list, a dict or a NamedTuple of tensors."""


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def flatten_output(out: Any, names: Optional[Sequence[str]] = None) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    """A model's return value -> (names, tensors) in a fixed order.

    Args:
        out: a Tensor, tuple/list, dict (Hugging Face ModelOutput included: its None fields are skipped),
            or NamedTuple of tensors.
        names: the spec's output names. A tensor takes the one name; a tuple/list takes them in order; a dict
            or NamedTuple is reordered (and narrowed) to them.
    Returns:
        (output names, tensors), same length.
    Raises:
        OutputError: a value is not a tensor, or `names` does not fit the output.
    """
    if isinstance(out, torch.Tensor):
        if names and len(names) != 1:
            raise OutputError(f"outputs: the model returns one tensor; the spec names {len(names)}: {list(names)}")
        pairs = [(names[0] if names else "output", out)]
    elif isinstance(out, Mapping) or _is_namedtuple(out):
        # ModelOutput is an OrderedDict whose unset fields are None; NamedTuple fields are its names.
        items = out.items() if isinstance(out, Mapping) else zip(out._fields, out)
        found = {str(k): v for k, v in items if v is not None}
        pairs = _select(found, names) if names else list(found.items())
    elif isinstance(out, (tuple, list)):
        if names and len(names) != len(out):
            raise OutputError(f"outputs: the model returns {len(out)} values; the spec names {len(names)}: "
                              f"{list(names)}; give one name per value")
        pairs = list(zip(names or [f"output_{i}" for i in range(len(out))], out))
    else:
        raise OutputError(f"outputs: the model returns {type(out).__name__}; return a tensor, a tuple, a dict or a "
                          "NamedTuple of tensors (wrap the model if needed)")
    for name, value in pairs:
        if not isinstance(value, torch.Tensor):
            raise OutputError(f"outputs: '{name}' is a {type(value).__name__}, not a tensor; return tensors only "
                              "(flatten nested outputs in a wrapper, or switch them off, e.g. output_hidden_states)")
    if not pairs:
        raise OutputError("outputs: the model returned no tensor")
    return tuple(n for n, _ in pairs), tuple(v for _, v in pairs)


def _select(found: dict[str, Any], names: Sequence[str]) -> list[tuple[str, Any]]:
    unknown = [n for n in names if n not in found]
    if unknown:
        raise OutputError(f"outputs: the model returns no '{unknown[0]}'; it returns {', '.join(found)}")
    return [(n, found[n]) for n in names]


def _takes_keywords(model: nn.Module, names: Sequence[str]) -> bool:
    """True when every input name is a parameter of model.forward, so calling by keyword is safe."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # builtins, some scripted modules: no signature to read
        return False
    return all(n in params for n in names)


class NamedIO(nn.Module):
    """Wraps a model so that forward takes the spec's inputs positionally and returns a flat tuple of tensors.

    The model is called by keyword when every input name is a parameter of its forward (so the spec's order
    need not match the model's), else positionally in the spec's order. `output_names` is known after
    `discover(example)` (one eager call) and in the same order as forward's tuple.
    """

    def __init__(self, model: nn.Module, input_names: Sequence[str], output_names: Optional[Sequence[str]] = None):
        super().__init__()
        if not input_names or len(set(input_names)) != len(input_names):
            raise BuildError(f"inputs: give distinct input names, got {list(input_names)}")
        self.model = model
        self.input_names = tuple(input_names)
        self.spec_output_names = tuple(output_names) if output_names else None
        self.by_keyword = _takes_keywords(model, self.input_names)
        self.output_names: Optional[tuple[str, ...]] = None

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.by_keyword:
            out = self.model(**dict(zip(self.input_names, inputs)))
        else:
            out = self.model(*inputs)
        return flatten_output(out, self.output_names or self.spec_output_names)[1]

    def discover(self, example: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """Run the model once on `example` (eval, no grad) and fix the output names and their order.

        Raises:
            BuildError: an input is missing from the example, or the model fails on it.
            OutputError: the output is not made of tensors or does not fit the spec's names.
        """
        args = self.ordered(example)
        with torch.no_grad():
            try:
                out = self.model(**dict(zip(self.input_names, args))) if self.by_keyword else self.model(*args)
            except Exception as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise BuildError(f"the model fails on the example inputs: {type(exc).__name__}: {first}; check the "
                                 "spec's input names, shapes and dtypes") from exc
        self.output_names = flatten_output(out, self.spec_output_names)[0]
        return self.output_names

    def ordered(self, example: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The example's tensors in input order."""
        missing = [n for n in self.input_names if n not in example]
        if missing:
            raise BuildError(f"inputs: no example for '{missing[0]}'; examples given: {', '.join(example)}")
        return tuple(example[n] for n in self.input_names)
