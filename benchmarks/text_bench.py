"""`make bench` text rows (issue 13): a BERT-style classifier served by tspack against a FastAPI peer.

    .venv/bin/python -m benchmarks.text_bench [--quick] [--rounds N] [--seconds S]

The model: transformers' BertForSequenceClassification from a config (2 layers, hidden 128, 2 heads,
intermediate 512, seeded random weights: speed does not depend on training) with a WordPiece tokenizer trained
here by `tokenizers` on VADER's lexicon, saved with `save_pretrained`, then built by the archiver library exactly
as `tspack build --pretrained` builds it: ONNX (dynamo export, validated against transformers), served by ONNX
Runtime, in a few serving configurations (the best at c=32 is compared). The first configuration is also built with
`text.padding: max_length` (every row padded to MAX_LENGTH tokens, what naive text servers do) to compare with
the default `longest` (a TorchServe batch sorted by length and padded in runs, each to its own longest row).

The peer: FastAPI + uvicorn (benchmarks/peers/text_fastapi_server.py) tokenizing with the same `tokenizer.json` and
running the same `model.onnx` with ONNX Runtime in one process, tried with 1 worker x 2 threads and 2 workers x 1
thread; its best configuration (highest median requests/s at c=32) is the one compared.

Load: wrk (benchmarks/loadgen.py), one Lua script for every system that cycles through TEXTS, review-style
sentences of 7 to 55 tokens (33 on average), each request `{"text": "..."}`. Every system is started once, warmed
up, and checked to answer every text like the others (same top-k, probabilities within 1e-4); then each round
runs every system in turn (c=32, then c=1), the order reversed every other round (benchmarks/interleave.py's
idea), so load from other work on a shared machine falls on all of them. A ratio is the median of its per-round
ratios, shown with their spread. Writes benchmarks/results/text.json and the text section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
import time
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from archiver.deploy.properties import entry_from_archive
from archiver.operate import load as loadgen
from benchmarks import sections, systems
from benchmarks.interleave import load_average
from benchmarks.rounds import measured
from handlers.spec import MANIFEST_FILE

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
PEER_SCRIPT = os.path.join(BENCH_DIR, "peers", "text_fastapi_server.py")
MARKERS = ("<!-- bench:text:start -->", "<!-- bench:text:end -->")
JSON = "application/json"
GOAL = 1.0  # issue 13: tspack >= 1.0x the FastAPI peer's requests/s at c=32

# BERT-tiny's shape (google/bert_uncased_L-2_H-128_A-2), with a vocabulary trained here.
LAYERS, HIDDEN, HEADS, INTERMEDIATE, VOCAB = 2, 128, 2, 512, 8000
MAX_LENGTH = 128  # the position table and text.max_length: what `padding: max_length` pads every row to
TOP_K = 2
LABELS = ("negative", "positive")
# Requests cycle through these; lengths differ so that a batch mixes them, as real traffic does.
TEXTS = (
    "Great coffee.",
    "The screen scratched within a week.",
    "I waited forty minutes for a cold pizza and nobody apologised.",
    "Lovely little cafe, friendly staff, and the cakes are worth the trip.",
    "The update fixed the crash on start-up, but battery life is still worse than before.",
    "Check-in took an hour, the lift was broken, and the room smelled of smoke; never again.",
    "The hotel room was clean and quiet, the staff were friendly, and breakfast was better than we expected "
    "for the price.",
    "Battery life is excellent, but the camera struggles in low light and the software update made the phone "
    "noticeably slower.",
    "A fine film.",
    "The plot drags in the middle, yet the final act is tense, funny and surprisingly moving.",
    "Delivery was quick and the parcel was well packed, but one of the glasses arrived cracked and support has "
    "not replied in three days.",
    "Honestly the best headphones I have owned: comfortable for hours, the noise cancelling works on trains, "
    "and the case is small enough for a coat pocket.",
)

LUA = r"""
local bodies = {BODIES}
local auth = os.getenv("BENCH_AUTHORIZATION")
local sent = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
if auth and auth ~= "" then wrk.headers["Authorization"] = auth end

request = function()
  sent = sent % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[sent])
