"""What the systems serve: seeded weights, one TorchScript file, request bodies, and the archives.

Every system gets the same weights (same seed) and the same request bytes. tspack archives come from
`archiver.build.build` (export + validation + packaging); the naive archive from torch-model-archiver's
Python API with `naive_handler.py`, as TorchServe's docs show.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAIVE_HANDLER = os.path.join(REPO, "benchmarks", "naive_handler.py")
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass(frozen=True)
class ModelDef:
    key: str  # "light" | "heavy"
    name: str
    model_class: str  # path.py:Class, relative to the repo
    shape: tuple[int, ...]
    top_k: int
    labels: tuple[str, ...] = ()
    samples: int = 16

    @property
    def class_file(self) -> str:
        return os.path.join(REPO, self.model_class.partition(":")[0])

    def eager(self) -> torch.nn.Module:
        from archiver.optimize.export import import_object

        torch.manual_seed(0)
        return import_object(os.path.join(REPO, self.model_class), "model_class")().eval()


MODELS = {
    "light": ModelDef("light", "mnist", "archiver/zoo/mnist_cnn.py:MnistCNN", (1, 28, 28), 3, tuple(DIGITS)),
    # 8 validation (and int8 calibration) samples: ResNet-18 builds validate in seconds, not minutes.
    "heavy": ModelDef("heavy", "resnet18", "archiver/zoo/resnet.py:ResNet18", (3, 224, 224), 5, samples=8),
}


@dataclass(frozen=True)
class Variant:
    """One tspack archive: a runtime plus the serving settings baked into its model-config.yaml.

    batching: "delay" (TorchServe's frontend waits up to `delay_ms` for a batch to fill) or "zero_wait" (the
    handler runs whatever is queued the moment the model is free, up to `batch_size`; `delay_ms` unused).
    """

    runtime: str  # "torchscript" | "onnx" | "onnx-int8" | "aoti"
    workers: int
    threads: int
    batch_size: int
    delay_ms: int = 0
    batching: str = "delay"

    @property
    def label(self) -> str:
        if self.batching == "zero_wait":
            return f"{self.workers}w x {self.threads}t, zero-wait batch {self.batch_size}"
        return f"{self.workers}w x {self.threads}t, batch {self.batch_size}/{self.delay_ms}ms"

    def archive_name(self, model: ModelDef) -> str:
        batching = f"zw{self.batch_size}" if self.batching == "zero_wait" else f"b{self.batch_size}d{self.delay_ms}"
        return f"{model.name}-{self.runtime}-w{self.workers}t{self.threads}-{batching}"

    def serving(self) -> dict:
        """The spec's `serving:` block."""
        common = {"batch_size": self.batch_size, "workers": self.workers, "intra_op_threads": self.threads}
        if self.batching == "zero_wait":
            return {**common, "batching": "zero_wait"}
        return {**common, "max_batch_delay_ms": self.delay_ms}


ARTIFACTS = {
    "torchscript": {"format": "torchscript", "method": "trace"},
    "aoti": {"format": "aoti"},
    "onnx": {"format": "onnx"},
    # Random weights give near-tied logits, so int8 flips some top-1 answers that a trained model would not.
    "onnx-int8": {"format": "onnx", "quantize": {"mode": "static", "min_top1_agreement": 0.75,
                                                 "max_accuracy_drop": 100.0}},
}


def weights(model: ModelDef, work: str) -> str:
    path = os.path.join(work, f"{model.name}.state_dict.pt")
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        torch.save(model.eager().state_dict(), path)
    return path


def torchscript(model: ModelDef, work: str) -> str:
    """The traced model every non-tspack system loads (same weights as the tspack archives)."""
    path = os.path.join(work, f"{model.name}.torchscript.pt")
    if not os.path.exists(path):
        os.makedirs(work, exist_ok=True)
        example = torch.zeros((1, *model.shape))
        with torch.no_grad():
            torch.jit.trace(model.eager(), example).save(path)
    return path


@dataclass(frozen=True)
class Body:
    """One request's bytes in one form, and how it is sent: content type, more headers, and which of a served
    system's URLs takes it ("": its own, "oip": /v2/models/{name}/infer)."""

    kind: str  # "json" | "npy" | "oip-json" | "oip-binary"
    file: str
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()
    protocol: str = ""


def sample_of(model: ModelDef) -> np.ndarray:
    """The one request every system gets (seeded)."""
    return np.random.default_rng(1).random(model.shape, dtype=np.float32)


