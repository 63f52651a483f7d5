"""`tspack tune` without a server: the space, the search's moves and budget, the Pareto front, the tuned spec."""

from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

from archiver.operate.tune.load import EXAMPLE_REQUESTS, Level, request_body
from archiver.operate.tune.measure import Trial
from archiver.operate.tune.report import plot, table_rows, verdict
from archiver.operate.tune.search import Search, TuneSettings, dimensions, meets_slo, pareto, winner
from archiver.operate.tune.space import Config, Runtime, batchings, pick_model, worker_layouts, write_tuned_spec
from archiver.spec import DeploySpec, SamplesSpec, ServingSpec
from archiver.zoo.text_classifier import train_wordpiece
from handlers.errors import SpecError
from handlers.frontends import frontend_for
from handlers.registry import FRONTENDS
from handlers.request import Request
from handlers.spec import ArtifactManifest, ImageSpec, InputSpec, RuntimeSpec, TextSpec, parse

TS = Runtime("torchscript (m)", "/store/m_v1.0.mar")
ONNX = Runtime("onnx (m-onnx)", "/store/m-onnx_v1.0.mar")
AOTI = Runtime("aoti (m-aoti)", "/store/m-aoti_v1.0.mar", compiled_threads=2)


def config(**changes) -> Config:
    values = {"runtime": TS, "batching": "delay", "batch_size": 8, "delay_ms": 2, "workers": 1, "threads": 4}
    values.update(changes)
    return Config(**values)


def trial(number: int, cfg: Config, points: list[tuple[int, float, float]], seconds: float = 10.0) -> Trial:
    return Trial(number, cfg, [Level(c, rps, p99 / 2, p99, 0) for c, rps, p99 in points], seconds=seconds)


@pytest.mark.parametrize("cores, compiled, expected", [
    (2, None, [(1, 2), (1, 1), (2, 1)]),
    (4, None, [(1, 4), (1, 1), (2, 2), (2, 1), (4, 1)]),
    (4, 2, [(1, 2), (2, 2)]),  # an artifact compiled for 2 threads keeps them
    (1, None, [(1, 1)]),
])
def test_worker_layouts_never_use_more_threads_than_cores(cores, compiled, expected):
    layouts = worker_layouts(cores, compiled)
    assert layouts == expected and all(w * t <= cores for w, t in layouts)


def test_every_move_stays_within_the_cores_and_changes_one_dimension():
    start = config(workers=2, threads=2)
    moves = dimensions([TS, ONNX, AOTI], cores=4)
    for move in moves:
        for candidate in move(start):
            assert candidate.workers * candidate.threads <= 4
    runtime, batching, batch_size, layout = (move(start) for move in moves)
    assert [c.runtime for c in runtime] == [TS, ONNX, AOTI] and runtime[2].threads == 2
    assert {(c.batching, c.batch_size, c.delay_ms) for c in batching} == set(batchings(8))
    assert [c.batch_size for c in batch_size] == [2, 4, 8, 16, 32]
    assert {(c.workers, c.threads) for c in layout} == set(worker_layouts(4))


def test_serving_of_a_configuration_is_a_valid_spec():
    base = parse(ServingSpec, {"batch_size": 4, "max_batch_delay_ms": 5, "max_workers": 1, "response_timeout_s": 30})
    zero_wait = config(batching="zero_wait", batch_size=16, workers=2, threads=1).serving(base)
    assert (zero_wait.batching, zero_wait.batch_size, zero_wait.max_batch_delay_ms) == ("zero_wait", 16, 0)
    assert (zero_wait.workers, zero_wait.max_workers, zero_wait.intra_op_threads) == (2, None, 1)
    assert zero_wait.response_timeout_s == 30, "what tune does not search is kept"
    alone = config(batch_size=1).serving(base)
    assert (alone.batching, alone.batch_size, alone.max_batch_delay_ms) == ("delay", 1, 0)


def test_score_puts_the_slo_first():
    fast_but_slow_tail = trial(1, config(), [(1, 100, 5), (32, 2000, 80)])
    slower_within = trial(2, config(batch_size=4), [(1, 100, 5), (32, 900, 40)])
    broken = Trial(3, config(batch_size=2), error="not served: worker died")
    assert meets_slo(slower_within, 50) and not meets_slo(fast_but_slow_tail, 50)
    assert winner([fast_but_slow_tail, slower_within, broken], 50) is slower_within
    assert winner([fast_but_slow_tail, broken], 50) is None


