"""Prediction drift without a server: the build's profile, PSI and total variation, and the handlers' counters."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from archiver.operate.drift import (
    DriftError,
    DriftReport,
    Histogram,
    check_profile,
    compare,
    prediction_profile,
    profile_from_outputs,
    psi,
    total_variation,
)
from archiver.operate.status import parse_prometheus
from handlers.metrics import (
    OTHER_LABEL,
    PREDICTIONS,
    TOP1,
    TOP1_EDGES,
    HandlerMetrics,
    bucket_name,
    top1_bucket,
    top1_predictions,
)
from handlers.pipeline import Answer
from handlers.spec import OutputSpec
from tests import support

LABELS = support.LABELS


def _probabilities(rows: int, seed: int = 0, sharp: float = 4.0) -> np.ndarray:
    return support.softmax(np.random.default_rng(seed).standard_normal((rows, len(LABELS))) * sharp)


@pytest.mark.parametrize("probability, bucket", [
    (0.0, "0.25"), (0.25, "0.25"), (0.2500001, "0.5"), (0.9, "0.9"), (0.95, "0.95"), (0.9900001, "0.999"),
    (0.999, "0.999"), (0.9995, "1"), (1.0, "1"), (1.0 + 1e-12, "1"),
])
def test_top1_buckets_hold_their_upper_edge(probability, bucket):
    assert top1_bucket(probability) == bucket


def test_profile_counts_labels_and_buckets_as_the_handlers_do():
    probabilities = _probabilities(500)
    profile = prediction_profile(probabilities, LABELS)
    assert profile["samples"] == 500 and profile["top1_edges"] == list(TOP1_EDGES)
    assert list(profile["labels"]) == LABELS  # every label, zero counts included
    assert profile["labels"] == {**{label: 0 for label in LABELS},
                                 **Counter(LABELS[i] for i in probabilities.argmax(1))}
    # the same bucket for each row as the handler's per-answer function: served and built histograms line up
    assert profile["top1"] == {**{bucket_name(e): 0 for e in TOP1_EDGES},
                               **Counter(top1_bucket(float(p)) for p in probabilities.max(1))}
    assert json.loads(json.dumps(profile)) == profile


def test_profile_refuses_mismatched_shapes():
    with pytest.raises(DriftError, match="10 classes but 3 labels"):
        prediction_profile(_probabilities(4), ["a", "b", "c"])
    with pytest.raises(DriftError, match="N x K probabilities"):
        prediction_profile(np.zeros((0, 10)), LABELS)


def test_profile_from_outputs_applies_softmax_like_the_handlers():
    logits = np.random.default_rng(1).standard_normal((64, 10)) * 3
    spec = OutputSpec(kind="classification", labels=tuple(LABELS), softmax=True)
    assert profile_from_outputs(spec, logits) == prediction_profile(support.softmax(logits), LABELS)
    assert profile_from_outputs(spec, {"logits": logits, "aux": logits[:, :2]}, "logits") == \
        profile_from_outputs(spec, logits)
    assert profile_from_outputs(OutputSpec(kind="raw"), logits) is None
    unnamed = profile_from_outputs(OutputSpec(kind="classification", softmax=False), support.softmax(logits))
    assert list(unnamed["labels"]) == [str(i) for i in range(10)]  # as the handlers name unlabelled classes


def test_psi_and_total_variation_by_hand():
    same = Histogram({"a": 30, "b": 70})
    assert psi(same, Histogram({"a": 30, "b": 70})) == 0.0
    assert 0 < psi(same, Histogram({"a": 3, "b": 7})) < 0.01  # the same shares, a smaller sample: smoothing only
    assert total_variation(same, Histogram({"a": 3, "b": 7})) == pytest.approx(0.0)
    expected, served = Histogram({"a": 50, "b": 50}), Histogram({"a": 90, "b": 10})
    q = [(50 + 0.5) / 101, (50 + 0.5) / 101]
    p = [(90 + 0.5) / 101, (10 + 0.5) / 101]
    assert psi(expected, served) == pytest.approx(sum((pi - qi) * math.log(pi / qi) for pi, qi in zip(p, q)))
    assert total_variation(expected, served) == pytest.approx(0.4)
    # a bin only one side has stays finite (smoothing) and counts in both measures
    assert math.isfinite(psi(Histogram({"a": 10}), Histogram({"b": 10})))
    assert total_variation(Histogram({"a": 10}), Histogram({"b": 10})) == pytest.approx(1.0)


def _exposition(model: str, version: str, labels: dict[str, int], top1: dict[str, int]) -> str:
    """Prometheus text as TorchServe serves the drift counters (Hostname appended), split over two hosts."""
    lines = [f"# TYPE {PREDICTIONS} counter"]
    for host in ("a", "b"):
        lines += [f'{PREDICTIONS}{{ModelName="{model}",ModelVersion="{version}",Label="{k}",Hostname="{host}",}} '
                  f"{v / 2}" for k, v in labels.items()]
        lines += [f'{TOP1}{{ModelName="{model}",ModelVersion="{version}",Bucket="{k}",Hostname="{host}",}} {v / 2}'
                  for k, v in top1.items()]
    lines.append(f'{PREDICTIONS}{{ModelName="other",ModelVersion="{version}",Label="zero",Hostname="a",}} 1000.0')
    return "\n".join(lines) + "\n"


def test_compare_reads_served_counts_per_model_and_version():
    profile = prediction_profile(_probabilities(400), LABELS)
    matching = parse_prometheus(_exposition("digits", "1.0", profile["labels"], profile["top1"]))
    report = compare(profile, matching, "digits", "1.0")
    assert (report.label_psi, report.top1_psi, report.label_tv) == (pytest.approx(0), pytest.approx(0), 0)
    assert not report.drifted and "ok: max PSI 0.000 <= --max-psi 0.2" in report.summary()

    skewed = parse_prometheus(_exposition("digits", "1.0", {"three": 200}, {"1": 200}))
    report = compare(profile, skewed, "digits", "1.0", max_psi=0.2)
    assert report.drifted and report.label_psi > 1 and "DRIFT" in report.summary()
    rows = {row[0]: row for row in report.rows()[1:]}
    assert set(rows) == set(LABELS) and rows["three"][2] == "100.0%"
    shares = [float(row[1].rstrip("%")) for row in rows.values()]
    assert shares == sorted(shares, reverse=True)  # the most frequent validation labels first
    assert report.label_tv == pytest.approx(1 - profile["labels"]["three"] / 400)
    assert not DriftReport("digits", "1.0", report.expected_labels, report.served_labels, report.expected_top1,
                           report.served_top1, max_psi=1000).drifted

    with pytest.raises(DriftError, match=r"digits 2.0: 0 predictions served so far, fewer than --min-count 100"):
        compare(profile, skewed, "digits", "2.0")


def test_a_missing_or_foreign_profile_is_refused_by_name():
    with pytest.raises(DriftError, match="digits_v1.0.mar has no prediction profile"):
        check_profile(None, "digits_v1.0.mar")
    profile = prediction_profile(_probabilities(10), LABELS)
    with pytest.raises(DriftError, match="uses top-1 buckets"):
        check_profile({**profile, "top1_edges": [0.5, 1.0]}, "digits_v1.0.mar")


def _answer(*rows: tuple[str, float], status: int = 200) -> Answer:
    ranked = [{"predictions": [{"label": label, "index": 0, "probability": p}]} for label, p in rows]
    body = ranked[0] if len(ranked) == 1 else {"results": ranked}
    return Answer(status=status, body=body if status == 200 else {"error": "x", "type": "t", "status": status})


def test_top1_predictions_reads_single_and_multi_row_answers():
    answers = [_answer(("one", 0.97)), _answer(("two", 0.6), ("three", 0.3)), _answer(("one", 0.9), status=422),
               Answer(status=200, body={"output": [1, 2]})]
    assert list(top1_predictions(answers)) == [("one", 0.97), ("two", 0.6), ("three", 0.3)]


def test_handler_counts_drift_metrics_with_bounded_labels(tmp_path):
    """A real TorchServe metrics cache with the generated metrics config: declared, emitted without warnings."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    from archiver.deploy.properties import metrics_config_text
    from handlers.pipeline import BatchStats
    from handlers.spec import ArtifactManifest, parse

    config = tmp_path / "metrics.yaml"
    config.write_text(metrics_config_text())
    cache = MetricsCacheYamlImpl(config_file_path=str(config))
    cache.initialize_cache()
    manifest = parse(ArtifactManifest, {
        "name": "digits", "version": "1.0", "frontend": "tensor",
        "runtime": {"format": "torchscript", "file": "model.pt", "sha256": "0" * 64},
        "input": {"shape": [1, 8, 8]}, "output": {"kind": "classification", "labels": LABELS}})
    context = Context("digits", str(tmp_path), {"model": {"modelName": "digits"}}, 8, None, "0.12.0", metrics=cache)
    metrics = HandlerMetrics(context, manifest)
    # 12 distinct labels from a 10-label model (e.g. a foreign answer): the last two share one bounded series
    names = [f"label{i}" for i in range(12)]
    metrics.record([_answer(*[(name, 0.95) for name in names]), _answer(("label0", 0.2))], BatchStats(), 1.0)
    pending = {key: value for key, value in metrics._pending.items() if key[0] in (PREDICTIONS, TOP1)}
    assert pending[(PREDICTIONS, ("digits", "1.0", "label0"))] == 2
    assert pending[(PREDICTIONS, ("digits", "1.0", OTHER_LABEL))] == 2
    assert sum(v for (name, _), v in pending.items() if name == PREDICTIONS) == 13
    assert pending[(TOP1, ("digits", "1.0", "0.95"))] == 12
    assert pending[(TOP1, ("digits", "1.0", "0.25"))] == 1
    metrics.flush()
    assert metrics._warned == set()  # both drift metrics are declared with these dimensions


