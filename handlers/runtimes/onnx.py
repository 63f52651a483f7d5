"""ONNX Runtime: one InferenceSession per worker, CUDA provider on the worker's GPU when present."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from handlers.device import Placement
from handlers.runtimes import named_outputs
from handlers.spec import ArtifactManifest

logger = logging.getLogger(__name__)

GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def providers_for(gpu_id: int | None) -> list:
    """CUDA on the worker's GPU when TorchServe assigned one and ORT has the CUDA provider, else CPU."""
    if gpu_id is not None and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(gpu_id)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, manifest: ArtifactManifest, path: str, placement: Placement, model_dir: str = ""):
        spec = manifest.runtime
        options = ort.SessionOptions()
        options.intra_op_num_threads = placement.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = GRAPH_LEVELS[spec.graph_optimization]
        self.session = ort.InferenceSession(path, options, providers=providers_for(placement.gpu_id))
        self.providers = self.session.get_providers()
        self.manifest = manifest
        session_inputs = self.session.get_inputs()
        # Declared inputs the graph dropped (an unused attention_mask, say) are not fed: ORT refuses extra feeds.
        self.feeds = {i.name: ORT_TO_NUMPY.get(i.type, np.float32) for i in session_inputs}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.threads = placement.threads
        self.scheme = spec.quantization
        self.graph_optimization = spec.graph_optimization
        logger.info("tspack onnxruntime: providers=%s threads=%d inputs=%s", self.providers, self.threads,
                    [(i.name, i.type) for i in session_inputs])

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(self.feeds) == 1 and len(inputs) == 1:  # one-input archives of any input name
            (name, dtype), = self.feeds.items()
            feed = {name: next(iter(inputs.values())).astype(dtype, copy=False)}
        else:
            feed = {name: inputs[name].astype(dtype, copy=False) for name, dtype in self.feeds.items()}
        values = self.session.run(None, feed)
        out = {name: v.astype(np.float32, copy=False) if v.dtype == np.float16 else v
               for name, v in zip(self.output_names, values)}
        return named_outputs(self.manifest, out if set(self.manifest.outputs) <= set(out) else values)

    def describe(self) -> dict:
        return {
            "runtime": self.name if not self.scheme else f"{self.name}-int8", "providers": self.providers,
            "intra_op_threads": self.threads, "graph_optimization": self.graph_optimization,
            "quantization": self.scheme, "onnxruntime": ort.__version__,
        }
