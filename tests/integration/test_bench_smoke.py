"""`make bench` smoke test: the harness end to end for a few seconds, against the limit and tspack only, and a row
disturbed by a CPU hog this test starts.

Checks the outputs' shape (every field, positive numbers, the interleaved order of the rounds), never a speed: on a
busy machine a figure may be null, and then it must say why.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from archiver.operate import load as loadgen
from benchmarks import bench, limit, ratios, report
from benchmarks.rounds import Contender, Rounds

pytestmark = pytest.mark.integration

REQUIRED_RATIOS = ("e2e_over_limit_heavy", "tspack_over_naive_light", "tspack_over_naive_heavy",
                   "tspack_over_fastapi_light", "tspack_over_fastapi_heavy", "tspack_over_litserve_light",
                   "p99_over_fastapi_light", "c1_p50_ms_light", "cold_start_s", "aoti_over_torchscript_light",
                   "oip_binary_over_json_light", "worker_cold_start_s_aoti")
MEASURED = ("c1_p50_ms_light", "e2e_over_limit_light", "e2e_over_limit_decode_light", "oip_binary_over_json_light",
            "oip_binary_over_npy_light", "cold_start_s")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    try:
        loadgen.ensure_wrk()  # installs Debian's wrk as root when missing
    except loadgen.LoadGenError as exc:
        if os.environ.get("CI"):  # CI must run the harness: a silent skip there would hide a broken benchmark
            pytest.fail(f"wrk is missing and cannot be installed in CI: {exc} (install the `wrk` package in setup)")
        pytest.skip(f"wrk cannot be installed here: {exc}")
    root = tmp_path_factory.mktemp("bench")
    markdown = root / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Someone else's section\n\nkept as is\n")
    code = bench.main(["--quick", "--only", "limit,tspack", "--duration", "2", "--reruns", "1",
                       "--out", str(root / "results"), "--markdown", str(markdown), "--work", str(root / "work")])
    return {"code": code, "root": root, "markdown": markdown,
            "doc": json.loads((root / "results" / "latest.json").read_text())}


def test_runs_and_writes_every_output(smoke):
    assert smoke["code"] == 0, smoke["doc"]["failures"]
    assert (smoke["root"] / "results" / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = smoke["markdown"].read_text()
    assert "kept as is" in text
    assert text.count(report.START) == 1 and text.count(report.END) == 1
    assert "| tspack" in text and "cores" in text and "| figure | median | min–max | rounds |" in text


def test_json_has_every_field_with_positive_numbers(smoke):
    doc = smoke["doc"]
    assert {"date", "command", "machine", "rows", "ratios", "failures", "notes", "rounds", "reruns"} <= set(doc)
    assert set(REQUIRED_RATIOS) <= set(report.RATIO_KEYS) <= set(doc["ratios"])
    for key in MEASURED:  # measured in this run: a positive median with its spread, or null with the reason
        figure = doc["ratios"][key]
        assert {"value", "min", "max", "rounds", "per_round", "null_reason", "goal"} <= set(figure), key
        if figure["value"] is None:
            assert figure["null_reason"] and "other work" in figure["null_reason"], (key, figure)
        else:
            assert figure["value"] > 0 and figure["min"] <= figure["value"] <= figure["max"], (key, figure)
    assert doc["ratios"]["cold_start_s"]["rounds"] == 1
    assert {"build light", "compare light"} <= set(doc["step_seconds"])  # where the run's time went
    assert all(seconds > 0 for seconds in doc["step_seconds"].values())
    assert doc["ratios"]["c1_p50_ms_light"]["rounds"] == 2  # QUICK: two rounds
    assert doc["ratios"]["tspack_over_fastapi_light"]["null_reason"] == "not measured in this run"
    assert {row["system"] for row in doc["rows"]} == {"limit", "tspack"}
    for row in doc["rows"]:
        assert set(report.ROW_FIELDS) <= set(row)
        for key in ("requests_per_s", "p50_ms", "p95_ms", "p99_ms", "requests", "duration_s", "peak_rss_mb",
                    "batch_size", "attempts"):
            assert row[key] > 0, (key, row)
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["errors"] == 0, row  # OIP binary and JSON requests are answered 200 like the others
        assert row["disturbed"] == (row["other_cpu_share"] > 0.1), row
    served = [row for row in doc["rows"] if row["system"] == "tspack"]
    assert {row["body"] for row in served} == {"json", "npy", "oip-json", "oip-binary"}
    assert all(row["loadgen_cpu_share"] > 0 and row["frontend_cpu_ms_per_request"] > 0 for row in served)


def test_the_rounds_are_interleaved(smoke):
    rounds = [r for r in smoke["doc"]["rows"] if r["phase"] == "rounds" and r["concurrency"] != 1]
    turns = {n: [(r["system"], r["body"], r["config"]) for r in rounds if r["round"] == n] for n in (1, 2)}
    assert len(turns[1]) == 6  # limit: model alone and decode + model; tspack: 4 bodies
    assert turns[2] == turns[1][::-1]


@pytest.fixture
def hog():
    """One busy process per core for the length of a test: other work the benchmark must notice. Started through a
    shell that exits, so the hogs are not in this process's tree (which the in-process limit counts as its own)."""
    pids = []
    for _ in range(os.cpu_count() or 1):
        shell = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                               capture_output=True, text=True, check=True)
        pids.append(int(shell.stdout.strip()))
    yield
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_a_row_disturbed_by_a_cpu_hog_yields_null_ratios_with_the_reason(smoke, hog):
    rows = []
    mar = next((smoke["root"] / "work" / "store").glob("mnist-torchscript-*.mar"))
    json_body = bench.artifacts.request_bodies(bench.MODELS["light"], str(smoke["root"] / "work"))["json"]
    with limit.LimitPool(str(mar), limit.Layout(1, 1)) as pool:
        contenders = [Contender({**bench.label("limit", "light", "torchscript", kind, 8),
                                 "body": json_body.kind if kind == "decode" else None},
                                bench.limit_measure(pool, kind, 8, json_body if kind == "decode" else None, 1.0),
                                (None,)) for kind in limit.KINDS]
        Rounds(rows.append, reruns=1, say=lambda _: None).run(contenders, rounds=1, comparison="light")
    assert len(rows) == 2
    for row in rows:
        assert row["attempts"] == 2 and row["disturbed"] and row["other_cpu_share"] > 0.1, row
    figure = ratios.figure_of(rows, ratios.Figure("decode_over_model", ratios.Pick("limit", "light", concurrency=None),
                                                  ratios.Pick("limit", "light", body=None, concurrency=None)))
    assert figure["value"] is None
    assert "other work used" in figure["null_reason"] and "2 tries" in figure["null_reason"]
    assert "limit light torchscript json" in figure["null_reason"]
