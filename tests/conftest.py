"""Fixtures: tiny real models with fixed seeds, built archives, and unpacked model folders."""

from __future__ import annotations

import os

import pytest

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
