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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.zoo.digits_cnn import DigitsCNN  # noqa: E402
from archiver.zoo.digits_training import accuracy, load_digits_split, train  # noqa: E402


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
        torch.manual_seed(0)
        model = train(DigitsCNN(), x_train, y_train, epochs)
        torch.save(model.state_dict(), os.path.join(args.out, f"digits_{version}.pt"))
        print(f"digits {version}: {epochs} epoch(s), held-out accuracy {accuracy(model, x_test, y_test):.1%}")
    write_pngs(x_test, y_test, os.path.join(args.out, "samples"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
