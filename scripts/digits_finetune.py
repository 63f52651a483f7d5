"""Fine-tune callback for the demo's QAT and iterative pruning: one epoch on the digits training split.

Referenced from config/deploy.yaml as `../scripts/digits_finetune.py:finetune`; tspack calls it as
finetune(model, step) and serves whatever model it returns (or the one it trained in place).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

TRAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_store", "work", "train.npz")


def finetune(model: nn.Module, step: int) -> nn.Module:
    data = np.load(TRAIN)
    x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
    generator = torch.Generator().manual_seed(step)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(len(x), generator=generator)
    for start in range(0, len(x), 64):
        idx = order[start:start + 64]
        optimizer.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        optimizer.step()
    return model.eval()