def test_an_odd_answer_body_never_breaks_the_batch():
    from handlers.pipeline import BatchStats
    from handlers.spec import ArtifactManifest, parse

    manifest = parse(ArtifactManifest, {
        "name": "digits", "version": "1.0", "frontend": "tensor",
        "runtime": {"format": "torchscript", "file": "model.pt", "sha256": "0" * 64}, "input": {"shape": [1]}})
    metrics = HandlerMetrics(None, manifest)
    odd = Answer(status=200, body={"predictions": [{"label": "x", "probability": "high"}]})
    metrics.record([odd, _answer(("one", 0.5))], BatchStats(), 1.0)
    assert PREDICTIONS in metrics._warned


def test_the_build_stores_the_profile_of_its_artifact(digits_store):
    """build_artifact profiles the served artifact's predictions on the spec's samples (archiver/build.py)."""
    import os

    from archiver.operate.drift import PROFILE_KEY
    from archiver.package.archive import read_manifest

    validation = read_manifest(os.path.join(digits_store["store"], "digits_v1.0.mar")).validation
    x = np.load(digits_store["samples"])["x"]
    eager = prediction_profile(support.softmax(support.eager_outputs(digits_store["weights"]["1.0"], x)), LABELS)
    profile = validation[PROFILE_KEY]
    assert profile["samples"] == len(x) and profile["labels"] == eager["labels"]
    assert sum(profile["top1"].values()) == len(x)
