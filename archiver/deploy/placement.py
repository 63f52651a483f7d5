"""GPU placement: what goes into each archive's model-config.yaml, and where TorchServe will put workers.

TorchServe 0.12 ignores `deviceIds` in config.properties' `models=` block and honours them only in the
archive's model-config.yaml; an id >= number_of_gpu makes it drop the whole list silently (with a log
warning) and fall back to its global round-robin. So ids are checked here, at build and config time.

`assign` reproduces the frontend's logic (WorkLoadManager.addThreads) so the placement a config
produces can be printed and tested without GPUs:
- deviceType cpu, or no GPU on the host: no GPU;
- deviceIds given: the model's own counter walks its list, worker i -> deviceIds[i % len];
- otherwise: one counter shared by every model walks all GPUs, starting at GPU 1 % number_of_gpu.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from archiver.spec import ServingSpec
from archiver.tables import render
from handlers.errors import SpecError


def detect_gpus() -> int:
    """GPUs on this host: nvidia-smi when present, else torch, else 0."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=20).stdout
            return len([line for line in out.splitlines() if line.startswith("GPU ")])
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def device_config(serving: ServingSpec, gpus: int, key: str = "serving") -> dict:
    """deviceType, deviceIds and worker counts for model-config.yaml, for a target host with `gpus` GPUs.

    Raises:
        SpecError: a GPU id that the target host does not have, or GPUs required (cpu_fallback: false)
            on a host with none.
    """
    workers = {"minWorkers": serving.workers, "maxWorkers": serving.max_workers or serving.workers}
    if serving.devices == "cpu":
        return {"deviceType": "cpu", **workers}
    ids = list(range(gpus)) if serving.devices == "all" else list(serving.devices)
    if not ids or gpus == 0:
        if not serving.cpu_fallback:
            raise SpecError(f"{key}.devices: needs GPUs, but the target host has none and cpu_fallback is false")
        if serving.devices != "all":
            raise SpecError(f"{key}.devices: lists GPU {ids[0]}, but the target host has 0 GPUs; set gpus: N in the "
                            "spec (or --gpus N) for the host you deploy to")
        return {"deviceType": "gpu", **workers}  # TorchServe falls back to CPU when the host has no GPU
    missing = [i for i in ids if i >= gpus]
    if missing:
        raise SpecError(f"{key}.devices: GPU {missing[0]} does not exist on a target host with {gpus} GPU(s) "
                        "(TorchServe would silently drop the whole device list)")
    count = len(ids) * serving.workers_per_gpu
    return {"deviceType": "gpu", "deviceIds": ids, "minWorkers": count, "maxWorkers": count}


@dataclass(frozen=True)
class Deployed:
    """A model as TorchServe places it: its model-config device settings and worker count."""

    name: str
    workers: int
    device_type: Optional[str] = None
    device_ids: tuple[int, ...] = ()


def assign(models: list[Deployed], number_of_gpu: int) -> dict[str, list[Optional[int]]]:
    """The GPU of each worker (None: CPU), model by model in registration order."""
    shared_counter = 0
    placement: dict[str, list[Optional[int]]] = {}
    for model in models:
        on_gpu = number_of_gpu > 0 and model.device_type != "cpu"
        ids = list(model.device_ids)
        if ids and any(i < 0 or i >= number_of_gpu for i in ids):
            ids = []  # what TorchServe does: warn and ignore the list
        gpus: list[Optional[int]] = []
        for worker in range(model.workers):
            if not on_gpu:
                gpus.append(None)
            elif ids:
                gpus.append(ids[worker % len(ids)])
            else:
                shared_counter = (shared_counter + 1) % number_of_gpu
                gpus.append(shared_counter)
        placement[model.name] = gpus
    return placement


def placement_table(placement: dict[str, list[Optional[int]]], number_of_gpu: int) -> str:
    """Model x device table of worker counts."""
    columns = [f"gpu{i}" for i in range(number_of_gpu)] + ["cpu"]
    rows = [["model", *columns]]
    for model, gpus in placement.items():
        counts = [sum(1 for g in gpus if g == i) for i in range(number_of_gpu)] + [sum(1 for g in gpus if g is None)]
        rows.append([model, *(str(c) if c else "-" for c in counts)])
    return render(rows)