end
"""


@dataclass(frozen=True)
class Variant:
    """One tspack archive: a padding mode and the serving settings baked into its model-config.yaml. delay_ms None:
    zero-wait batching (opt-in), else TorchServe's frontend waits that long for a batch (its default mode)."""

    padding: str  # text.padding: "longest" | "max_length"
    workers: int
    threads: int
    batch_size: int
    delay_ms: int | None = None

    @property
    def batching(self) -> str:
        return f"zw{self.batch_size}" if self.delay_ms is None else f"b{self.batch_size}d{self.delay_ms}"

    @property
    def key(self) -> str:
        return f"tspack-{self.padding}-{self.workers}w{self.threads}t-{self.batching}"

    @property
    def name(self) -> str:
        padding = self.padding.replace("_", "-")
        return f"bert-{padding}-w{self.workers}t{self.threads}-{self.batching}"

    @property
    def label(self) -> str:
        if self.delay_ms is None:
            return f"{self.workers}w x {self.threads}t, zero-wait batch {self.batch_size}"
        return f"{self.workers}w x {self.threads}t, batch {self.batch_size}/{self.delay_ms}ms"

    def serving(self) -> dict:
        common = {"workers": self.workers, "intra_op_threads": self.threads, "batch_size": self.batch_size}
        if self.delay_ms is None:
            return {**common, "batching": "zero_wait"}
        return {**common, "max_batch_delay_ms": self.delay_ms}


@dataclass
class Settings:
    quick: bool = False
    rounds: int = 3
    seconds: float = 6.0  # each c=32 run
    c1_seconds: float = 4.0  # each c=1 run
    warmup_s: float = 6.0
    concurrency: int = 32
    # tspack's configurations, padded to each run's longest row; the best at c=32 is compared. The first one is
    # also built padded to max_length. One thread per worker: a worker's second ONNX Runtime thread competes with
    # TorchServe's frontend and wrk for the same 2 cores (one 2-thread worker served 847 against 1,619 req/s).
    tspack: tuple[Variant, ...] = (Variant("longest", 2, 1, 16, 5), Variant("longest", 2, 1, 16))
    fastapi: tuple[tuple[int, int], ...] = ((1, 2), (2, 1))  # (uvicorn workers, threads each): workers x threads <= 2
    work: str = os.path.join(BENCH_DIR, "work", "text")
    out: str = os.path.join(BENCH_DIR, "results", "text.json")
    markdown: str = sections.BENCHMARKS_MD
    command: str = ".venv/bin/python -m benchmarks.text_bench"

    def variants(self) -> list[Variant]:
        """Every archive to build and serve: the tspack configurations, then the first one padded to max_length."""
        return [*self.tspack, replace(self.tspack[0], padding="max_length")]


@dataclass
class Contender:
    """One system under test, started once for the whole run."""

    key: str  # Variant.key, or "fastapi-1w2t", ...
    system: str  # "tspack" | "fastapi"
    config: str
    start: Callable[[], systems.Served]
    padding: str = "none"  # tspack's text.padding; the peer runs one text per request, unpadded
    served: systems.Served | None = None


# --- the model -----------------------------------------------------------------------------------------------


def bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_LENGTH,
                      pad_token_id=0, id2label=dict(enumerate(LABELS)),
                      label2id={label: i for i, label in enumerate(LABELS)})


def model_folder(work: str) -> str:
    """The save_pretrained folder (config.json, model.safetensors, tokenizer.json), made afresh (seeded, seconds)
    so that it always matches the constants above."""
    folder = os.path.join(work, "bert")
    shutil.rmtree(folder, ignore_errors=True)
    import torch
    from transformers import BertForSequenceClassification

    from archiver.zoo.text_classifier import save_folder, train_wordpiece, vader_corpus

    tokenizer = train_wordpiece(vader_corpus().train_texts, VOCAB)
    torch.manual_seed(0)
    model = BertForSequenceClassification(bert_config(tokenizer.get_vocab_size())).eval()
    return save_folder(model, tokenizer, folder)


