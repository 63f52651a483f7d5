"""Fixtures: tiny real models with fixed seeds, built archives, and unpacked model folders."""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from tests import support


@pytest.fixture(scope="session")
def digits_store(tmp_path_factory):
    """A model store with digits 1.0 and 2.0 (seeded random weights), TorchScript, built by the archiver."""
    root = tmp_path_factory.mktemp("digits")
    store = str(root / "store")
    work = str(root / "work")
    os.makedirs(work)
    samples = support.digits_samples(work)
    weights = {v: support.digits_weights(work, seed) for v, seed in (("1.0", 1), ("2.0", 2))}
    support.build_models(store, [support.digits_model("digits", v, w, samples) for v, w in weights.items()])
    return {"store": store, "weights": weights, "samples": samples, "root": str(root)}


@pytest.fixture
def digits_dir(digits_store, tmp_path):
    """digits 1.0 unpacked as TorchServe unpacks it for a worker."""
    return support.extract(os.path.join(digits_store["store"], "digits_v1.0.mar"), str(tmp_path / "model"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """The digits CNN trained for a few epochs on real data, with held-out and training splits on disk."""
    from archiver.zoo.digits_cnn import DigitsCNN
    from archiver.zoo.digits_training import load_digits_split, train

    root = tmp_path_factory.mktemp("trained")
    x_train, x_test, y_train, y_test = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsCNN(), x_train, y_train, epochs=12)
    weights = root / "digits.pt"
    torch.save(model.state_dict(), weights)
    np.savez(root / "heldout.npz", x=x_test, y=y_test)
    np.savez(root / "train.npz", x=x_train, y=y_train)
    finetune = root / "finetune.py"
    finetune.write_text(textwrap.dedent(f'''
        import numpy as np, torch
        from torch import nn
        CALLS = []

        def finetune(model, step):
            CALLS.append(step)
            data = np.load({str(root / "train.npz")!r})
            x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"]).long()
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-4)
            model.train()
            for start in range(0, len(x), 64):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
                optimizer.step()
            return model.eval()
    '''))
    return {"root": root, "weights": str(weights), "heldout": str(root / "heldout.npz"),
            "train": str(root / "train.npz"), "finetune": f"{finetune}:finetune", "model": model,
            "x_test": x_test, "y_test": y_test, "x_train": x_train, "y_train": y_train}
