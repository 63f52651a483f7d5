"""Train the demo's digits CNN on scikit-learn's bundled 8x8 digits and save two versions.

Writes into --out:
  digits_v1.pt, digits_v2.pt   state_dicts (v1: a short run, v2: a longer one)
  train.npz, heldout.npz       x: N x 1 x 8 x 8 float32 in [0, 1], y: labels
  samples/*.png                a few held-out digits as 8-bit grayscale PNGs (upscaled 4x)
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.zoo.digits_cnn import DigitsCNN  # noqa: E402

SEED = 0


def load_digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=SEED, stratify=y)


def train(x: np.ndarray, y: np.ndarray, epochs: int, seed: int = SEED) -> DigitsCNN:
    torch.manual_seed(seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            batch = order[start:start + 64]
            optimizer.zero_grad()
            loss_fn(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def write_pngs(x: np.ndarray, y: np.ndarray, folder: str, count: int = 12) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = np.clip(x[i, 0] * 255.0, 0, 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(
            os.path.join(folder, f"digit_{i:02d}_label{y[i]}.png"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join("model_store", "work"))
    parser.add_argument("--v1-epochs", type=int, default=3)
    parser.add_argument("--v2-epochs", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    x_train, x_test, y_train, y_test = load_digits_split()
    np.savez(os.path.join(args.out, "train.npz"), x=x_train, y=y_train)
    np.savez(os.path.join(args.out, "heldout.npz"), x=x_test, y=y_test)
    for version, epochs in (("v1", args.v1_epochs), ("v2", args.v2_epochs)):
        model = train(x_train, y_train, epochs)
        torch.save(model.state_dict(), os.path.join(args.out, f"digits_{version}.pt"))
        print(f"digits {version}: {epochs} epoch(s), held-out accuracy {accuracy(model, x_test, y_test):.1%}")
    write_pngs(x_test, y_test, os.path.join(args.out, "samples"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
