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


def answer_rows(manifest, outputs: dict[str, np.ndarray]) -> list[dict]:
    """One dict per row. A one-output model answers as `format_rows` does; a model with several outputs answers
    {"outputs": {name: values}} per row, plus the top-k of its primary output when it is a classifier."""
    if len(outputs) == 1:
        return format_rows(manifest.output, next(iter(outputs.values())))
    primary = outputs[manifest.primary_output]
    rows = [{"outputs": {name: array[i].tolist() for name, array in outputs.items()}} for i in range(len(primary))]
    if manifest.output.kind == "classification":
        for row, ranked in zip(rows, format_rows(manifest.output, primary)):
            row.update(ranked)
    return rows


def json_answer(meta: dict, rows: list[dict], single: bool) -> dict:
    """The answer body: the rows' fields beside the meta for a one-sample request, else {"results": rows}."""
    body = dict(meta)
    if single:
        body.update(rows[0])
    else:
        body["results"] = rows
    return body
