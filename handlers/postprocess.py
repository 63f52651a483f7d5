"""Model output rows -> JSON-ready answers, shared by every front end."""

from __future__ import annotations

import numpy as np

from handlers.spec import OutputSpec


def softmax(rows: np.ndarray) -> np.ndarray:
    shifted = rows - rows.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def format_rows(spec: OutputSpec, outputs: np.ndarray) -> list[dict]:
    """One dict per output row: {"predictions": top-k} for classifiers, {"output": values} otherwise."""
    if spec.kind == "raw":
        return [{"output": row.tolist()} for row in outputs]
    flat = outputs.reshape(outputs.shape[0], -1).astype(np.float64, copy=False)
    probabilities = softmax(flat) if spec.softmax else flat
    k = min(spec.top_k, probabilities.shape[1])
    # argpartition then a sort of k items: cheaper than a full argsort of every class.
    top = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    answers = []
    for row, indices in zip(probabilities, top):
        ordered = indices[np.argsort(-row[indices], kind="stable")]
        answers.append({"predictions": [
            {"label": spec.label(int(i)), "index": int(i), "probability": float(row[i])} for i in ordered
        ]})
    return answers
