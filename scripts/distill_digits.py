"""Distil the demo's digits CNN (the teacher, version 2.0) into a student a tenth of its size.

Prints both models' parameter counts and held-out accuracies, and saves the student's state_dict.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from archiver.optimize.distill import distill  # noqa: E402
from archiver.zoo.digits_cnn import DigitsCNN  # noqa: E402
from archiver.zoo.digits_student import DigitsStudent  # noqa: E402
from archiver.zoo.digits_training import accuracy  # noqa: E402


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", default=os.path.join("model_store", "work"))
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    train, held_out = np.load(os.path.join(args.work, "train.npz")), np.load(os.path.join(args.work, "heldout.npz"))
    teacher = DigitsCNN()
    teacher.load_state_dict(torch.load(os.path.join(args.work, "digits_v2.pt"), weights_only=True))
    teacher.eval()
    torch.manual_seed(0)
    student = distill(teacher, DigitsStudent(), train["x"], train["y"], epochs=args.epochs, progress="distil")
    torch.save(student.state_dict(), os.path.join(args.work, "digits_student.pt"))
    t_acc, s_acc = accuracy(teacher, held_out["x"], held_out["y"]), accuracy(student, held_out["x"], held_out["y"])
    t_par, s_par = parameters(teacher), parameters(student)
    print(f"teacher DigitsCNN:     {t_par:6d} parameters, held-out accuracy {t_acc:.1%}")
    print(f"student DigitsStudent: {s_par:6d} parameters ({s_par / t_par:.0%} of the teacher), "
          f"held-out accuracy {s_acc:.1%} ({s_acc / t_acc:.1%} of the teacher's)")
    return 0 if s_par <= t_par / 4 and s_acc >= 0.95 * t_acc else 1


if __name__ == "__main__":
    sys.exit(main())
