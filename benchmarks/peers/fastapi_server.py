"""FastAPI + uvicorn peer: `POST /predict` with `{"data": [...]}` (or .npy bytes), as FastAPI users write it.

Run by the benchmark as `benchmarks/.venv/bin/python benchmarks/peers/fastapi_server.py PORT WORKERS`,
with BENCH_MODEL (a TorchScript file or an AOTInductor .pt2), BENCH_THREADS (torch threads per worker),
BENCH_SHAPE, BENCH_TOP_K and BENCH_LABELS in the environment.
"""

import os
import sys

import torch
from fastapi import FastAPI, Request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_model, settings, tensor_from, top_k  # noqa: E402

SETTINGS = settings()
MODEL = load_model(SETTINGS["model"], SETTINGS["threads"], SETTINGS["shape"])
app = FastAPI()


@app.get("/health")
def health() -> dict:
    return {"status": "ok"}


@app.post("/predict")
async def predict(request: Request) -> dict:
    # async: the model runs on the event loop thread, so requests never share torch's threads.
    x = tensor_from(await request.body())
    with torch.inference_mode():
        logits = MODEL(x.unsqueeze(0))
    return top_k(logits, SETTINGS["top_k"], SETTINGS["labels"])[0]


if __name__ == "__main__":
    import uvicorn

    port, workers = int(sys.argv[1]), int(sys.argv[2])
    uvicorn.run("fastapi_server:app", host="127.0.0.1", port=port, workers=workers, log_level="warning",
                access_log=False, app_dir=os.path.dirname(os.path.abspath(__file__)))