def test_pareto_front_keeps_only_undominated_points():
    a = trial(1, config(), [(32, 1000, 40)])
    b = trial(2, config(batch_size=4), [(32, 800, 20)])
    c = trial(3, config(batch_size=2), [(32, 700, 30)])  # worse than b on both
    d = trial(4, config(batch_size=16), [(32, 1000, 50)])  # as fast as a, slower tail
    assert [t.number for t in pareto([a, b, c, d])] == [1, 2]


def test_coordinate_descent_moves_one_dimension_at_a_time_to_the_best():
    """A made-up landscape: throughput peaks at onnx, zero_wait, batch 16, 2 workers x 1 thread."""
    def measured(number: int, cfg: Config) -> Trial:
        rps = (100 * (cfg.runtime is ONNX) + 50 * (cfg.batching == "zero_wait") + 20 - abs(cfg.batch_size - 16)
               + 30 * (cfg.workers == 2 and cfg.threads == 1))
        return trial(number, cfg, [(1, 10, 1), (32, rps, 10)])

    search = Search(measured, slo_ms=50, budget_s=1e9)
    trials = search.run(config(threads=2), dimensions([TS, ONNX], cores=2))
    best = winner(trials, 50).config
    assert (best.runtime, best.batching, best.batch_size, best.workers, best.threads) == (ONNX, "zero_wait", 16, 2, 1)
    assert len({t.config.key for t in trials}) == len(trials), "no configuration is measured twice"
    full_grid = 2 * (1 + 1 + 3) * 5 * 3
    assert len(trials) < full_grid / 3


def test_search_stops_before_a_trial_would_overrun_the_budget():
    now = [0.0]

    def measured(number: int, cfg: Config) -> Trial:
        now[0] += 10.0
        return trial(number, cfg, [(1, 10 + number, 1)])

    trials = Search(measured, slo_ms=50, budget_s=35, clock=lambda: now[0]).run(config(), dimensions([TS], 2))
    assert len(trials) == 3 and now[0] == 30.0, "a fourth 10 s trial would end at 40 s, past the 35 s budget"
    assert len(Search(measured, 50, 1e9, max_trials=2).run(config(), dimensions([TS], 2))) == 2


def test_settings_are_checked_with_the_flag_to_fix():
    with pytest.raises(SpecError, match="--concurrency: a comma-separated list of client counts >= 1"):
        TuneSettings("spec.yaml", "m", concurrency=(0, 8))
    with pytest.raises(SpecError, match="--duration-s: wrk measures whole seconds"):
        TuneSettings("spec.yaml", "m", duration_s=0.5)
    assert TuneSettings("spec.yaml", "m", concurrency=(32, 1, 8)).concurrency == (1, 8, 32)


SPEC = """\
model_store: store
models:
  - name: m
    version: "1.0"
    source: {model_class: zoo.py:M, weights: m.pt}
    input: {shape: [4]}
    serving: &serving {batch_size: 8, max_batch_delay_ms: 2, workers: 1, response_timeout_s: 30}
  - name: m
    version: "2.0"
    source: {model_class: zoo.py:M, weights: m.pt}
    input: {shape: [4]}
    serving: *serving
"""


