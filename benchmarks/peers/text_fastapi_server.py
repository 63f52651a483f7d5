"""FastAPI + uvicorn text peer: `POST /predict` with `{"text": "..."}`, tokenized and classified in the same process.

What a FastAPI user writes for a Hugging Face classifier exported to ONNX: the model folder's `tokenizer.json` run
by `tokenizers` (truncated to max_length, no padding: one text per request), the same `model.onnx` that tspack
serves, run by ONNX Runtime with tspack's session options, and the same top-k answer as the other peers.

Run by the text benchmark as `benchmarks/.venv/bin/python benchmarks/peers/text_fastapi_server.py PORT WORKERS`,
with BENCH_MODEL (the .onnx file), BENCH_TOKENIZER (tokenizer.json), BENCH_MAX_LENGTH, BENCH_THREADS (ONNX
Runtime intra-op threads per worker), BENCH_TOP_K and BENCH_LABELS in the environment.
"""

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import torch
from fastapi import FastAPI, HTTPException, Request
from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import settings, top_k  # noqa: E402

SETTINGS = settings()


def load_session(path: str, threads: int) -> ort.InferenceSession:
    # tspack's OnnxRuntime options (handlers/runtimes/onnx.py), so the two differ only in how they serve.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def load_tokenizer(path: str, max_length: int) -> Tokenizer:
    tokenizer = Tokenizer.from_file(path)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    return tokenizer


torch.set_num_threads(1)  # torch only takes the softmax of the answer; ONNX Runtime owns the worker's threads
SESSION = load_session(SETTINGS["model"], SETTINGS["threads"])
FEEDS = [i.name for i in SESSION.get_inputs()]  # an attention_mask the graph dropped is not fed
TOKENIZER = load_tokenizer(os.environ["BENCH_TOKENIZER"], int(os.environ.get("BENCH_MAX_LENGTH", "128")))
app = FastAPI()


def classify(text: str) -> dict:
    encoding = TOKENIZER.encode(text)
    arrays = {"input_ids": np.asarray([encoding.ids], dtype=np.int64),
              "attention_mask": np.asarray([encoding.attention_mask], dtype=np.int64)}
    logits = SESSION.run(None, {name: arrays[name] for name in FEEDS})[0]
    return top_k(torch.from_numpy(logits), SETTINGS["top_k"], SETTINGS["labels"])[0]


classify("an example sentence for the warm-up run")  # as tspack's worker warms up before its first request


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict:
    # async: the model runs on the event loop thread, so requests never share ONNX Runtime's threads.
    try:
        text = json.loads(await request.body())["text"]
    except (ValueError, KeyError, TypeError) as exc:
        raise HTTPException(400, 'send {"text": "..."}') from exc
    if not isinstance(text, str) or not text.strip():
        raise HTTPException(400, "'text' must be a non-empty string")
    return classify(text)


if __name__ == "__main__":
    import uvicorn

    port, workers = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run("text_fastapi_server:app", host="127.0.0.1", port=port, workers=workers, log_level="warning",
                access_log=False, app_dir=os.path.dirname(os.path.abspath(__file__)))
