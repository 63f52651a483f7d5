"""What both peers share: settings from the environment, the model, and the answer (softmax top-k).

The peers run in benchmarks/.venv, so this file imports only torch and numpy. Settings come from
environment variables because uvicorn's worker processes import the app module afresh.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch


def settings() -> dict:
    return {
        "model": os.environ["BENCH_MODEL"],
        "threads": int(os.environ.get("BENCH_THREADS", "1")),
        "labels": json.loads(os.environ.get("BENCH_LABELS", "[]")),
        "top_k": int(os.environ.get("BENCH_TOP_K", "5")),
        "shape": tuple(json.loads(os.environ.get("BENCH_SHAPE", "[1, 28, 28]"))),
    }


def load_model(path: str, threads: int, shape: tuple):
    """A TorchScript file, or an AOTInductor package (.pt2) as `tspack build` compiles it."""
    torch.set_num_threads(threads)
    if path.endswith(".pt2"):
        package = torch._inductor.aoti_load_package(path)

        def model(x: torch.Tensor) -> torch.Tensor:
            return package(x)[0]  # the package returns its outputs as a list
    else:
        model = torch.jit.load(path).eval()
    with torch.inference_mode():  # two runs on zeros, as tspack's warm-up does
        for _ in range(2):
            model(torch.zeros((1, *shape)))
    return model


def tensor_from(body: bytes) -> torch.Tensor:
    """One sample from a JSON `{"data": [...]}` body or .npy bytes."""
    if body.startswith(b"\x93NUMPY"):
        return torch.from_numpy(np.load(io.BytesIO(body), allow_pickle=False))
    return torch.tensor(json.loads(body)["data"], dtype=torch.float32)


def top_k(logits: torch.Tensor, k: int, labels: list) -> list[dict]:
    """One answer per row: the k most probable classes, as tspack answers classifiers."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    values, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
    answers = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        answers.append({"predictions": [
            {"label": labels[i] if i < len(labels) else str(i), "index": i, "probability": p}
            for p, i in zip(row_values, row_indices)]})
    return answers
