"""Fine-tune callback for the demo's QAT and iterative pruning: one epoch on the digits training split.

Referenced from config/deploy.yaml as `../scripts/digits_finetune.py:finetune`; tspack calls it as
finetune(model, step) and serves whatever model it returns (or the one it trained in place).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "model_store", "work", "train.npz")
sys.path.insert(0, ROOT)

from archiver.zoo.digits_training import train  # noqa: E402


def finetune(model: nn.Module, step: int) -> nn.Module:
    data = np.load(TRAIN)
    return train(model, data["x"], data["y"], epochs=1, seed=step, lr=5e-4)
