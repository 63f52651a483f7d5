"""Seeded weights and validation samples for the demo's two-input model (archiver/zoo/token_classifier.py).

    python scripts/make_token_model.py --out model_store/work

Writes token_classifier.pt (a state_dict) and token_samples.npz (input_ids and attention_mask, 32 rows of 12
tokens, some rows padded), the two files `tspack build --model-class ... --input ...` takes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.zoo.token_classifier import TokenClassifier  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("model_store", "work"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    torch.save(TokenClassifier().state_dict(), os.path.join(args.out, "token_classifier.pt"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 1000, (32, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[::2, 8:] = 0  # every other row is padded after 8 tokens
    ids[mask == 0] = 0
    np.savez(os.path.join(args.out, "token_samples.npz"), input_ids=ids, attention_mask=mask)
    print(f"wrote {args.out}/token_classifier.pt and token_samples.npz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
