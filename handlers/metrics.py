"""Prometheus metrics emitted through TorchServe's metrics API.

Each metric is declared in the metrics config the pack generates (`tspack config` writes it next to
config.properties), with the dimension names below in this order; TorchServe appends `Hostname`.
A broken metric must never break inference, so every emission failure is logged once and swallowed.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Optional

logger = logging.getLogger(__name__)

REQUESTS = "tspack_requests_total"
ERRORS = "tspack_errors_total"
ROWS = "tspack_rows_total"
BATCHES = "tspack_batches_total"
LATENCY = "tspack_handler_latency_seconds"
BATCH_SIZE = "tspack_batch_size"  # requests per TorchServe batch, as the handler received them
SHADOW = "tspack_shadow_total"
PREDICTIONS = "tspack_predictions_total"  # top-1 labels served (drift)
TOP1 = "tspack_top1_probability_total"  # top-1 probabilities served, by bucket (drift)
CACHE = "tspack_cache_total"  # response cache lookups and evictions, by Outcome: hit, miss, evicted

# Upper edges of the top-1 probability buckets: bucket "0.9" holds (0.75, 0.9], the first [0, 0.25]. Shared with
# the build's prediction profile (archiver/operate/drift.py), so served and validation histograms compare bin for bin.
# Denser near 1, where a trained classifier's confidence lives. A counter per bucket rather than a TorchServe
# histogram: those have the Prometheus client's fixed buckets (0.005..10, only 4 of them in (0.1, 1]) and cost
# one emitted line per observation, while counters are summed in memory and flushed once per FLUSH_S.
TOP1_EDGES = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
OTHER_LABEL = "__other__"  # labels past the cap (a model without a label list): the series count stays bounded
DEFAULT_LABEL_CAP = 1000

# name -> (TorchServe metric type, unit, dimension names without Hostname)
DECLARED = {
    REQUESTS: ("counter", "Count", ["ModelName", "ModelVersion", "Variant", "Status"]),
    ERRORS: ("counter", "Count", ["ModelName", "ModelVersion", "Variant", "ErrorType"]),
    ROWS: ("counter", "Count", ["ModelName", "ModelVersion", "Variant"]),
    BATCHES: ("counter", "Count", ["ModelName", "ModelVersion", "Variant"]),
    LATENCY: ("histogram", "Seconds", ["ModelName", "ModelVersion"]),
    BATCH_SIZE: ("histogram", "Count", ["ModelName", "ModelVersion"]),
    SHADOW: ("counter", "Count", ["ModelName", "Primary", "Shadow", "Outcome"]),
    PREDICTIONS: ("counter", "Count", ["ModelName", "ModelVersion", "Label"]),
    TOP1: ("counter", "Count", ["ModelName", "ModelVersion", "Bucket"]),
    CACHE: ("counter", "Count", ["ModelName", "ModelVersion", "Outcome"]),
}

NO_VARIANT = "none"


def top1_bucket(probability: float) -> str:
    """The TOP1_EDGES bucket (its upper edge, as the `Bucket` label spells it) holding `probability`."""
    index = min(bisect.bisect_left(TOP1_EDGES, probability), len(TOP1_EDGES) - 1)
    return bucket_name(TOP1_EDGES[index])


def bucket_name(edge: float) -> str:
    return f"{edge:g}"


def top1_predictions(answers: Iterable[Any]) -> Iterator[tuple[str, float]]:
    """(label, probability) of each row's top-1 prediction in the 200 answers of a classifier.

    A body carries `predictions` (one row) or `results` (several rows, each with `predictions`), ranked.
    """
    for answer in answers:
        body = getattr(answer, "body", None)
        if answer.status != 200 or not isinstance(body, dict):
            continue
        rows = body.get("results") if isinstance(body.get("results"), list) else [body]
        for row in rows:
            ranked = row.get("predictions") if isinstance(row, dict) else None
            if ranked and isinstance(ranked[0], dict) and "probability" in ranked[0]:
                yield str(ranked[0].get("label")), float(ranked[0]["probability"])


class HandlerMetrics:
    """Thin, failure-proof wrapper over `context.metrics` for one served model.

    Each emission is a line on the worker's stdout that the frontend parses: per batch that cost a quarter of
    a worker's busy time at concurrency 1 (py-spy, measured here). So counters are summed in memory and
    flushed every FLUSH_S seconds by a daemon thread; the latency and batch-size histograms are observed per
    batch.
    """

    FLUSH_S = 1.0

    def __init__(self, context: Any, manifest: Any):
        self.cache = getattr(context, "metrics", None)
        self.model = getattr(context, "model_name", None) or manifest.name
        self.version = manifest.version
        self._warned: set[str] = set()
        self._pending: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self._flusher: Optional[threading.Thread] = None
        output = getattr(manifest, "output", None)
        self._label_cap = len(getattr(output, "labels", None) or ()) or DEFAULT_LABEL_CAP
        self._labels_seen: set[str] = set()

    def record(self, answers: Iterable[Any], stats: Any, latency_ms: float,
               version: str | None = None, variant: str = NO_VARIANT) -> None:
        """Count requests by status and errors by type, rows and runs, cache outcomes; observe handler latency and
        batch size."""
        version = version or self.version
        answers = list(answers)
        by_status: dict[str, int] = {}
        for answer in answers:
            by_status[str(answer.status)] = by_status.get(str(answer.status), 0) + 1
        for status, count in by_status.items():
            self.count(REQUESTS, count, (self.model, version, variant, status))
        for error_type, count in stats.errors.items():
            self.count(ERRORS, count, (self.model, version, variant, error_type))
        if stats.runs:
            self.count(ROWS, stats.rows, (self.model, version, variant))
            self.count(BATCHES, stats.runs, (self.model, version, variant))
        for outcome, count in stats.cache.items():
            self.count(CACHE, count, (self.model, version, outcome))
        self.emit(LATENCY, latency_ms / 1000.0, [self.model, version])
        self.emit(BATCH_SIZE, float(len(answers)), [self.model, version])
        self.predictions(answers, version)

    def predictions(self, answers: list[Any], version: str) -> None:
        """Count each served row's top-1 label and probability bucket (drift metrics)."""
        try:
            for label, probability in top1_predictions(answers):
                if label not in self._labels_seen:
                    if len(self._labels_seen) >= self._label_cap:
                        label = OTHER_LABEL
                    else:
                        self._labels_seen.add(label)
                self.count(PREDICTIONS, 1, (self.model, version, label))
                self.count(TOP1, 1, (self.model, version, top1_bucket(probability)))
        except (TypeError, ValueError, AttributeError) as exc:  # an odd answer body: keep serving, say so once
            if PREDICTIONS not in self._warned:
                self._warned.add(PREDICTIONS)
                logger.warning("drift metrics not counted for an answer: %s", exc)

    def shadow(self, primary: str, shadow: str, outcome: str) -> None:
        self.count(SHADOW, 1, (self.model, primary, shadow, outcome))

    def count(self, name: str, value: float, dimension_values: tuple[str, ...]) -> None:
        """Add to a counter; reaches Prometheus at the next flush."""
        if self.cache is None:
            return
        with self._lock:
            key = (name, dimension_values)
            self._pending[key] = self._pending.get(key, 0.0) + value
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_forever, name="tspack-metrics", daemon=True)
                self._flusher.start()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for (name, dims), value in pending.items():
            self.emit(name, value, list(dims))

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_S)
            self.flush()

    def emit(self, name: str, value: float, dimension_values: list[str]) -> None:
        if self.cache is None:
            return
        try:
            from ts.metrics.metric_type_enum import MetricTypes

            kind = {"counter": MetricTypes.COUNTER, "gauge": MetricTypes.GAUGE,
                    "histogram": MetricTypes.HISTOGRAM}[DECLARED[name][0]]
            self.cache.get_metric(name, kind).add_or_update(value, dimension_values)
        except Exception as exc:  # undeclared metric (foreign config), bad dims: log once, keep serving
            if name not in self._warned:
                self._warned.add(name)
                logger.warning("metric %s not emitted (declare it in the metrics config): %s", name, exc)


def metrics_yaml_section() -> dict:
    """The `model_metrics` entries the generated metrics config declares."""
    section: dict[str, list] = {}
    for name, (kind, unit, dims) in DECLARED.items():
        section.setdefault(kind, []).append({"name": name, "unit": unit, "dimensions": list(dims)})
    return section
