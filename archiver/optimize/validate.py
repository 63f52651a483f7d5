"""Validation of an exported artifact against the eager model it came from.

Shape first, then values, then task metrics; every failure is collected and reported at once, the
worst differences named. The artifact is run through the same runtime classes the handlers serve
with, so what is validated is what is served.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from archiver.errors import ValidationFailed

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass
class Figures:
    """What validation measured for one artifact."""

    samples: int = 0
    max_abs_error: float = 0.0
    max_abs_error_by_output: dict = field(default_factory=dict)
    checked_lengths: list = field(default_factory=list)  # free-axis lengths validated (empty: no free axis)
    top1_agreement: Optional[float] = None
    accuracy: Optional[float] = None
    reference_accuracy: Optional[float] = None
    latency_ms_b1: Optional[float] = None
    latency_ms_b32: Optional[float] = None
    failures: list[str] = field(default_factory=list)
    # name -> OIP datatype and shape as the served runtime returned it, -1 for the batch axis and for axes whose
    # length followed a free input axis: what the OIP gateway reports as the model's outputs
    output_tensors: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def accuracy_drop_points(self) -> Optional[float]:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return 100.0 * (self.reference_accuracy - self.accuracy)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples, "max_abs_error": self.max_abs_error,
            "max_abs_error_by_output": dict(self.max_abs_error_by_output),
            "checked_lengths": list(self.checked_lengths), "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy, "reference_accuracy": self.reference_accuracy,
            "latency_ms_b1": self.latency_ms_b1, "latency_ms_b32": self.latency_ms_b32, "passed": self.passed,
            "failures": list(self.failures), "output_tensors": dict(self.output_tensors),
        }


@dataclass(frozen=True)
class Criteria:
    """What an artifact must meet. Numeric artifacts use `tolerance`; int8 and pruned ones use task metrics."""

    tolerance: Optional[float] = 1e-4
    min_top1_agreement: Optional[float] = None
    max_accuracy_drop_points: Optional[float] = None


def rows_of(inputs: Arrays) -> int:
    return int(next(iter(inputs.values())).shape[0])


def take(inputs: Arrays, start: int, stop: int) -> Arrays:
    return {name: array[start:stop] for name, array in inputs.items()}


def run_batched(run: RunFn, inputs: Arrays, batch: int) -> Arrays:
    parts = [run(take(inputs, i, i + batch)) for i in range(0, rows_of(inputs), batch)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def compare(reference: RunFn, candidate: RunFn, inputs: Arrays, criteria: Criteria,
            labels: Optional[np.ndarray] = None, batch: int = 16, primary: Optional[str] = None,
            extra_sets: tuple[Arrays, ...] = ()) -> Figures:
    """Run both on `inputs` (at batch 1 for a few samples and at `batch` for all) and measure the gap per output.

    `extra_sets` are the same kind of samples at another length of every free axis: an export that specialised
    a length fails on them. Top-1 and accuracy are read from the `primary` output (default: the first).
    """
    figures = Figures(samples=rows_of(inputs))
    seen: list[Arrays] = []
    for position, sample_set in enumerate((inputs, *extra_sets)):
        expected = run_batched(reference, sample_set, batch)
        got = run_batched(candidate, sample_set, batch)
        singles = min(4, rows_of(sample_set))
        got_single = run_batched(candidate, take(sample_set, 0, singles), 1)
        if set(got) != set(expected):
            figures.failures.append(f"outputs {sorted(got)} differ from eager's {sorted(expected)}")
            return figures
        for name in expected:
            label = f"output '{name}': " if len(expected) > 1 else ""
            _compare_output(figures, criteria, name, label, expected[name], got[name], got_single[name][:singles],
                            batch)
        if position == 0:
            name = primary or next(iter(expected))
            _classification_figures(figures, expected[name], got[name], labels)
        seen.append(got)
    figures.output_tensors = output_tensors(seen)
    figures.failures.extend(_unmet(criteria, figures))
    return figures


def output_tensors(runs: list[Arrays]) -> dict:
    """Each output's OIP datatype and shape over runs at different free-axis lengths: -1 for the batch axis and
    for every axis whose length differed between runs. Outputs with no OIP datatype are left out."""
    from handlers.errors import UnsupportedDatatype
    from handlers.oip import datatype_of

    tensors = {}
    for name, first in runs[0].items():
        shapes = {run[name].shape for run in runs if name in run}
        if len({len(s) for s in shapes}) != 1:
            continue
        try:
            datatype = datatype_of(first)
        except UnsupportedDatatype:
            continue
        shape = [-1 if axis == 0 or len({s[axis] for s in shapes}) > 1 else int(first.shape[axis])
                 for axis in range(first.ndim)]
        tensors[name] = {"datatype": datatype, "shape": shape}
    return tensors


def _compare_output(figures: Figures, criteria: Criteria, name: str, label: str, expected: np.ndarray,
                    got: np.ndarray, got_single: np.ndarray, batch: int) -> None:
    if got.shape != expected.shape:
        figures.failures.append(f"{label}output shape {got.shape} differs from eager {expected.shape}")
        return
    got64, expected64 = got.astype(np.float64), expected.astype(np.float64)
    errors = np.abs(got64 - expected64)
    error = float(np.nanmax(errors)) if errors.size else 0.0
    figures.max_abs_error_by_output[name] = max(error, figures.max_abs_error_by_output.get(name, 0.0))
    figures.max_abs_error = max(figures.max_abs_error, error)
    if not np.all(np.isfinite(got64)):
        figures.failures.append(f"{label}artifact produced NaN or infinity")
    if criteria.tolerance is None:
        return
    if error > criteria.tolerance:
        worst = int(np.unravel_index(np.nanargmax(errors), errors.shape)[0])
        figures.failures.append(f"{label}max abs error {error:.3g} exceeds tolerance {criteria.tolerance:g} "
                                f"(worst at sample {worst}, shape {tuple(got.shape)})")
    singles = len(got_single)
    gap = float(np.max(np.abs(got_single.astype(np.float64) - got64[:singles]))) if singles else 0.0
    if gap > criteria.tolerance:
        figures.failures.append(f"{label}batch-1 and batch-{batch} outputs differ by {gap:.3g}")


def _classification_figures(figures: Figures, expected: np.ndarray, got: np.ndarray,
                            labels: Optional[np.ndarray]) -> None:
    if expected.ndim < 2 or expected.shape[-1] <= 1 or got.shape != expected.shape:
        return
    got_top1 = got.reshape(len(got), -1).argmax(1)
    expected_top1 = expected.reshape(len(expected), -1).argmax(1)
    figures.top1_agreement = float(np.mean(got_top1 == expected_top1))
    if labels is not None and len(labels) == len(got_top1):
        figures.accuracy = float(np.mean(got_top1 == labels))
        figures.reference_accuracy = float(np.mean(expected_top1 == labels))


def _unmet(criteria: Criteria, figures: Figures) -> list[str]:
    failures = []
    agreement = figures.top1_agreement
    if criteria.min_top1_agreement is not None and agreement is not None and agreement < criteria.min_top1_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} below the required {criteria.min_top1_agreement:.2%}")
    drop = figures.accuracy_drop_points
    if criteria.max_accuracy_drop_points is not None and drop is not None and drop > criteria.max_accuracy_drop_points:
        failures.append(f"accuracy {figures.accuracy:.2%} is {drop:.2f} points below eager "
                        f"{figures.reference_accuracy:.2%} (allowed {criteria.max_accuracy_drop_points:g})")
    return failures


def measure_latency(run: RunFn, inputs: Arrays, batch: int, budget_s: float = 0.5, max_runs: int = 200,
                    warmup: int = 5) -> float:
    """Median in-process latency (ms) of one call at `batch` rows, after `warmup` calls."""
    count = rows_of(inputs)
    rows = {name: np.concatenate([a] * (batch // count + 1))[:batch] if count < batch else a[:batch]
            for name, a in inputs.items()}
    # TorchScript's profiling executor re-optimizes on the first calls of each new shape.
    for _ in range(warmup):
        run(rows)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_runs and (len(times) < 5 or time.perf_counter() < deadline):
        started = time.perf_counter()
        run(rows)
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(times))


def require_passed(artifact: str, figures: Figures) -> None:
    """Fail the build loudly, naming the artifact and every failure."""
    if not figures.passed:
        raise ValidationFailed(f"{artifact}: validation failed: " + "; ".join(figures.failures))