def token_counts(folder: str) -> list[int]:
    """Tokens per text of TEXTS, [CLS] and [SEP] included, as the served tokenizer cuts them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(list(TEXTS))]


def build_archives(folder: str, store: str, variants: list[Variant]) -> dict[Variant, str]:
    """One ONNX archive per variant, built and validated by the archiver; {variant: .mar file name}."""
    from archiver.build import build
    from archiver.spec import DeploySpec
    from handlers.spec import parse

    models = [{"name": v.name, "version": "1.0", "source": {"pretrained": folder}, "frontend": "text",
               "text": {"max_length": MAX_LENGTH, "max_texts": 8, "padding": v.padding},
               "output": {"kind": "classification", "top_k": TOP_K, "labels": list(LABELS)},
               "serving": v.serving(), "artifacts": [{"format": "onnx"}]} for v in variants]
    result = build(parse(DeploySpec, {"models": models, "model_store": store}), progress=False)
    failed = [f"{e.name}: {e.error}" for e in result.failed]
    if failed:
        raise RuntimeError("tspack build failed: " + "; ".join(failed))
    return {v: f"{v.name}_v1.0.mar" for v in variants}


def unpack_onnx(mar: str, folder: str) -> str:
    """The archive's own model.onnx, for the peer: both systems run the very same exported file."""
    with zipfile.ZipFile(mar) as archive:
        name = json.loads(archive.read(MANIFEST_FILE))["runtime"]["file"]
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(name))
        with archive.open(name) as source, open(path, "wb") as target:
            shutil.copyfileobj(source, target)
    return path


# --- the load --------------------------------------------------------------------------------------------------


def bodies(texts: tuple[str, ...] = TEXTS) -> list[bytes]:
    return [json.dumps({"text": text}, ensure_ascii=False).encode("utf-8") for text in texts]


def lua_script(folder: str, texts: tuple[str, ...] = TEXTS) -> str:
    """wrk's script: POST each text of `texts` in turn, as `{"text": ...}`, with loadgen's `done` report."""
    literals = []
    for body in bodies(texts):
        text = body.decode("utf-8")
        if "]==]" in text:  # the long bracket would end early
            raise ValueError(f"text cannot go in a Lua long string: {text!r}")
        literals.append(f"[==[{text}]==]")
    done = loadgen.LUA[loadgen.LUA.index("function done"):]
    path = os.path.join(folder, "texts.lua")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(LUA.replace("{BODIES}", "{" + ", ".join(literals) + "}") + done)
    return path


