"""ONNX Runtime: one InferenceSession per worker, CUDA provider on the worker's GPU when present."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from handlers.device import Placement
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

    def __init__(self, manifest: ArtifactManifest, path: str, placement: Placement):
        spec = manifest.runtime
        options = ort.SessionOptions()
        options.intra_op_num_threads = placement.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = GRAPH_LEVELS[spec.graph_optimization]
        self.session = ort.InferenceSession(path, options, providers=providers_for(placement.gpu_id))
        self.providers = self.session.get_providers()
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = ORT_TO_NUMPY.get(first.type, np.float32)
        self.threads = placement.threads
        self.scheme = spec.quantization
        self.graph_optimization = spec.graph_optimization
        logger.info("tspack onnxruntime: providers=%s threads=%d input=%s %s", self.providers, self.threads,
                    self.input_name, first.type)

    def run(self, batch: np.ndarray) -> np.ndarray:
        feed = {self.input_name: batch.astype(self.input_dtype, copy=False)}
        out = self.session.run(None, feed)[0]
        return out.astype(np.float32, copy=False) if out.dtype == np.float16 else out

    def describe(self) -> dict:
        return {
            "runtime": self.name if not self.scheme else f"{self.name}-int8", "providers": self.providers,
            "intra_op_threads": self.threads, "graph_optimization": self.graph_optimization,
            "quantization": self.scheme, "onnxruntime": ort.__version__,
        }
