"""The text benchmark's pieces (benchmarks/text_bench.py); the whole run takes minutes, so it is not run here.

The figures: ratios are medians of per-round ratios, each system's best configuration is its highest median, and
the padding pair compares archives with the same serving settings. The load: wrk's script sends every text, as
the exact JSON bytes, to a real HTTP server.
"""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from archiver.operate import load as loadgen
from benchmarks import text_bench as tb

LONGEST = tb.Variant("longest", 2, 1, 16, 5)
OTHER = tb.Variant("longest", 1, 2, 16, 5)
PADDED = tb.Variant("max_length", 2, 1, 16, 5)


def rows(figures: dict[str, list[float]], concurrency: int = 32, p50: float = 5.0) -> list[dict]:
    """Rows as the run writes them: {key: requests/s per round}."""
    found = []
    for key, per_round in figures.items():
        padding = "none" if key.startswith("fastapi") else key.split("-")[1]
        for index, rps in enumerate(per_round):
            found.append({"key": key, "system": key.split("-")[0], "config": key, "padding": padding,
                          "concurrency": concurrency, "round": index + 1, "requests_per_s": rps,
                          "p50_ms": p50, "p99_ms": 4 * p50})
    return found


def test_the_ratio_is_the_median_of_per_round_ratios_against_each_systems_best_config():
    figures = {LONGEST.key: [300.0, 200.0, 400.0], OTHER.key: [250.0, 150.0, 390.0], PADDED.key: [100.0, 100.0, 100.0],
               # 2w1t has the higher median (300 > 280) though 1w2t wins round 3
               "fastapi-1w2t": [200.0, 100.0, 500.0], "fastapi-2w1t": [300.0, 280.0, 310.0]}
    result = tb.summarize(rows(figures) + rows({LONGEST.key: [1.0] * 3}, concurrency=1, p50=3.0), PADDED.key)
    assert result["best_tspack"] == LONGEST.key and result["best_fastapi"] == "fastapi-2w1t"
    assert result["tspack_over_fastapi"] == {"median": 1.0, "min": 0.714, "max": 1.29,
                                             "rounds": [1.0, 0.714, 1.29]}
    assert result["padding_pair"] == [LONGEST.key, PADDED.key]
    assert result["longest_over_max_length"]["rounds"] == [3.0, 2.0, 4.0]
    assert result["met"] is True and result["requests_per_s"]["fastapi-1w2t"] == 200.0
    assert result["c1_p50_ms"] == {LONGEST.key: 3.0}


def test_the_goal_is_not_met_below_1x_and_a_missing_peer_leaves_no_ratio():
    slower = tb.summarize(rows({LONGEST.key: [90.0, 95.0], PADDED.key: [50.0, 50.0], "fastapi-2w1t": [100.0, 100.0]}),
                          PADDED.key)
    assert slower["tspack_over_fastapi"]["median"] == 0.925 and slower["met"] is False
    alone = tb.summarize(rows({LONGEST.key: [90.0, 95.0], PADDED.key: [50.0, 50.0]}), PADDED.key)
    assert alone["best_fastapi"] is None and alone["tspack_over_fastapi"] is None and alone["met"] is False


