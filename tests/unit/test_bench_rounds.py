"""`make bench`'s interleaved rounds and figures, on recorded rows: the order of turns, reruns of disturbed rows,
medians and spreads, and the null (with its reason) that a disturbed row makes of every figure built on it."""

from __future__ import annotations

import pytest

from benchmarks import ratios
from benchmarks.ratios import Figure, Pick
from benchmarks.rounds import Contender, Rounds, measured, order


def row(system: str, rps: float, round_: int, other: float = 0.0, **extra) -> dict:
    return {"system": system, "model": "light", "runtime": "torchscript", "config": f"{system} config",
            "body": "json", "concurrency": 32, "batch_size": 1, "requests_per_s": rps, "p50_ms": 1000.0 / rps,
            "p99_ms": 2000.0 / rps, "other_cpu_share": other, "disturbed": other > 0.1, "attempts": 1,
            "phase": "rounds", "comparison": "light", "round": round_, **extra}


class Replay:
    """Plays back recorded numbers in order, and records which concurrency each call asked for."""

    def __init__(self, numbers: list[dict]):
        self.numbers, self.calls = list(numbers), []

    def __call__(self, concurrency):
        self.calls.append(concurrency)
        return self.numbers.pop(0)


def test_order_reverses_every_round():
    assert order("abc", 0) == ["a", "b", "c"]
    assert order("abc", 1) == ["c", "b", "a"]
    assert order("abc", 2) == ["a", "b", "c"]


def test_rounds_interleave_and_measure_first_round_extras_once():
    rows = []
    quiet = {"requests_per_s": 1.0, "other_cpu_share": 0.0}
    a = Contender({"system": "tspack", "config": "x", "runtime": "torchscript"}, Replay([quiet] * 4), (32,), (1,))
    b = Contender({"system": "fastapi", "config": "y", "runtime": "torchscript"}, Replay([quiet] * 3), (32,))
    Rounds(rows.append, say=lambda _: None).run([a, b], rounds=3, comparison="light")
    assert [(r["system"], r["round"], r["concurrency"]) for r in rows] == [
        ("tspack", 1, 32), ("tspack", 1, 1), ("fastapi", 1, 32),
        ("fastapi", 2, 32), ("tspack", 2, 32),
        ("tspack", 3, 32), ("fastapi", 3, 32)]
    assert a.measure.calls == [32, 1, 32, 32]
    assert all(r["phase"] == "rounds" and r["comparison"] == "light" and r["attempts"] == 1 for r in rows)


def test_rounds_pause_the_others_during_each_turn():
    events = []

    def contender(name: str) -> Contender:
        def measure(concurrency):
            events.append(f"measure {name}")
            return {"requests_per_s": 1.0, "other_cpu_share": 0.0}

        return Contender({"system": name, "config": "", "runtime": "torchscript"}, measure, (32,),
                         pause=lambda: events.append(f"pause {name}"), resume=lambda: events.append(f"resume {name}"))

    Rounds(lambda _: None, say=lambda _: None).run([contender("a"), contender("b")], rounds=1, comparison="c")
    assert events[:4] == ["pause a", "pause b", "resume a", "measure a"]
    assert events[4:8] == ["pause a", "pause b", "resume b", "measure b"]
    assert events[-2:] == ["resume a", "resume b"]  # nothing is left paused


def test_a_disturbed_row_is_rerun_until_quiet():
    replay = Replay([{"other_cpu_share": 0.4, "requests_per_s": 5.0}, {"other_cpu_share": 0.3, "requests_per_s": 6.0},
                     {"other_cpu_share": 0.02, "requests_per_s": 9.0}])
    numbers = measured(replay, 32, reruns=3, say=lambda _: None)
    assert numbers["attempts"] == 3 and not numbers["disturbed"] and numbers["requests_per_s"] == 9.0


def test_a_row_still_disturbed_after_its_reruns_is_marked():
    replay = Replay([{"other_cpu_share": 0.4, "requests_per_s": 5.0}] * 4)
    numbers = measured(replay, 32, reruns=3, say=lambda _: None)
    assert numbers["attempts"] == 4 and numbers["disturbed"]



