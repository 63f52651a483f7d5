"""A Linear-heavy residual MLP over the flattened 8x8 digit: the model the int8 benchmark quantizes.

Every matrix multiply is an nn.Linear, so dynamic int8 quantization reaches all of them.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class DigitsMLP(nn.Module):
    def __init__(self, dim: int = 1024, hidden: int = 2048, depth: int = 4, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(64, dim)
        self.blocks = nn.Sequential(*[Block(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x.flatten(1)))))
