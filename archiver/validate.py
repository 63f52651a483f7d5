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

RunFn = Callable[[np.ndarray], np.ndarray]


@dataclass
class Figures:
    """What validation measured for one artifact."""

    samples: int = 0
    max_abs_error: float = 0.0
    top1_agreement: Optional[float] = None
    accuracy: Optional[float] = None
    reference_accuracy: Optional[float] = None
    latency_ms_b1: Optional[float] = None
    latency_ms_b32: Optional[float] = None
    failures: list[str] = field(default_factory=list)

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
            "samples": self.samples, "max_abs_error": self.max_abs_error, "top1_agreement": self.top1_agreement,
            "accuracy": self.accuracy, "reference_accuracy": self.reference_accuracy,
            "latency_ms_b1": self.latency_ms_b1, "latency_ms_b32": self.latency_ms_b32, "passed": self.passed,
            "failures": list(self.failures),
        }


@dataclass(frozen=True)
class Criteria:
    """What an artifact must meet. Numeric artifacts use `tolerance`; int8 and pruned ones use task metrics."""

    tolerance: Optional[float] = 1e-4
    min_top1_agreement: Optional[float] = None
    max_accuracy_drop_points: Optional[float] = None


def run_batched(run: RunFn, inputs: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])


def compare(reference: RunFn, candidate: RunFn, inputs: np.ndarray, criteria: Criteria,
            labels: Optional[np.ndarray] = None, batch: int = 16) -> Figures:
    """Run both on `inputs` (at batch 1 for a few samples and at `batch` for all) and measure the gap."""
    figures = Figures(samples=int(len(inputs)))
    expected = run_batched(reference, inputs, batch)
    got = run_batched(candidate, inputs, batch)
    singles = min(4, len(inputs))
    got_single = run_batched(candidate, inputs[:singles], 1)
    if got.shape != expected.shape:
        figures.failures.append(f"output shape {got.shape} differs from eager {expected.shape}")
        return figures
    got = got.astype(np.float64)
    expected = expected.astype(np.float64)
    errors = np.abs(got - expected)
    figures.max_abs_error = float(np.nanmax(errors)) if errors.size else 0.0
    if not np.all(np.isfinite(got)):
        figures.failures.append("artifact produced NaN or infinity")
    batch_gap = float(np.max(np.abs(got_single.astype(np.float64) - got[:singles]))) if singles else 0.0
    if expected.ndim >= 2 and expected.shape[-1] > 1:
        got_top1 = got.reshape(len(got), -1).argmax(1)
        expected_top1 = expected.reshape(len(expected), -1).argmax(1)
        figures.top1_agreement = float(np.mean(got_top1 == expected_top1))
        if labels is not None:
            figures.accuracy = float(np.mean(got_top1 == labels))
            figures.reference_accuracy = float(np.mean(expected_top1 == labels))
    figures.failures.extend(_unmet(criteria, figures, errors, batch_gap, batch))
    return figures


def _unmet(criteria: Criteria, figures: Figures, errors: np.ndarray, batch_gap: float, batch: int) -> list[str]:
    failures = []
    if criteria.tolerance is not None:
        if figures.max_abs_error > criteria.tolerance:
            worst = int(np.unravel_index(np.nanargmax(errors), errors.shape)[0])
            failures.append(f"max abs error {figures.max_abs_error:.3g} exceeds tolerance {criteria.tolerance:g} "
                            f"(worst at sample {worst})")
        if batch_gap > criteria.tolerance:
            failures.append(f"batch-1 and batch-{batch} outputs differ by {batch_gap:.3g}")
    agreement = figures.top1_agreement
    if criteria.min_top1_agreement is not None and agreement is not None and agreement < criteria.min_top1_agreement:
        failures.append(f"top-1 agreement {agreement:.2%} below the required {criteria.min_top1_agreement:.2%}")
    drop = figures.accuracy_drop_points
    if criteria.max_accuracy_drop_points is not None and drop is not None and drop > criteria.max_accuracy_drop_points:
        failures.append(f"accuracy {figures.accuracy:.2%} is {drop:.2f} points below eager "
                        f"{figures.reference_accuracy:.2%} (allowed {criteria.max_accuracy_drop_points:g})")
    return failures


def measure_latency(run: RunFn, inputs: np.ndarray, batch: int, budget_s: float = 0.5, max_runs: int = 200,
                    warmup: int = 5) -> float:
    """Median in-process latency (ms) of one call at `batch` rows, after `warmup` calls."""
    rows = np.concatenate([inputs] * (batch // len(inputs) + 1))[:batch] if len(inputs) < batch else inputs[:batch]
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
