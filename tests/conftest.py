"""Fixtures: tiny real models with fixed seeds, built archives, and unpacked model folders."""

from __future__ import annotations

import json
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


# Every int8 (and image) artifact the suite serves or inspects, from one build of the trained CNN: quantizing is
# the slowest part of a build, so test_optimize, test_image_handler and test_image_runtimes share this store.
INT8_ARTIFACTS = [
    {"format": "onnx", "id": "ort-static", "quantize": {"mode": "static", "calibration_file": "TRAIN",
                                                        "max_accuracy_drop": 0.5}},
    {"format": "onnx", "id": "ort-dynamic", "quantize": {"mode": "dynamic"}},
    {"format": "torchscript", "id": "torch-dynamic", "quantize": {"mode": "dynamic"}},
    {"format": "torchscript", "id": "torch-static", "quantize": {"mode": "static", "calibration_file": "TRAIN"}},
    {"format": "torchscript", "id": "qat", "quantize": {"mode": "qat", "finetune": "FINETUNE"}},
    # the supported int8 path: pt2e static (X86InductorQuantizer) compiled with AOTInductor
    {"format": "aoti", "id": "pt2e", "quantize": {"mode": "static", "calibration_file": "TRAIN"}},
    {"format": "torchscript", "id": "image", "frontend": "image"},
    {"format": "onnx", "id": "image-onnx", "frontend": "image"},
    {"format": "torchscript", "id": "image-torch-int8", "frontend": "image", "quantize": {"mode": "dynamic"}},
    {"format": "onnx", "id": "image-int8", "frontend": "image", "quantize": {
        "mode": "static", "calibration_file": "TRAIN", "max_accuracy_drop": 0.5}},
]


@pytest.fixture(scope="session")
def int8_store(trained, tmp_path_factory):
    """The trained digits CNN 1.0 as every int8 scheme (tensor front end) and as image archives (fp32 and int8).

    Returns {"store": folder, "entries": {artifact id: ArtifactReport}}; archives are `digits-<id>_v1.0.mar`.
    A failed artifact does not fail the fixture: each test asserts that the artifacts it uses passed
    (`support.int8_archive`).
    Serving settings suit tests/integration/test_image_runtimes.py (a batch of 4 fills well within 300 ms).
    """
    from archiver.build import build
    from archiver.spec import DeploySpec
    from handlers.spec import parse

    store = str(tmp_path_factory.mktemp("int8") / "store")
    fill = {"TRAIN": trained["train"], "FINETUNE": trained["finetune"]}
    artifacts = json.loads(json.dumps(INT8_ARTIFACTS))
    for artifact in artifacts:
        for key, value in artifact.get("quantize", {}).items():
            artifact["quantize"][key] = fill.get(value, value)
    model = support.digits_model("digits", "1.0", trained["weights"], trained["heldout"],
                                 image=dict(support.IMAGE_SPEC), artifacts=artifacts,
                                 serving={"batch_size": 4, "max_batch_delay_ms": 300, "workers": 1})
    result = build(parse(DeploySpec, {"model_store": store, "models": [model]}), progress=False)
    return {"store": store, "entries": {e.artifact_id: e for e in result.entries}}

