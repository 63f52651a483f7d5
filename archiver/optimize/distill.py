"""Knowledge distillation: train a small student to match a teacher's softened outputs and the labels."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.7, temperature: float = 4.0) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, labels).

    The T^2 factor keeps the soft term's gradients on the scale of the hard term's (Hinton et al., 2015).
    """
    soft = F.kl_div(F.log_softmax(student_logits / temperature, dim=-1),
                    F.softmax(teacher_logits / temperature, dim=-1), reduction="batchmean")
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature * temperature * soft + (1.0 - alpha) * hard


def distill(teacher: nn.Module, student: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30,
            alpha: float = 0.7, temperature: float = 4.0, lr: float = 3e-3, batch: int = 64,
            seed: int = 0, progress: Optional[str] = None) -> nn.Module:
    """Train `student` on (x, y) against `teacher`'s logits; returns the student in eval mode.

    Args:
        progress: a tqdm description to show a progress bar over epochs (None: silent).
    """
    from tqdm import tqdm

    torch.manual_seed(seed)
    teacher.eval()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y).long()
    with torch.inference_mode():
        teacher_logits = torch.cat([teacher(xs[i:i + 256]) for i in range(0, len(xs), 256)])
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    student.train()
    for _ in tqdm(range(epochs), desc=progress, disable=progress is None, unit="epoch"):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), batch):
            idx = order[start:start + batch]
            optimizer.zero_grad()
            distillation_loss(student(xs[idx]), teacher_logits[idx], ys[idx], alpha, temperature).backward()
            optimizer.step()
    return student.eval()
