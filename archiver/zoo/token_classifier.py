"""A small classifier over token ids with two named inputs and a dict output, like a Hugging Face model's.

forward(input_ids, attention_mask) -> {"logits": (N, classes), "pooled": (N, dim)}: a masked mean of token
embeddings through a small MLP. The demo and the tests build it from the command line with
`--input input_ids:-1:int64 --input attention_mask:-1:int64`.
"""

import torch
from torch import nn


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 32, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(input_ids) * mask).sum(1)
        pooled = self.mlp(summed / mask.sum(1).clamp(min=1.0))
        return {"logits": self.head(pooled), "pooled": pooled}
