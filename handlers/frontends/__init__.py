"""Front ends: how a request becomes named, validated arrays, and how outputs become an answer.

Which front end an archive uses is its manifest's `frontend`, looked up in handlers/registry.py's table.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

import numpy as np

from handlers.registry import FRONTENDS, load_class
from handlers.request import Decoded, Request
from handlers.spec import ArtifactManifest

Batch = tuple[list[int], dict[str, np.ndarray]]


class Frontend(Protocol):
    def decode(self, request: Request) -> Decoded:
        """One request -> named arrays (axis 0: the request's rows), or a typed 4xx error."""

    def encode(self, decoded: Decoded, outputs: dict[str, np.ndarray], meta: dict) -> Any:
        """This request's rows of every output -> a JSON-ready dict (or an Answer, for binary bodies)."""

    def example_input(self) -> Decoded:
        """One valid sample, for the warm-up run at load."""

    def collate(self, items: list[Decoded]) -> list[Batch]:
        """Groups of items that run as one batch: (indices into items, stacked inputs)."""


def frontend_for(manifest: ArtifactManifest, model_dir: str = "") -> Frontend:
    """The front end the archive was built with."""
    return load_class(FRONTENDS[manifest.frontend].cls)(manifest, model_dir)


def stack_by_shape(items: list[Decoded]) -> list[Batch]:
    """Items whose inputs have the same per-sample shapes and dtypes are concatenated into one batch.

    Inputs with free axes (e.g. sequence length) of different lengths cannot stack, so they run apart.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for idx, item in enumerate(items):
        key = tuple((name, a.shape[1:], a.dtype.str) for name, a in item.inputs.items())
        groups[key].append(idx)
    batches = []
    for indices in groups.values():
        first = items[indices[0]]
        if len(indices) == 1:
            batches.append((indices, first.inputs))
            continue
        stacked = {name: np.concatenate([items[i].inputs[name] for i in indices]) for name in first.inputs}
        batches.append((indices, stacked))
    return batches


def zeros_example(manifest: ArtifactManifest) -> Decoded:
    """One zero sample of every declared input (free axes of length 1)."""
    inputs = {spec.name: np.zeros((1, *(1 if d == -1 else d for d in spec.shape)), dtype=np.dtype(spec.dtype))
              for spec in manifest.inputs}
    return Decoded(inputs, single=True, protocol="json")
