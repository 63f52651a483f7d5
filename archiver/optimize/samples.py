"""The samples a build validates (and calibrates) with: named arrays, labels, and a second free-axis length.

An export that specialised a length (a traced sequence length, a program whose Dim collapsed to a constant)
computes the right answer at the length it saw and fails at any other, so every model with a free axis is
validated at two lengths of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from archiver.spec import ArtifactSpec, ModelSpec
from handlers.errors import SpecError
from handlers.spec import InputSpec

Arrays = dict[str, np.ndarray]

# Lengths of free axes in generated samples: two values far enough apart that a specialised export shows.
GENERATED_LENGTHS = (7, 31)


@dataclass
class Samples:
    inputs: Arrays  # input name -> N x sample shape
    labels: Optional[np.ndarray] = None
    other_lengths: list[Arrays] = field(default_factory=list)  # the same samples at another free-axis length

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0])

    def head(self, rows: int) -> Arrays:
        return {name: np.ascontiguousarray(a[:rows]) for name, a in self.inputs.items()}

    def lengths(self) -> list[int]:
        """The free-axis lengths the samples hold (empty when the model has none)."""
        found = []
        for arrays in (self.inputs, *self.other_lengths):
            for a in arrays.values():
                if a.ndim > 1:
                    found.append(int(a.shape[-1]))
                    break
        return found


def _fits(array: np.ndarray, spec: InputSpec) -> bool:
    return array.ndim == len(spec.shape) + 1 and all(e == -1 or s == e for s, e in zip(array.shape[1:], spec.shape))


def _has_free_axis(specs: tuple[InputSpec, ...]) -> bool:
    return any(-1 in spec.shape for spec in specs)


def load_samples(model: ModelSpec) -> Samples:
    """Validation inputs and labels from the samples file (one array per input name; `x` for one input), or
    seeded random data (free axes at two lengths).

    Raises:
        SpecError: the file is missing an input or holds arrays of the wrong shape.
    """
    key = f"models.{model.name}.samples"
    if model.samples.file:
        return _from_file(model, key)
    rng = np.random.default_rng(model.samples.seed)
    sets = [_generated(model.inputs, rng, model.samples.count, length) for length in GENERATED_LENGTHS]
    if not _has_free_axis(model.inputs):
        sets = sets[:1]
    return Samples(sets[0], None, sets[1:])


def _generated(specs: tuple[InputSpec, ...], rng: np.random.Generator, count: int, length: int) -> Arrays:
    arrays = {}
    for spec in specs:
        concrete = tuple(length if d == -1 else d for d in spec.shape)
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal((count, *concrete)).astype(dtype)
        elif dtype.kind == "b":
            arrays[spec.name] = np.ones((count, *concrete), dtype=dtype)
        else:
            arrays[spec.name] = rng.integers(0, 100, size=(count, *concrete)).astype(dtype)
    return arrays


def _from_file(model: ModelSpec, key: str) -> Samples:
    path = model.samples.file
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SpecError(f"{key}.file: cannot read {path}: {exc}") from exc
    arrays = {}
    for spec in model.inputs:
        name = model.samples.inputs_key if len(model.inputs) == 1 and spec.name not in data else spec.name
        if name not in data:
            raise SpecError(f"{key}.file: no array '{name}' in {os.path.basename(path)} (has {', '.join(data.files)}); "
                            "store one array per input name")
        if not _fits(data[name], spec):
            raise SpecError(f"{key}.file: '{name}' has shape {tuple(data[name].shape)}, expected "
                            f"(N, {', '.join(map(str, spec.shape))})")
        arrays[spec.name] = data[name].astype(np.dtype(spec.dtype), copy=False)
    rows = {a.shape[0] for a in arrays.values()}
    if len(rows) != 1:
        raise SpecError(f"{key}.file: the inputs have different numbers of rows: {sorted(rows)}")
    labels = data[model.samples.labels_key] if model.samples.labels_key in data else None
    samples = Samples(arrays, labels)
    shorter = _shortened(arrays, model.inputs)
    if shorter is not None:
        samples.other_lengths.append(shorter)
    return samples


def _shortened(arrays: Arrays, specs: tuple[InputSpec, ...]) -> Optional[Arrays]:
    """The samples with every free axis cut to about half its length: a second length to validate at."""
    if not _has_free_axis(specs):
        return None
    out = {}
    for spec in specs:
        array = arrays[spec.name]
        index = [slice(None)] * array.ndim
        for axis, d in enumerate(spec.shape, start=1):
            if d == -1 and array.shape[axis] >= 4:
                index[axis] = slice(0, array.shape[axis] // 2 + 1)
        out[spec.name] = np.ascontiguousarray(array[tuple(index)])
    return out


def calibration(model: ModelSpec, artifact: ArtifactSpec, samples: Samples) -> Arrays:
    """Calibration samples for static int8: the quantize spec's file, else the model's samples."""
    spec = artifact.quantize
    key = f"models.{model.name}.artifacts.{artifact.id}.quantize.calibration_file"
    arrays = samples.inputs
    if spec.calibration_file:
        try:
            data = np.load(spec.calibration_file, allow_pickle=False)
            if len(model.inputs) == 1:
                arrays = {model.inputs[0].name: data[spec.calibration_key]}
            else:
                arrays = {i.name: data[i.name] for i in model.inputs}
        except (OSError, ValueError, KeyError) as exc:
            raise SpecError(f"{key}: cannot read '{spec.calibration_key}' from {spec.calibration_file}: {exc}") from exc
    for input_spec in model.inputs:
        data = arrays[input_spec.name]
        if not _fits(data, input_spec):
            expected = ", ".join(map(str, input_spec.shape))
            raise SpecError(f"{key}: calibration data has shape {tuple(data.shape)}, expected (N, {expected})")
    return {i.name: np.ascontiguousarray(arrays[i.name][: spec.calibration_samples].astype(np.dtype(i.dtype),
                                                                                            copy=False))
            for i in model.inputs}