def body_file(folder: str) -> str:
    """One request's bytes: what drains a queue and what loadgen.run wants as its (unused) default body."""
    path = os.path.join(folder, "text.json")
    with open(path, "wb") as f:
        f.write(bodies()[len(TEXTS) // 2])
    return path


def drain(served: systems.Served, body: str, timeout_s: float = 120) -> None:
    """Wait until what a previous run left queued is answered: one request queues behind it."""
    with open(body, "rb") as f:
        systems.http_status(served.url, f.read(), JSON, served.authorization, timeout=timeout_s)


def answer(served: systems.Served, body: bytes) -> dict:
    headers = {"Content-Type": JSON, **({"Authorization": served.authorization} if served.authorization else {})}
    request = urllib.request.Request(served.url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def disagreements(live: list[Contender], texts: tuple[str, ...] = TEXTS, tolerance: float = 1e-4) -> list[str]:
    """Where a system's top-k answer to a text differs from the first system's: a fast wrong answer is no win."""
    problems = []
    for text, body in zip(texts, bodies(texts)):
        answers = {c.key: answer(c.served, body)["predictions"] for c in live}
        reference_key, reference = next(iter(answers.items()))
        for key, predictions in answers.items():
            same = [p["label"] for p in predictions] == [p["label"] for p in reference] and all(
                abs(p["probability"] - q["probability"]) <= tolerance for p, q in zip(predictions, reference))
            if not same:
                problems.append(f"{key} answers {text[:30]!r} with {predictions}, {reference_key} with {reference}")
    return problems


def measure(contender: Contender, concurrency: int, seconds: float, script: str, body: str) -> dict:
    served = contender.served
    drain(served, body)
    with systems.CpuWatch(served.pid) as cpu:
        result = loadgen.run(served.url, body, JSON, concurrency, seconds, served.authorization, script=script)
        cpu.excluded_cpu_s = result.loadgen_cpu_s
    return {"key": contender.key, "system": contender.system, "config": contender.config,
            "padding": contender.padding, "concurrency": concurrency, **result.as_dict(),
            "server_cpu_share": cpu.tree_share, "other_cpu_share": cpu.other_share}


# --- the systems ---------------------------------------------------------------------------------------------


def contenders(s: Settings, store: str, mars: dict[Variant, str], onnx: str, tokenizer: str,
               python: str) -> list[Contender]:
    found = []
    for variant, mar in mars.items():
        folder = os.path.join(s.work, "servers", variant.name)

        def start(folder=folder, mar=mar) -> systems.Served:
            return systems.start_tspack(folder, store, entry_from_archive(mar, store))

        found.append(Contender(variant.key, "tspack", variant.label, start, padding=variant.padding))
    for workers, threads in s.fastapi:
        env = {"BENCH_MODEL": onnx, "BENCH_TOKENIZER": tokenizer, "BENCH_MAX_LENGTH": str(MAX_LENGTH),
               "BENCH_THREADS": str(threads), "BENCH_TOP_K": str(TOP_K), "BENCH_LABELS": json.dumps(list(LABELS))}
        log = os.path.join(s.work, "servers", f"text-fastapi-{workers}w{threads}t.log")

        def start(workers=workers, env=env, log=log) -> systems.Served:
            return systems.start_peer("fastapi", python, [str(workers)], env, log, script=PEER_SCRIPT)

        config = f"{workers} uvicorn worker{'s' if workers > 1 else ''} x {threads}t"
        found.append(Contender(f"fastapi-{workers}w{threads}t", "fastapi", config, start))
    return found


# --- the run -------------------------------------------------------------------------------------------------


def run(s: Settings) -> dict:
    from tqdm import tqdm

    from benchmarks.peers import env as peers_env

    started = time.monotonic()
    loadgen.ensure_wrk()
    background, load_before = systems.background_share(), load_average()
    python = peers_env.ensure()
    folder = model_folder(s.work)
    store = os.path.join(s.work, "store")
    shutil.rmtree(store, ignore_errors=True)  # archives carry handlers/: rebuild each run
    mars = build_archives(folder, store, s.variants())
    onnx = unpack_onnx(os.path.join(store, mars[s.tspack[0]]), os.path.join(s.work, "peer"))
    scratch = os.path.join(s.work, "load")
    script, body = lua_script(scratch), body_file(scratch)
    pool = contenders(s, store, mars, onnx, os.path.join(folder, "tokenizer.json"), python)
    rows: list[dict] = []
    failures: list[dict] = []
    total = len(pool) * (2 + s.rounds)
    bar = tqdm(total=total, desc="text bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        for contender in pool:  # every system up and warm before the first measured round
            bar.set_postfix_str(f"start {contender.key}")
            try:
                contender.served = contender.start()
                loadgen.run(contender.served.url, body, JSON, s.concurrency, s.warmup_s,
                            contender.served.authorization, script=script)
            except Exception as exc:  # one system that does not start must not cost the others
                failures.append({"key": contender.key, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                bar.write(f"  FAILED to start {contender.key}: {exc}")
            bar.update(1)
        live = [c for c in pool if c.served is not None]
        failures += [{"key": "answers", "error": problem} for problem in disagreements(live)]
        for index in range(s.rounds):
            for contender in live if index % 2 == 0 else live[::-1]:
                # c=1 in the first round only: its p50 is reported, no ratio is built on it
                runs = [(s.concurrency, s.seconds)] + ([(1, s.c1_seconds)] if index == 0 else [])
                for concurrency, seconds in runs:
                    bar.set_postfix_str(f"round {index + 1} {contender.key} c={concurrency}")
                    # rerun while other work or an idle core (a peer's connections all on one worker) spoils it
                    numbers = measured(partial(measure, contender, seconds=seconds, script=script, body=body),
                                       concurrency, say=bar.write, name=contender.key)
                    row = {**numbers, "round": index + 1}
                    rows.append(row)
                    bar.write(f"  round {index + 1} {contender.key:<18} c={concurrency:<3} "
                              f"{row['requests_per_s']:8.1f} req/s  p50 {row['p50_ms'] or 0:7.2f} ms  "
                              f"errors {row['errors']}"
                              + (f"  (other load {row['other_cpu_share']:.0%})" if row["other_cpu_share"] > 0.1
                                 else ""))
                    bar.update(1)
    finally:
        bar.close()
        for contender in pool:
            if contender.served is not None:
                contender.served.stop()
    counts = token_counts(folder)
    result = summarize(rows, s.variants()[-1].key, s.concurrency)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": s.command + (" --quick" if s.quick else ""), "machine": sections.machine(),
        "cores": os.cpu_count(), "load_before": load_before, "load_after": load_average(),
        "background_at_start": background, "elapsed_s": round(time.monotonic() - started, 1),
        "model": {"layers": LAYERS, "hidden": HIDDEN, "heads": HEADS, "intermediate": INTERMEDIATE,
                  "vocab": VOCAB, "max_length": MAX_LENGTH, "format": "onnx", "runtime": "onnxruntime",
                  "texts": len(TEXTS), "tokens_per_text": counts,
                  "mean_tokens": round(sum(counts) / len(counts), 1)},
        "tspack_configs": [v.key for v in s.tspack], "fastapi_configs": [list(c) for c in s.fastapi],
        "rounds": s.rounds, "seconds": {"c32": s.seconds, "c1": s.c1_seconds, "warmup": s.warmup_s},
        "rows": rows, "failures": failures, **result,
    }


def _ratio(rows: list[dict], numerator: str, denominator: str, concurrency: int) -> dict | None:
    """Per round numerator / denominator requests/s, their median and spread; None without a shared round."""
    by = {(r["key"], r["round"]): r["requests_per_s"] for r in rows if r["concurrency"] == concurrency}
    rounds = sorted({r for _, r in by})
    ratios = [by[(numerator, r)] / by[(denominator, r)] for r in rounds
              if (numerator, r) in by and by.get((denominator, r))]
    if not ratios:
        return None
    return {"median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3),
            "max": round(max(ratios), 3), "rounds": [round(x, 3) for x in ratios]}


def summarize(rows: list[dict], max_length_key: str, concurrency: int = 32) -> dict:
    """Medians per system, each system's best configuration, and the ratios the issue asks for.

    max_length_key: the archive padded to max_length; it is compared with the archive of the same serving settings
    padded to the batch's longest row.
    """
    def medians(c: int, field_: str) -> dict[str, float]:
        keys = dict.fromkeys(r["key"] for r in rows if r["concurrency"] == c)
        return {k: round(statistics.median(r[field_] for r in rows if r["key"] == k and r["concurrency"] == c
                                           and r[field_] is not None), 3) for k in keys}

    def best(prefix: str) -> str | None:
        found = {k: v for k, v in rps.items() if k.startswith(prefix)}
        return max(found, key=found.get) if found else None

    rps = medians(concurrency, "requests_per_s")
    tspack, fastapi = best("tspack-longest"), best("fastapi")
    versus = _ratio(rows, tspack, fastapi, concurrency) if tspack and fastapi else None
    longest = max_length_key.replace("tspack-max_length", "tspack-longest", 1)
    return {
        "requests_per_s": rps, "c1_p50_ms": medians(1, "p50_ms"), "p99_ms": medians(concurrency, "p99_ms"),
        "best_tspack": tspack, "best_fastapi": fastapi, "tspack_over_fastapi": versus,
        "padding_pair": [longest, max_length_key],
        "longest_over_max_length": _ratio(rows, longest, max_length_key, concurrency),
        "goal": f"tspack >= {GOAL:g}x FastAPI requests/s at c={concurrency}",
        "met": bool(versus and versus["median"] >= GOAL),
    }


# --- the report ----------------------------------------------------------------------------------------------


def _shown(ratio: dict | None) -> str:
    if not ratio:
        return "n/a"
    return (f"{ratio['median']:.2f}x (median of {len(ratio['rounds'])} rounds; per round "
            f"{', '.join(f'{x:.2f}' for x in ratio['rounds'])})")


PADDING_SHOWN = {"longest": "longest row per length run", "max_length": "max_length", "none": "none (1 text)"}


def section(result: dict) -> str:
    """The text section of BENCHMARKS.md, between its markers."""
    model, rps, p50, p99 = result["model"], result["requests_per_s"], result["c1_p50_ms"], result["p99_ms"]
    shown = {r["key"]: (r["system"], r["config"], r["padding"]) for r in result["rows"]}
    best = {result["best_tspack"], result["best_fastapi"]}
    lines = [
        MARKERS[0],
        "## Text classifier (`" + result["command"].replace(".venv/bin/python -m ", "python -m ") + "`)",
        "",
        f"Machine: {result['machine']}. Date: {result['date']}. Load average before: "
        f"{result['load_before'][0]:.2f}; other work took {result['background_at_start']:.0%} of the CPU at start.",
        "",
        f"Model: BERT-style `BertForSequenceClassification` ({model['layers']} layers, hidden {model['hidden']}, "
        f"{model['heads']} heads, intermediate {model['intermediate']}, vocabulary {model['vocab']}), built with "
        f"`tspack build --pretrained` through the archiver library as ONNX and served by ONNX Runtime; the FastAPI "
        f"peer tokenizes with `tokenizers` and runs the archive's own `model.onnx` with the same session options, "
        f"in one process per uvicorn worker. Requests: `{{\"text\": ...}}`, {model['texts']} sentences in turn, "
        f"{min(model['tokens_per_text'])}-{max(model['tokens_per_text'])} tokens ({model['mean_tokens']:g} on "
        f"average); max_length {model['max_length']}. {result['rounds']} interleaved rounds of "
        f"{result['seconds']['c32']:g} s at c=32 and {result['seconds']['c1']:g} s at c=1 per system.",
        "",
        "| system | config | padding | req/s at c=32 | p99 ms at c=32 | p50 ms at c=1 |",
        "|---|---|---|---|---|---|",
    ]
    for key, value in rps.items():
        system, config, padding = shown[key]
        lines.append(f"| {system}{' (best)' if key in best else ''} | {config} | {PADDING_SHOWN[padding]} | "
                     f"{value:,.0f} | {p99.get(key, 0):.1f} | {p50.get(key, 0):.2f} |")
    met = "met" if result["met"] else "not met"
    lines += [
        "",
        f"- tspack's best over FastAPI's best configuration, requests/s at c=32: "
        f"{_shown(result['tspack_over_fastapi'])}; goal >= {GOAL:g}x: {met}.",
        f"- Padding to the longest row of each length run (`padding: longest`) over padding to max_length (same "
        f"serving settings), requests/s at c=32: {_shown(result['longest_over_max_length'])}.",
        f"- c=1 p50: tspack {p50.get(result['best_tspack'] or '', 0):.2f} ms, FastAPI "
        f"{p50.get(result['best_fastapi'] or '', 0):.2f} ms (each in its best configuration at c=32).",
    ]
    if result["background_at_start"] > 0.1:
        lines.append(f"- Warning: other work used {result['background_at_start']:.0%} of the CPU when the run started "
                     f"(load average {result['load_before'][0]:.2f}): figures are low and noisy.")
    if result["failures"]:
        lines.append(f"- Failed: {'; '.join(f['key'] + ': ' + f['error'][:200] for f in result['failures'])}")
    lines.append(MARKERS[1])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 short rounds (~3 min with the build)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 2)")
    parser.add_argument("--seconds", type=float, help="each c=32 run (default 6, quick 3)")
    parser.add_argument("--work", help="scratch folder (default benchmarks/work/text)")
    parser.add_argument("--out", help="result JSON (default benchmarks/results/text.json)")
    parser.add_argument("--markdown", help="file whose text section is rewritten (default BENCHMARKS.md)")
    args = parser.parse_args(argv)
    s = Settings(quick=args.quick)
    if args.quick:
        s = replace(s, rounds=2, seconds=3.0, c1_seconds=2.0, warmup_s=3.0, tspack=s.tspack[:1])
    if args.rounds:
        s = replace(s, rounds=max(2, args.rounds))  # one round has no spread, and no interleaving
    if args.seconds:
        s = replace(s, seconds=args.seconds)
    return replace(s, work=args.work or s.work, out=args.out or s.out, markdown=args.markdown or s.markdown)


def main(argv: list[str] | None = None) -> int:
    s = parse_args(argv)
    result = run(s)
    os.makedirs(os.path.dirname(s.out), exist_ok=True)
    with open(s.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    sections.write_section(MARKERS, section(result), s.markdown)
    rps = result["requests_per_s"]
    print("\nrequests/s at c=32 (median of rounds): " + ", ".join(f"{k} {v:,.0f}" for k, v in rps.items()))
    print(f"tspack best ({result['best_tspack']}) / FastAPI best ({result['best_fastapi']}): "
          f"{_shown(result['tspack_over_fastapi'])}")
    print(f"padding longest / max_length: {_shown(result['longest_over_max_length'])}")
    print("c=1 p50 ms: " + ", ".join(f"{k} {v:.2f}" for k, v in result["c1_p50_ms"].items()))
    print(f"wrote {s.out} and the text section of {s.markdown}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