def test_the_section_names_each_system_its_best_config_and_the_ratios(tmp_path):
    figures = {LONGEST.key: [300.0, 320.0], PADDED.key: [100.0, 160.0], "fastapi-2w1t": [300.0, 400.0]}
    measured = rows(figures) + rows({k: [1.0, 1.0] for k in figures}, concurrency=1)
    result = {"command": tb.Settings().command + " --quick", "machine": "test CPU, 2 cores", "date": "today",
              "load_before": (1.0, 1.0, 1.0), "background_at_start": 0.05, "rounds": 2, "failures": [],
              "seconds": {"c32": 3.0, "c1": 2.0, "warmup": 3.0}, "rows": measured,
              "model": {"layers": 2, "hidden": 128, "heads": 2, "intermediate": 512, "vocab": 8000, "max_length": 128,
                        "texts": 12, "tokens_per_text": [7, 55], "mean_tokens": 33.0},
              **tb.summarize(measured, PADDED.key)}
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nsomeone else's text\n")
    from benchmarks import sections

    sections.write_section(tb.MARKERS, tb.section(result), str(markdown))
    sections.write_section(tb.MARKERS, tb.section(result), str(markdown))  # rewritten in place, not appended
    text = markdown.read_text()
    assert text.count(tb.MARKERS[0]) == 1 and "someone else's text" in text
    assert "python -m benchmarks.text_bench --quick" in text
    assert re.search(r"\| tspack \(best\) \| tspack-longest-2w1t-b16d5 \| longest row per length run \| 310 \|", text)
    assert "| fastapi (best) | fastapi-2w1t | none (1 text) | 350 |" in text
    assert "0.90x (median of 2 rounds; per round 1.00, 0.80)" in text and "goal >= 1x: not met" in text
    assert "2.50x (median of 2 rounds; per round 3.00, 2.00)" in text


def test_variants_name_their_archives_and_the_first_is_also_padded_to_max_length():
    settings = tb.Settings(tspack=(LONGEST, OTHER))
    assert [v.key for v in settings.variants()] == [LONGEST.key, OTHER.key, PADDED.key]
    assert PADDED.name == "bert-max-length-w2t1-b16d5" and LONGEST.label == "2w x 1t, batch 16/5ms"
    assert LONGEST.serving() == {"workers": 2, "intra_op_threads": 1, "batch_size": 16, "max_batch_delay_ms": 5}
    zero_wait = tb.Variant("longest", 2, 1, 16)
    assert (zero_wait.name, zero_wait.label) == ("bert-longest-w2t1-zw16", "2w x 1t, zero-wait batch 16")
    assert zero_wait.serving() == {"workers": 2, "intra_op_threads": 1, "batch_size": 16, "batching": "zero_wait"}
    assert tb.Settings().tspack[0].delay_ms is not None, "the first configuration batches as tspack build does"
    assert zero_wait in tb.Settings().tspack, "zero-wait (opt-in) is measured beside it"
    assert tb.parse_args(["--quick"]).tspack == (tb.Settings().tspack[0],)
    assert tb.parse_args(["--rounds", "1"]).rounds == 2  # one round has no spread


def test_a_text_that_would_end_the_lua_string_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Lua long string"):
        tb.lua_script(str(tmp_path), ("fine", "a ]==] b"))


class Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.seen.append((body, self.headers["Content-Type"], self.headers.get("Authorization")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.integration
def test_wrk_sends_every_text_in_turn_as_the_exact_json_bytes(tmp_path):
    try:
        loadgen.ensure_wrk()
    except loadgen.LoadGenError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"wrk is missing in CI: {exc}")
        pytest.skip(f"wrk cannot be installed here: {exc}")
    texts = ("plain", 'quotes " and \\ back', "Café 🙂 ü", "multi\nline")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Recorder.seen = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/predict"
        script, body = tb.lua_script(str(tmp_path), texts), tb.body_file(str(tmp_path))
        result = loadgen.run(url, body, tb.JSON, 1, 1, authorization="Bearer k", script=script)
    finally:
        server.shutdown()
        server.server_close()
    assert result.requests >= len(texts) and result.errors == 0
    expected, sent = tb.bodies(texts), [b for b, _, _ in Recorder.seen]
    # One connection: the texts in turn (wrk may call request() once before the first send, so from any start).
    first = expected.index(sent[0])
    assert sent == [expected[(first + i) % len(texts)] for i in range(len(sent))]
    assert sorted(json.loads(b)["text"] for b in sent[:len(texts)]) == sorted(texts)
    assert {(t, a) for _, t, a in Recorder.seen} == {("application/json", "Bearer k")}
