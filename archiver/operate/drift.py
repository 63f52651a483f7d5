"""Prediction drift: what the build saw its classifier predict, against what the server has predicted since.

The build profiles the artifact's predictions on its validation samples (`prediction_profile`: top-1 label
counts and a top-1 probability histogram) and stores it in the archive's manifest. The handlers count the same
two things per model and version on the metrics port (`tspack_predictions_total`, `tspack_top1_probability_total`,
handlers/metrics.py), with the same bucket edges. `tspack drift` compares the two with the population stability
index (PSI) and the total-variation distance.

The served side is cumulative since the version was loaded: `tspack drift` answers "has this version, so far,
been asked about a different population than it was validated on"; the `TspackPredictionDrift` alert in
alerts.yaml asks the same over the last hour.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from archiver.errors import TspackCliError
from handlers.metrics import PREDICTIONS, TOP1, TOP1_EDGES, bucket_name
from handlers.spec import require

PROFILE_KEY = "prediction_profile"
DEFAULT_MAX_PSI = 0.2  # the usual reading: < 0.1 stable, 0.1-0.2 watch, > 0.2 shifted
DEFAULT_MIN_COUNT = 100
# Laplace smoothing for PSI: an empty bin on either side would make ln(p/q) infinite. Half a count per bin keeps
# the index finite and lets a bin that is empty in a small sample cost little.
SMOOTHING = 0.5


class DriftError(TspackCliError):
    """Drift cannot be measured: no profile in the archive, too few served predictions, a bad profile."""


_require = functools.partial(require, error=DriftError)


# --- the build side ------------------------------------------------------------------------------------


def prediction_profile(probabilities: np.ndarray, labels: list[str]) -> dict:
    """Profile a classifier's predictions on the validation samples.

    Args: probabilities: N x K class probabilities (after softmax, as the handlers answer them); labels: the K
    label names, index order (as the handlers name them in answers).
    Returns: {"samples": N, "labels": {label: top-1 count, every label listed}, "top1_edges": TOP1_EDGES,
    "top1": {bucket upper edge: count}}, JSON-ready.
    Raises: DriftError on a shape that does not match the labels or an empty sample.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    _require(probabilities.ndim == 2 and probabilities.shape[0] >= 1,
             f"prediction profile: expected N x K probabilities with N >= 1, got shape {probabilities.shape}")
    _require(probabilities.shape[1] == len(labels),
             f"prediction profile: {probabilities.shape[1]} classes but {len(labels)} labels")
    top = probabilities.argmax(axis=1)
    counts = {str(label): 0 for label in labels}
    for index in top:
        counts[str(labels[index])] += 1
    # side="left" is bisect_left: the same bucket the handler's top1_bucket picks for the same value.
    buckets = np.minimum(np.searchsorted(TOP1_EDGES, probabilities.max(axis=1), side="left"), len(TOP1_EDGES) - 1)
    top1 = {bucket_name(edge): int(np.sum(buckets == i)) for i, edge in enumerate(TOP1_EDGES)}
    return {"samples": int(len(probabilities)), "labels": counts, "top1_edges": list(TOP1_EDGES), "top1": top1}


def profile_from_outputs(output_spec: Any, outputs: np.ndarray | dict[str, np.ndarray],
                         primary: Optional[str] = None) -> Optional[dict]:
    """The profile of a model's raw outputs, turned into probabilities the way the handlers do (softmax when the
    outputs are logits); None for a model that is not a classifier.

    outputs: the rows of the one output, or output name -> rows (the `primary` one is the classifier's, default
    the first).
    """
    from handlers.postprocess import softmax

    if getattr(output_spec, "kind", None) != "classification":
        return None
    if isinstance(outputs, dict):
        outputs = outputs[primary] if primary else next(iter(outputs.values()))
    flat = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    probabilities = softmax(flat) if output_spec.softmax else flat
    return prediction_profile(probabilities, [output_spec.label(i) for i in range(flat.shape[1])])


# --- the comparison ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Histogram:
    """Counts per bin (labels, or top-1 probability buckets)."""

    counts: dict[str, float]

    def __post_init__(self):
        _require(all(v >= 0 for v in self.counts.values()), f"counts must be >= 0, got {self.counts}")

    @property
    def total(self) -> float:
        return float(sum(self.counts.values()))

    def share(self, key: str) -> float:
        return self.counts.get(key, 0.0) / self.total if self.total else 0.0


def psi(expected: Histogram, served: Histogram) -> float:
    """Population stability index over the union of both bins, Laplace-smoothed (SMOOTHING per bin)."""
    keys = sorted(set(expected.counts) | set(served.counts))
    if not keys or not expected.total or not served.total:
        return 0.0
    smoothed_e = expected.total + SMOOTHING * len(keys)
    smoothed_s = served.total + SMOOTHING * len(keys)
    index = 0.0
    for key in keys:
        q = (expected.counts.get(key, 0.0) + SMOOTHING) / smoothed_e
        p = (served.counts.get(key, 0.0) + SMOOTHING) / smoothed_s
        index += (p - q) * math.log(p / q)
    return index


def total_variation(expected: Histogram, served: Histogram) -> float:
    """Half the L1 distance between the two distributions: the largest gap in probability any event can show."""
    keys = set(expected.counts) | set(served.counts)
    return 0.5 * sum(abs(served.share(k) - expected.share(k)) for k in keys)