def test_tuned_spec_changes_one_model_version_and_keeps_the_rest(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(SPEC)
    spec = DeploySpec.from_yaml(str(path))
    model = pick_model(spec, "m", "2.0")
    out = write_tuned_spec(str(path), model, config(batching="zero_wait", batch_size=16, workers=2, threads=1),
                           str(tmp_path / "spec.tuned.yaml"), "tspack tune: test")
    text = open(out).read()
    assert text.startswith("# tspack tune: test\n")
    tuned = yaml.safe_load(text)
    assert tuned["models"][0]["serving"] == {"batch_size": 8, "max_batch_delay_ms": 2, "workers": 1,
                                             "response_timeout_s": 30}, "the shared anchor is not changed"
    assert tuned["models"][1]["serving"] == {"response_timeout_s": 30, "batch_size": 16, "batching": "zero_wait",
                                             "workers": 2, "intra_op_threads": 1}
    parsed = pick_model(DeploySpec.from_yaml(out), "m", "2.0").serving
    assert (parsed.batching, parsed.batch_size, parsed.workers, parsed.intra_op_threads) == ("zero_wait", 16, 2, 1)
    with pytest.raises(SpecError, match="lists m at versions 1.0, 2.0; choose one with --version"):
        pick_model(spec, "m")


def test_report_table_and_plot(tmp_path):
    settings = TuneSettings("spec.yaml", "m", slo_p99_ms=50, concurrency=(1, 32))
    trials = [trial(1, config(), [(1, 100, 5), (32, 900, 40)]),
              trial(2, config(batch_size=4), [(1, 90, 4), (32, 700, 80)]),
              Trial(3, config(batch_size=2), error="not served: worker died")]
    rows = table_rows(trials, settings, trials[0])
    assert rows[0][-4:] == ["req/s c=32", "p99 ms c=32", "SLO", "note"]
    assert rows[1][-2:] == ["met", "WINNER, pareto"] and rows[2][-2] == "missed"
    assert rows[3][-1] == "not served: worker died" and rows[3][5] == "-"
    path = plot(trials, settings, trials[0], str(tmp_path / "pareto.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 10_000


def test_a_zero_wait_winner_comes_with_its_caution():
    settings = TuneSettings("spec.yaml", "m", slo_p99_ms=50, concurrency=(1, 32))
    delay = trial(1, config(), [(1, 100, 5), (32, 900, 40)])
    zero_wait = trial(2, config(batching="zero_wait", delay_ms=0), [(1, 300, 3), (32, 950, 35)])
    assert "opt-in" not in verdict(delay, settings)
    said = verdict(zero_wait, settings)
    assert said.startswith("Winner under the p99 SLO of 50 ms: #2") and "Zero-wait is opt-in" in said


def test_every_front_end_has_an_example_request():
    """tune's body is looked up by the archive's front end: a front end without one could not be tuned."""
    assert list(EXAMPLE_REQUESTS) == list(FRONTENDS)


def served(frontend: str, inputs: tuple[InputSpec, ...], **fields) -> ArtifactManifest:
    return ArtifactManifest(name="m", version="1.0", frontend=frontend, inputs=inputs,
                            runtime=RuntimeSpec(format="onnx", file="model.onnx", sha256="0" * 64), **fields)


def decoded(manifest: ArtifactManifest, folder: str, samples=None, model_dir: str = "") -> dict[str, np.ndarray]:
    """The tune body as the archive's own front end decodes it: what every request of a tuning run sends."""
    body = request_body(manifest, folder, samples)
    assert body.path == os.path.join(folder, "body")
    with open(body.path, "rb") as f:
        return frontend_for(manifest, model_dir).decode(Request(f.read(), body.content_type)).inputs


def test_tensor_body_is_the_first_sample_or_zeros(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4) + 0.5
    np.savez(tmp_path / "samples.npz", x=x)
    one = served("tensor", (InputSpec(shape=(4,)),))
    got = decoded(one, str(tmp_path), SamplesSpec(file=str(tmp_path / "samples.npz")))
    np.testing.assert_array_equal(got["input"], x[:1])
    assert not decoded(one, str(tmp_path))["input"].any(), "no samples: zeros"

    two = served("tensor", (InputSpec(shape=(-1,), dtype="int64", name="input_ids"),
                            InputSpec(shape=(-1,), dtype="int64", name="attention_mask")))
    got = decoded(two, str(tmp_path))
    assert {name: (a.shape, a.dtype.name) for name, a in got.items()} == {
        "input_ids": ((1, 8), "int64"), "attention_mask": ((1, 8), "int64")}, "free axes get length 8"


def test_image_body_is_a_gray_image_of_the_declared_size(tmp_path):
    manifest = served("image", (InputSpec(shape=(1, 6, 10)),), image=ImageSpec(height=6, width=10, mode="L"))
    got = decoded(manifest, str(tmp_path))["input"]
    assert got.shape == (1, 1, 6, 10)
    np.testing.assert_allclose(got, 128 / 255, rtol=1e-6)


def test_text_body_is_the_first_sample_text(tmp_path):
    tokenizer = train_wordpiece(["a good film", "a bad film", "a short example sentence"] * 4, vocab_size=60)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    manifest = served("text", (InputSpec(shape=(-1,), dtype="int64", name="input_ids"),
                               InputSpec(shape=(-1,), dtype="int64", name="attention_mask")), text=TextSpec())
    got = decoded(manifest, str(tmp_path), SamplesSpec(texts=("good film", "bad film")), str(tmp_path))
    assert got["input_ids"].tolist() == [tokenizer.encode("good film").ids]
    stock = decoded(manifest, str(tmp_path), None, str(tmp_path))
    assert stock["input_ids"].tolist() == [tokenizer.encode("a short example sentence").ids]
