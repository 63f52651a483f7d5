"""Tiny digits deployments for the tests and the benchmarks: seeded weights, samples, model specs, images, and a
TorchServe on free ports.

One neutral home for what tests/support.py and benchmarks/reliability/ both build, so that neither imports the
other. Nothing here trains (seeded random weights suffice to serve); archiver/zoo/digits_training.py trains.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import Any, Optional

import numpy as np
import torch

from archiver.deploy.properties import ModelEntry, ServerConfig, write_config
from archiver.operate.server import ServerHandle, free_ports, start

DIGITS_CLASS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_cnn.py") + ":DigitsCNN"
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_SPEC = {"height": 8, "width": 8, "mode": "L", "resample": "box"}


def digits_weights(folder: str, seed: int) -> str:
    """A DigitsCNN state_dict with seeded random weights (serving needs no training); returns its path."""
    from archiver.zoo.digits_cnn import DigitsCNN

    torch.manual_seed(seed)
    path = os.path.join(folder, f"digits_seed{seed}.pt")
    torch.save(DigitsCNN().state_dict(), path)
    return path


def digits_samples(folder: str, count: int = 32, seed: int = 0) -> str:
    """`count` random 1 x 8 x 8 inputs and labels in `folder`/samples.npz (the spec's samples file); its path."""
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, "samples.npz")
    np.savez(path, x=rng.random((count, 1, 8, 8), dtype=np.float32), y=rng.integers(0, 10, count))
    return path


def digits_model(name: str, version: str, weights: str, samples: Optional[str] = None, **overrides: Any) -> dict:
    """A `models:` entry of a deploy spec for the DigitsCNN; `overrides` replace top-level keys."""
    model = {
        "name": name, "version": version,
        "source": {"model_class": DIGITS_CLASS, "weights": weights},
        "input": {"shape": [1, 8, 8], "dtype": "float32"},
        "output": {"kind": "classification", "top_k": 3, "labels": LABELS},
        "serving": {"batch_size": 8, "max_batch_delay_ms": 5, "workers": 1},
        "max_body_bytes": 64 * 1024,
    }
    if samples:
        model["samples"] = {"file": samples}
    model.update(overrides)
    return model


def digit_png(x: np.ndarray, scale: int = 4, mode: str = "L", fmt: str = "PNG") -> bytes:
    """A digits sample (1 x 8 x 8 in [0, 1]) as an image file, upscaled `scale` times (exact under box resampling)."""
    from PIL import Image

    pixels = np.clip(x.reshape(8, 8) * 255.0, 0, 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels (with a valid CRC) but holds almost no data."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def start_server(run_dir: str, store: str, entries: list[ModelEntry], model_api: bool = True,
                 token_auth: bool = True, env: Optional[dict] = None, **config: Any) -> ServerHandle:
    """Write `run_dir`/config.properties for `entries` (ModelEntry) on free ports and start TorchServe from it.

    Returns the ServerHandle (its run folder is `run_dir`/run); `config` adds ServerConfig fields.
    Raises ServerError when TorchServe does not come up within 180 s.
    """
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    server_config = ServerConfig(model_store=store, inference_port=inference, management_port=management,
                                 metrics_port=metrics, grpc_inference_port=grpc_inference,
                                 grpc_management_port=grpc_management, models=tuple(entries), model_api=model_api,
                                 token_auth=token_auth, **config)
    path = write_config(server_config, os.path.join(run_dir, "config.properties"))
    return start(path, os.path.join(run_dir, "run"), timeout_s=180, env=env)
