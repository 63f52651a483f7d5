"""The two tables every other part of the pack derives from: model formats (runtimes) and front ends.

Data only, no imports of the classes, so that reading the tables costs nothing: a worker imports the one
runtime and the one front end its archive names (ONNX Runtime is never imported for a TorchScript archive).
The spec's `Literal` types, the CLI's choices and the archiver's exporter table are built from these keys;
adding a runtime is one module plus one entry here (and its exporter entry in archiver/optimize/formats.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class RuntimeEntry:
    """A model format as served: the class that runs it and the file it lives in inside the archive."""

    cls: str  # "module:Class" (or a factory), called as Class(manifest, path, placement, model_dir)
    file: str
    summary: str


@dataclass(frozen=True)
class FrontendEntry:
    """A front end: the class that decodes requests and encodes answers, and the handler module that serves it."""

    cls: str  # "module:Class", constructed as Class(manifest, model_dir)
    handler: str  # module of the handlers package TorchServe loads (exactly one class in it)
    summary: str


RUNTIMES: dict[str, RuntimeEntry] = {
    "aoti": RuntimeEntry("handlers.runtimes.aoti:AotiRuntime", "model.pt2",
                         "torch.export + AOTInductor package (.pt2), compiled ahead of time"),
    "onnx": RuntimeEntry("handlers.runtimes.onnx:OnnxRuntime", "model.onnx",
                         "ONNX (dynamo exporter) on ONNX Runtime"),
    "torchscript": RuntimeEntry("handlers.runtimes.torch:torchscript_runtime", "model.pt",
                                "TorchScript (trace or script), legacy: deprecated upstream"),
    "state_dict": RuntimeEntry("handlers.runtimes.torch:TorchRuntime", "model.pt",
                               "the eager model class + a state_dict, loaded with weights_only=True"),
}

FRONTENDS: dict[str, FrontendEntry] = {
    "tensor": FrontendEntry("handlers.frontends.tensor:TensorFrontend", "tensor",
                            "tensors as JSON (by input name), OIP v2, .npy or .npz"),
    "image": FrontendEntry("handlers.frontends.image:ImageFrontend", "image",
                           "JPEG/PNG/WebP bytes, multipart or base64, preprocessed with Pillow + numpy"),
    "text": FrontendEntry("handlers.frontends.text:TextFrontend", "text",
                          "text tokenized with the archive's tokenizer.json (Hugging Face tokenizers)"),
}


def load_class(reference: str) -> type:
    """Import "module:Class" from the handlers package."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)
