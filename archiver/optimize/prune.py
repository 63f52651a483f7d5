"""Magnitude pruning of Linear and Conv weights, made permanent before export."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn
from torch.nn.utils import prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

Finetune = Callable[[nn.Module, int], Optional[nn.Module]]


def _targets(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, PRUNABLE)]


def sparsity(model: nn.Module) -> float:
    """Share of zero weights over all prunable layers."""
    total = zeros = 0
    for module, name in _targets(model):
        weight = getattr(module, name)
        total += weight.numel()
        zeros += int(torch.count_nonzero(weight == 0))
    return zeros / total if total else 0.0


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold the pruning masks into the weights and drop the reparametrisation (export needs plain tensors)."""
    for module, name in _targets(model):
        if prune.is_pruned(module) and hasattr(module, f"{name}_orig"):
            prune.remove(module, name)
    return model


def prune_model(model: nn.Module, method: str, amount: float, iterations: int = 1,
                finetune: Optional[Finetune] = None) -> nn.Module:
    """Prune a copy of `model` to `amount` sparsity in `iterations` steps, fine-tuning after each step.

    Args:
        method: "l1_unstructured" (each layer to `amount`) or "global_unstructured" (the smallest weights
            across all layers, so layers end up unevenly sparse).
        amount: final share of weights set to zero, in (0, 1).
        iterations: pruning steps; each removes the same share of the weights still alive, so the
            final sparsity is `amount`.
        finetune: called as finetune(model, step) after each step; may return a new model.
    """
    model = copy.deepcopy(model)
    # Per step, prune this share of what remains so that after `iterations` steps `amount` is gone.
    step_amount = 1.0 - (1.0 - amount) ** (1.0 / iterations)
    for step in range(iterations):
        targets = _targets(model)
        if method == "global_unstructured":
            prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=step_amount)
        else:
            for module, name in targets:
                prune.l1_unstructured(module, name, amount=step_amount)
        if finetune is not None:
            model = finetune(model, step) or model
    return make_permanent(model.eval())
