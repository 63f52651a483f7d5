"""The handler a TorchServe user writes from the docs: the benchmark's naive baseline. No tuning on purpose.

BaseHandler loads the TorchScript file and runs `inference`; this class only turns requests into a
tensor and the output into lists.
"""

import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class NaiveHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            payload = row.get("data") or row.get("body")
            if isinstance(payload, (bytes, bytearray)):
                payload = json.loads(payload)
            if isinstance(payload, dict):
                payload = payload["data"]
            rows.append(torch.tensor(payload, dtype=torch.float32))
        return torch.stack(rows)

    def postprocess(self, output):
        return output.tolist()