def oip_bodies(sample: np.ndarray) -> tuple[bytes, bytes, int]:
    """The Open Inference Protocol v2 requests tritonclient's HTTP client sends for `sample` (with a batch axis of 1):
    JSON (inputs and outputs as JSON), and binary (its default: tensor bytes after a JSON header, binary outputs);
    returns (json body, binary body, the binary body's Inference-Header-Content-Length)."""
    from tritonclient.http import InferenceServerClient, InferInput

    batch = sample[np.newaxis]
    forms = {}
    for binary in (False, True):
        tensor = InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=binary)
        forms[binary] = InferenceServerClient.generate_request_body([tensor])
    document = json.loads(forms[False][0])
    document.pop("parameters", None)  # JSON in, JSON out: the client's binary_data_output default dropped
    binary_body, header_length = forms[True]
    return json.dumps(document, separators=(",", ":")).encode(), binary_body, header_length


def request_bodies(model: ModelDef, work: str) -> dict[str, Body]:
    """One request in every form a system may take; identical bytes for every system that takes the form."""
    from handlers.oip import HEADER_LENGTH

    sample = sample_of(model)  # JSON: each float32 at full precision (~19 chars)
    os.makedirs(work, exist_ok=True)
    path = {kind: os.path.join(work, f"{model.name}.{kind}") for kind in ("json", "npy", "oip-json", "oip-binary")}
    with open(path["json"], "w", encoding="utf-8") as f:
        json.dump({"data": sample.tolist()}, f, separators=(",", ":"))
    with open(path["npy"], "wb") as f:
        np.save(f, sample)
    oip_json, oip_binary, header_length = oip_bodies(sample)
    for kind, data in (("oip-json", oip_json), ("oip-binary", oip_binary)):
        with open(path[kind], "wb") as f:
            f.write(data)
    json_type, binary_type = "application/json", "application/octet-stream"
    return {
        "json": Body("json", path["json"], json_type),
        "npy": Body("npy", path["npy"], binary_type),
        "oip-json": Body("oip-json", path["oip-json"], json_type, protocol="oip"),
        "oip-binary": Body("oip-binary", path["oip-binary"], binary_type, ((HEADER_LENGTH, str(header_length)),),
                           protocol="oip"),
    }


def bodies(model: ModelDef, work: str) -> dict[str, str]:
    """The request files by form ("json", "npy", "oip-json", "oip-binary")."""
    return {kind: body.file for kind, body in request_bodies(model, work).items()}


def model_spec(model: ModelDef, variant: Variant, weights_path: str) -> dict:
    return {
        "name": variant.archive_name(model), "version": "1.0",
        "source": {"model_class": os.path.join(REPO, model.model_class), "weights": weights_path},
        "input": {"shape": list(model.shape), "dtype": "float32"},
        "output": {"kind": "classification", "top_k": model.top_k, "labels": list(model.labels)},
        "samples": {"count": model.samples},
        # 1.8 MB JSON bodies for the heavy model must fit.
        "max_body_bytes": 8 * 1024 * 1024,
        "serving": variant.serving(),
        "artifacts": [ARTIFACTS[variant.runtime]],
    }


def build_tspack(model: ModelDef, variants: list[Variant], work: str, store: str) -> dict[Variant, str]:
    """Build (export, validate, package) one archive per variant; returns each variant's archive name."""
    from archiver.build import build
    from archiver.spec import DeploySpec
    from handlers.spec import parse

    todo = [v for v in variants if not os.path.exists(os.path.join(store, f"{v.archive_name(model)}_v1.0.mar"))]
    if todo:
        w = weights(model, work)
        spec = parse(DeploySpec, {"models": [model_spec(model, v, w) for v in todo], "model_store": store})
        result = build(spec, progress=False)
        failed = [f"{e.name}: {e.error}" for e in result.failed]
        if failed:
            raise RuntimeError("tspack build failed: " + "; ".join(failed))
    return {v: v.archive_name(model) for v in variants}


def aoti_package(model: ModelDef, variant: Variant, work: str, store: str) -> str:
    """The AOTInductor package (.pt2) that `tspack build` compiled for `variant` (format aoti), copied out of its
    archive so a peer can load the very same compiled model."""
    import zipfile

    name = build_tspack(model, [variant], work, store)[variant]
    path, mar = os.path.join(work, f"{name}.pt2"), os.path.join(store, f"{name}_v1.0.mar")
    if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(mar):
        with zipfile.ZipFile(mar) as archive, open(path, "wb") as f:
            f.write(archive.read("model.pt2"))
    return path


def build_naive(model: ModelDef, work: str, store: str) -> str:
    """The archive a user makes from TorchServe's docs: TorchScript file + a BaseHandler subclass."""
    from model_archiver import ModelArchiver, ModelArchiverConfig

    name = f"{model.name}-naive"
    if not os.path.exists(os.path.join(store, f"{name}.mar")):
        os.makedirs(store, exist_ok=True)
        config = ModelArchiverConfig(model_name=name, handler=NAIVE_HANDLER, version="1.0",
                                     serialized_file=torchscript(model, work), export_path=store, force=True)
        ModelArchiver.generate_model_archive(config)
    return name