def test_a_server_that_left_a_core_idle_under_load_is_rerun():
    # every connection on one of two worker processes: half the machine used with 32 clients waiting
    replay = Replay([{"other_cpu_share": 0.0, "server_cpu_share": 0.5, "requests_per_s": 821.0},
                     {"other_cpu_share": 0.0, "server_cpu_share": 0.96, "requests_per_s": 1300.0}])
    numbers = measured(replay, 32, reruns=3, say=lambda _: None)
    assert numbers["attempts"] == 2 and not numbers["idle_cores"] and numbers["requests_per_s"] == 1300.0


def test_a_server_that_idled_part_of_the_time_is_rerun_and_a_busy_one_is_not():
    # most connections on one uvicorn worker (ResNet-18): 22 req/s at 77% of the machine; tspack's rows used >= 86%
    replay = Replay([{"other_cpu_share": 0.0, "server_cpu_share": 0.77, "requests_per_s": 22.4},
                     {"other_cpu_share": 0.0, "server_cpu_share": 0.86, "requests_per_s": 45.1},
                     {"other_cpu_share": 0.0, "server_cpu_share": 0.97, "requests_per_s": 46.0}])
    numbers = measured(replay, 32, reruns=3, say=lambda _: None)
    assert numbers["attempts"] == 2 and not numbers["idle_cores"] and numbers["requests_per_s"] == 45.1


def test_idle_cores_are_kept_and_marked_after_the_reruns_and_never_judged_at_low_concurrency():
    replay = Replay([{"other_cpu_share": 0.0, "server_cpu_share": 0.5, "requests_per_s": 800.0}] * 4)
    numbers = measured(replay, 32, reruns=3, say=lambda _: None)
    assert numbers["attempts"] == 4 and numbers["idle_cores"] and not numbers["disturbed"]
    lone = measured(Replay([{"other_cpu_share": 0.0, "server_cpu_share": 0.3, "requests_per_s": 400.0}]), 1,
                    reruns=3, say=lambda _: None)
    assert lone["attempts"] == 1 and not lone["idle_cores"]  # one client cannot keep two cores busy

RATIO = Figure("t", Pick("tspack", "light"), Pick("fastapi", "light"), goal=">= 1.0")


def test_ratio_is_the_median_of_per_round_ratios_with_spread():
    rows = [row("tspack", 1000, 1), row("fastapi", 800, 1), row("tspack", 1100, 2), row("fastapi", 1000, 2),
            row("tspack", 900, 3), row("fastapi", 600, 3)]
    figure = ratios.figure_of(rows, RATIO)
    assert figure["per_round"] == [1.25, 1.1, 1.5]
    assert (figure["value"], figure["min"], figure["max"], figure["rounds"]) == (1.25, 1.1, 1.5, 3)
    assert figure["null_reason"] is None and figure["goal"] == ">= 1.0"


def test_a_disturbed_row_makes_its_ratios_null_with_the_reason():
    rows = [row("tspack", 1000, 1), row("fastapi", 800, 1), row("tspack", 1100, 2),
            row("fastapi", 400, 2, other=0.35, attempts=4), row("tspack", 900, 3), row("fastapi", 600, 3)]
    figure = ratios.figure_of(rows, RATIO)
    assert figure["value"] is None
    assert figure["per_round"] == [1.25, None, 1.5]
    assert "round 2" in figure["null_reason"] and "fastapi" in figure["null_reason"]
    assert "35%" in figure["null_reason"] and "4 tries" in figure["null_reason"]
    # a figure that does not use the disturbed row keeps its value
    alone = ratios.figure_of(rows, Figure("p50", Pick("tspack", "light", metric="p50_ms")))
    assert alone["value"] == pytest.approx(1.0) and alone["null_reason"] is None


def test_a_plain_value_and_a_best_of_several_rows():
    rows = [row("tspack", 500, 1, concurrency=1, batch_size=8, config="a", phase="sweep"),
            row("tspack", 250, 1, concurrency=1, batch_size=8, config="b", phase="sweep"),
            row("tspack", 400, 1, concurrency=1, batch_size=1, config="c", phase="sweep")]
    figure = ratios.figure_of(rows, next(f for f in ratios.RATIOS if f.key == "c1_p50_ms_light_min"))
    assert figure["value"] == 2.0 and figure["rounds"] == 1  # the lowest p50 of the batching configurations


def test_every_key_is_there_even_when_nothing_was_measured():
    out = ratios.compute([], cold_start_s=None)
    assert set(ratios.RATIO_KEYS) <= set(out)
    assert out["tspack_over_fastapi_light"]["value"] is None
    assert out["tspack_over_fastapi_light"]["null_reason"] == "not measured in this run"