@dataclass(frozen=True)
class DriftReport:
    """The served distributions of one model version against its build profile."""

    model: str
    version: str
    expected_labels: Histogram
    served_labels: Histogram
    expected_top1: Histogram
    served_top1: Histogram
    max_psi: float = DEFAULT_MAX_PSI
    label_psi: float = field(init=False)
    top1_psi: float = field(init=False)

    def __post_init__(self):
        _require(self.max_psi > 0, f"--max-psi: must be > 0, got {self.max_psi}")
        object.__setattr__(self, "label_psi", psi(self.expected_labels, self.served_labels))
        object.__setattr__(self, "top1_psi", psi(self.expected_top1, self.served_top1))

    @property
    def label_tv(self) -> float:
        return total_variation(self.expected_labels, self.served_labels)

    @property
    def top1_tv(self) -> float:
        return total_variation(self.expected_top1, self.served_top1)

    @property
    def drifted(self) -> bool:
        return max(self.label_psi, self.top1_psi) > self.max_psi

    def rows(self) -> list[list[str]]:
        """Per label, the most frequent in validation first: validation share, served share, and its part of the
        total-variation distance."""
        expected = self.expected_labels.counts
        keys = sorted(expected, key=lambda k: (-expected[k], k))
        keys += sorted(set(self.served_labels.counts) - set(expected))
        rows = [["label", "validation", "served", "tv_part"]]
        for key in keys:
            e, s = self.expected_labels.share(key), self.served_labels.share(key)
            rows.append([key, f"{e:.1%}", f"{s:.1%}", f"{0.5 * abs(s - e):.3f}"])
        return rows

    def summary(self) -> str:
        verdict = "DRIFT" if self.drifted else "ok"
        return (f"{self.model} {self.version}: {int(self.served_labels.total)} served predictions vs "
                f"{int(self.expected_labels.total)} validation samples\n"
                f"labels:      PSI {self.label_psi:.3f}  TV {self.label_tv:.3f}\n"
                f"top-1 prob.: PSI {self.top1_psi:.3f}  TV {self.top1_tv:.3f}\n"
                f"{verdict}: max PSI {max(self.label_psi, self.top1_psi):.3f} "
                f"{'>' if self.drifted else '<='} --max-psi {self.max_psi:g}")


def check_profile(profile: Any, where: str) -> dict:
    """The profile dict, refused with a message naming `where` when it is missing or was made with other edges."""
    _require(isinstance(profile, dict) and isinstance(profile.get("labels"), dict)
             and isinstance(profile.get("top1"), dict),
             f"{where} has no prediction profile (validation.{PROFILE_KEY}): rebuild it with this tspack, as a "
             f"classifier with validation samples")
    _require([float(e) for e in profile.get("top1_edges", [])] == list(TOP1_EDGES),
             f"{where}: its prediction profile uses top-1 buckets {profile.get('top1_edges')}, the server counts "
             f"{list(TOP1_EDGES)}; rebuild it with this tspack")
    return profile


def served_histograms(samples: list[tuple[str, dict, float]], model: str,
                      version: str) -> tuple[Histogram, Histogram]:
    """Top-1 label and probability-bucket counts of one model version, summed over hosts, from parsed metrics."""
    labels: dict[str, float] = {}
    top1: dict[str, float] = {}
    for name, tags, value in samples:
        if tags.get("ModelName") != model or tags.get("ModelVersion") != version:
            continue
        if name == PREDICTIONS and "Label" in tags:
            labels[tags["Label"]] = labels.get(tags["Label"], 0.0) + value
        elif name == TOP1 and "Bucket" in tags:
            top1[tags["Bucket"]] = top1.get(tags["Bucket"], 0.0) + value
    return Histogram(labels), Histogram(top1)


def compare(profile: dict, samples: list[tuple[str, dict, float]], model: str, version: str,
            max_psi: float = DEFAULT_MAX_PSI, min_count: int = DEFAULT_MIN_COUNT) -> DriftReport:
    """Compare parsed metrics (archiver.operate.status.parse_prometheus) with a build profile.

    Raises: DriftError when fewer than `min_count` predictions were served (PSI on a handful is noise).
    """
    served_labels, served_top1 = served_histograms(samples, model, version)
    _require(served_labels.total >= min_count,
             f"{model} {version}: {int(served_labels.total)} predictions served so far, fewer than --min-count "
             f"{min_count}; the comparison would be noise")
    return DriftReport(model, version, Histogram(dict(profile["labels"])), served_labels,
                       Histogram(dict(profile["top1"])), served_top1, max_psi)


# --- against a running server --------------------------------------------------------------------------


def served_archive(client: Any, store: str, model: str, version: Optional[str]) -> tuple[str, str]:
    """(version, archive path in the model store) of `model` (its default version unless `version` is given)."""
    described = client.describe(model, version)
    _require(bool(described), f"{model}: not registered")
    url = str(described[0].get("modelUrl") or "")
    path = os.path.join(store, os.path.basename(url.removeprefix("file://")))
    _require(os.path.isfile(path), f"{model}: its archive {url!r} is not in the model store {store}")
    return str(described[0].get("modelVersion")), path


def drift_report(handle: Any, model: str, version: Optional[str] = None, max_psi: float = DEFAULT_MAX_PSI,
                 min_count: int = DEFAULT_MIN_COUNT) -> DriftReport:
    """Read the server's metrics port and the served archive's profile, and compare them.

    Args: handle: archiver.operate.server.ServerHandle of the running server.
    Raises: DriftError (no profile, too few predictions), ApiError (the server refused), BuildError (not a
    tspack archive, e.g. an A/B router: run it on each variant's model).
    """
    from archiver.deploy.properties import read_properties
    from archiver.operate.status import parse_prometheus
    from archiver.package.archive import read_manifest

    client = handle.client()
    store = read_properties(handle.config_path).get("model_store", "")
    version, archive = served_archive(client, store, model, version)
    profile = check_profile(read_manifest(archive).validation.get(PROFILE_KEY), os.path.basename(archive))
    return compare(profile, parse_prometheus(client.metrics()), model, version, max_psi, min_count)
