"""LitServe peer: a LitAPI on `POST /predict` with `{"data": [...]}`, batching off or on.

Run by the benchmark as `benchmarks/.venv/bin/python benchmarks/peers/litserve_server.py PORT MAX_BATCH
TIMEOUT_S`, with BENCH_MODEL, BENCH_THREADS, BENCH_SHAPE, BENCH_TOP_K and BENCH_LABELS in the environment.
"""

import os
import sys

import litserve as ls
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_model, settings, top_k  # noqa: E402

SETTINGS = settings()


class ModelAPI(ls.LitAPI):
    def setup(self, device):
        self.model = load_model(SETTINGS["model"], SETTINGS["threads"], SETTINGS["shape"])

    def decode_request(self, request):
        return torch.tensor(request["data"], dtype=torch.float32).unsqueeze(0)

    def batch(self, inputs):
        return torch.cat(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output):
        return list(output.split(1))

    def encode_response(self, output):
        return top_k(output, SETTINGS["top_k"], SETTINGS["labels"])[0]


if __name__ == "__main__":
    port, max_batch, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    api = ModelAPI(max_batch_size=max_batch, batch_timeout=timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True, timeout=60)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
