"""The benchmark's outputs: latest.json (rows, figures), latest.png (throughput and p99), BENCHMARKS.md section."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from collections import defaultdict

import numpy as np

from benchmarks import ratios as figures
from benchmarks.rounds import DISTURBED_SHARE, IDLE_SHARE, SATURATING_CLIENTS
from benchmarks.sections import machine_info

START, END = "<!-- bench:serving:start -->", "<!-- bench:serving:end -->"
RATIO_KEYS = figures.RATIO_KEYS  # the keys latest.json's `ratios` always has
ROW_FIELDS = ("phase", "comparison", "round", "system", "model", "runtime", "config", "body", "concurrency",
              "batch_size", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "requests", "duration_s",
              "peak_rss_mb", "loadgen_cpu_share", "server_cpu_share", "other_cpu_share",
              "frontend_cpu_ms_per_request", "workers_cpu_ms_per_request", "cold_start_s", "attempts", "disturbed",
              "idle_cores", "best")


def best_row(rows: list[dict], system: str, model: str, runtime: str = "torchscript",
             body: str | None = "json", concurrency: int = 32, phase: str = "sweep") -> dict | None:
    """The row with the most requests/s among one system's configurations at `concurrency` in `phase`."""
    found = [r for r in rows if r.get("phase") == phase and r["system"] == system and r["model"] == model
             and r["runtime"] == runtime and r.get("body") == body and r.get("concurrency") == concurrency
             and r.get("requests_per_s") is not None]
    return max(found, key=lambda r: r["requests_per_s"], default=None)


def mark_best(rows: list[dict]) -> None:
    """`best`: a sweep row of its (system, model, runtime, body) group's best configuration at c=32 (limit rows: of
    the best layout and batch per body); rows of the interleaved rounds are each system's chosen configuration."""
    winners = set()
    for r in rows:
        if r.get("phase") != "sweep":
            continue
        group = (r["system"], r["model"], r["runtime"], r.get("body"))
        if r["system"] == "limit":
            same = [x for x in rows if x.get("phase") == "sweep" and (x["system"], x["model"], x["runtime"],
                                                                       x.get("body")) == group]
            top = max(same, key=lambda x: x["requests_per_s"])
            winners.add((*group, top["config"], top["batch_size"]))
        else:
            top = best_row(rows, r["system"], r["model"], r["runtime"], r.get("body"))
            if top:
                winners.add((*group, top["config"], None))
    for r in rows:
        if r.get("phase") != "sweep":
            r["best"] = r.get("phase") == "rounds"
            continue
        batch = r["batch_size"] if r["system"] == "limit" else None
        r["best"] = (r["system"], r["model"], r["runtime"], r.get("body"), r["config"], batch) in winners


def document(results: dict, settings) -> dict:
    rows = results["rows"]
    mark_best(rows)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command, "quick": settings.quick, "machine": machine_info(),
        "elapsed_s": results["elapsed_s"], "background_cpu_share_at_start": results["background_at_start"],
        "rounds": results.get("rounds"), "reruns": results.get("reruns"), "disturbed_share": DISTURBED_SHARE,
        "ratios": figures.compute(rows, results["cold_start_s"], results.get("cold_start_light_s")),
        "cold_start_of": results.get("cold_start_of"),
        "tune": results.get("tune"), "step_seconds": results.get("step_seconds") or {},
        "rows": [{k: r.get(k) for k in ROW_FIELDS} for r in rows], "failures": results["failures"],
        "notes": NOTES,
    }


NOTES = [
    "Figures (`ratios`): each is the median of its per-round values over the interleaved rounds of its comparison "
    "(every system's best configuration up at once, measured in turns whose order reverses every round), with min, "
    f"max and the number of rounds. A row measured while other work used over {DISTURBED_SHARE:.0%} of the CPU is "
    "rerun (up to `reruns` times); a row still disturbed is marked, and every figure built on it is null with the "
    "reason. "
    "Figures of phase `sweep` come from the one configuration sweep (1 round).",
    f"A row at {SATURATING_CLIENTS} or more clients whose server used under {IDLE_SHARE:.0%} of the CPU (it left a "
    "core idle) is rerun the same way: with 2 uvicorn workers that is the kernel handing all 32 connections to one "
    "of them (821 req/s against "
    "1,100-1,480 when they are spread, light CNN, 12 runs in a row), so FastAPI's figures are its balanced ones. "
    "FastAPI runs every layout in every round, and each round's FastAPI figure is its best layout of that round on "
    "the same runtime (light: 2 uvicorn workers on the TorchScript file, and on the `aoti` package tspack compiled, "
    "for `aoti_over_fastapi_aoti_light`).",
    "tspack tune (issue 14): run on the light model's default spec (SLO p99 50 ms, 1 and 32 clients, its budget in "
    "`tune`) after the sweep; the configuration it chose is served in the light rounds beside the default, its "
    "config labelled `(tspack tune)`.",
    "requests/s counts 2xx answers; errors = non-2xx answers + socket errors (connect, read, write, timeout).",
    "Load: wrk, 1 thread, keep-alive connections = concurrency, on 127.0.0.1.",
    "limit rows: the archive's own code in-process, no HTTP: `model alone` (runtime.run on a ready batch) and "
    "`decode + model` (the handler's Pipeline.process on the same request bytes: decode, validate, stack, run, "
    "encode), as 1 process x 2 threads or 2 processes x 1 thread side by side; requests/s is samples/s and the "
    "latencies are per batch.",
    "tspack: token authorization on (Bearer inference key), model API off; each configuration is its own archive "
    "(workers, intra_op_threads, batching in model-config.yaml). `zero-wait`: the handler batches whatever is "
    "queued the moment the model is free (handlers/zero_wait.py).",
    "naive TorchServe: benchmarks/naive_handler.py (BaseHandler, torch.tensor per request, output.tolist()), "
    "TorchServe defaults (workers = cores, batch 1, decode_input_request on, no thread tuning), token auth on.",
    "Peers (benchmarks/.venv): FastAPI async /predict and LitServe (fast_queue) load the same TorchScript file "
    "and answer softmax top-k like tspack; torch threads per worker as the config says. LitServe parses every "
    "body as JSON before its decode_request sees it, so it takes JSON bodies only.",
    "Bodies: the same bytes for every system that takes the form: JSON {\"data\": ...} (light ~16 KB, heavy ~3 MB), "
    ".npy (light 3 KB, heavy 602 KB), and for tspack the Open Inference Protocol v2 requests tritonclient's HTTP "
    "client makes: `oip-json` (JSON in, JSON out) and `oip-binary` (its default: tensor bytes after a JSON header, "
    "Inference-Header-Content-Length, binary outputs), POST /v2/models/{name}/infer.",
    "Weights are random (seeded); heavy int8 (ORT static) is validated with quantize.min_top1_agreement relaxed "
    "to 0.75 (8 random samples), since random weights give near-tied logits.",
    "CPU columns: shares of all cores over the measured run, used by wrk, by the served system's process tree, and "
    "by anything else; `frontend`/`workers` ms/req: CPU time per answered request of TorchServe's Java frontend "
    "and of the Python processes (workers; for peers, all their processes).",
    "Each server gets a warm-up at concurrency 32 for its first body, 6 s, and half that for each further body "
    "(halved again under --quick); TorchServe systems on the heavy model get 24 s, since at ~40 req/s their JVM "
    "keeps compiling its hot paths for ~20 s (the peers are Python: no JIT). Before each measured run the harness "
    "waits until the requests left queued by the previous run are answered.",
    "Servers of a comparison stay up together; FastAPI and LitServe are paused (SIGSTOP) while another system is "
    "measured, since LitServe's idle worker polls its queue (~9% of this machine); TorchServe idles at ~0.1%.",
    "worker cold start: one worker registered through the management API (synchronous) into a running server, to "
    "READY; its peak RSS over registering and 2 s of requests at c=8.",
]


def write_json(doc: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "latest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path


def _bar_label(r: dict) -> str:
    body = f" · {r['body']}" if r.get("body") else ""
    return f"{r['system']} · {r['runtime']}{body}\n{r['config']}" + (
        f", batch {r['batch_size']}" if r["system"] == "limit" else "")


def chart_bars(doc: dict, model: str) -> list[dict]:
    """One bar per contender of the model's comparison at c=32 (median and spread over rounds), then the sweep's best
    of each (system, runtime, body) the comparison did not run (one round)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in doc["rows"]:
        if r["model"] != model or r.get("requests_per_s") is None or r.get("phase") not in ("rounds", "sweep"):
            continue
        if r["system"] != "limit" and r.get("concurrency") != 32:
            continue
        if r.get("phase") == "sweep" and not r.get("best"):
            continue
        groups[(r["phase"], r["system"], r["runtime"], r.get("body"), r["config"], r["batch_size"])].append(r)
    compared = {key[1:4] for key in groups if key[0] == "rounds"}
    bars = []
    for key, rows in groups.items():
        if key[0] == "sweep" and key[1:4] in compared:
            continue
        rps = [r["requests_per_s"] for r in rows]
        p99 = [r["p99_ms"] for r in rows if r.get("p99_ms") is not None]
        bars.append({**rows[0], "rps": float(np.median(rps)), "rps_min": min(rps), "rps_max": max(rps),
                     "p99": float(np.median(p99)) if p99 else None, "n": len(rows),
                     "any_disturbed": any(r.get("disturbed") for r in rows)})
    order = {"limit": 0, "tspack": 1, "fastapi": 2, "litserve": 3, "naive-torchserve": 4}
    return sorted(bars, key=lambda b: (order.get(b["system"], 9), b["phase"] != "rounds", -b["rps"]))


def write_png(doc: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("light", "heavy") if chart_bars(doc, m)]
    heights = [max(2.5, 0.5 * len(chart_bars(doc, m)) + 1.2) for m in models] or [2.5]
    fig, axes = plt.subplots(max(1, len(models)), 2, figsize=(16, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = {"limit": "#999999", "tspack": "#1f77b4", "fastapi": "#2ca02c", "litserve": "#9467bd",
              "naive-torchserve": "#d62728"}
    for axes_row, model in zip(axes, models):
        bars = chart_bars(doc, model)
        labels = [_bar_label(b) + (f" [{b['n']} rounds]" if b["phase"] == "rounds" else " [sweep]")
                  + (" [disturbed]" if b["any_disturbed"] else "") for b in bars]
        y = list(range(len(bars)))[::-1]
        for ax, key, title in ((axes_row[0], "rps", "requests/s at c=32, median of rounds, min-max (limit: samples/s)"),
                               (axes_row[1], "p99", "p99 latency at c=32, ms, median (limit: per batch)")):
            values = [b[key] or 0.0 for b in bars]
            spread = None
            if key == "rps":
                spread = [[b["rps"] - b["rps_min"] for b in bars], [b["rps_max"] - b["rps"] for b in bars]]
            ax.barh(y, values, xerr=spread, color=[colors.get(b["system"], "#777777") for b in bars],
                    hatch=None, capsize=3, ecolor="#333333")
            ax.set_yticks(y, labels if ax is axes_row[0] else [""] * len(bars), fontsize=7)
            ax.set_title(f"{model} model: {title}", fontsize=9)
            for yi, v, b in zip(y, values, bars):
                shown = " no answer" if b[key] is None else f" {v:,.0f}" if v >= 10 else f" {v:.1f}"
                ax.text(max(v, b["rps_max"]) if key == "rps" else v, yi, shown, va="center", fontsize=7)
            top = max([b["rps_max"] for b in bars] + values) if key == "rps" else max(values, default=0)
            ax.set_xlim(0, top * 1.22 if top > 0 else 1)
            ax.grid(axis="x", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"{doc['command']} · {m['cpu']} · {m['cores']} cores · {doc['date'][:10]} · "
                 f"{doc.get('rounds')} interleaved rounds", fontsize=10)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "latest.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def disturbed_rows(doc: dict) -> int:
    return sum(1 for r in doc["rows"] if r.get("disturbed"))


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f}%"


def _figure_line(key: str, f: dict) -> str:
    spread = f"{_cell(f.get('min'))}–{_cell(f.get('max'))}" if f.get("min") is not None else "–"
    value = "**null**" if f.get("value") is None and f.get("null_reason") else _cell(f.get("value"))
    note = f"null: {f['null_reason']}" if f.get("null_reason") else f.get("about", "")
    return f"| {key} | {value} | {spread} | {f.get('rounds', 0)} | {f.get('goal') or ''} | {note} |"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    busy = disturbed_rows(doc)
    lines = [START, "## Serving benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, Python {m['python']}. "
             f"Date: {doc['date']}. Command: `{doc['command']}` ({doc['elapsed_s']:.0f} s), {doc.get('rounds')} "
             f"interleaved rounds per comparison, up to {doc.get('reruns')} reruns of a disturbed row. "
             f"CPU busy with other work before the run: {_pct(doc['background_cpu_share_at_start'])}; rows still "
             f"disturbed (other work over {doc.get('disturbed_share', DISTURBED_SHARE):.0%} of the CPU) after "
             f"their reruns: {busy} of {len(doc['rows'])}"
             + (" (figures built on them are null: rerun on a quiet machine)" if busy else "") + ".", "",
             "| figure | median | min–max | rounds | goal | about |", "|---|---|---|---|---|---|"]
    lines += [_figure_line(k, v) for k, v in doc["ratios"].items()]
    if doc.get("cold_start_of"):
        lines += ["", f"cold_start_s: {doc['cold_start_of']}; cold_start_light_s: one light archive."]
    if doc.get("tune"):
        t = doc["tune"]
        lines += ["", f"tspack tune ({t['budget_s']:.0f} s budget, SLO p99 {t['slo_p99_ms']:g} ms, clients "
                      f"{','.join(map(str, t['concurrency']))}): {t['trials']} configurations tried; {t['verdict']}"]
    if doc.get("step_seconds"):
        steps = ", ".join(f"{name} {seconds:.0f}" for name, seconds in doc["step_seconds"].items())
        lines += ["", f"Time per step (s): {steps}."]
    lines += ["", "Phase: `sweep` = each configuration once (★ = the best of its system, runtime and body at c=32), "
              "`rounds` = the comparison's interleaved rounds (each system's best configuration), `cold` = worker "
              "cold starts. ⚠ = still disturbed by other work after its reruns; ◐ = its server still left a core idle "
              "under load after its reruns.", "",
              "| phase | system | model | runtime | config | body | c | batch | req/s | p50 ms | p95 ms | p99 ms "
              "| errors | peak RSS MB | frontend CPU ms/req | workers CPU ms/req | other CPU | tries |",
              "|" + "---|" * 18]
    for r in doc["rows"]:
        phase = f"{r.get('phase') or ''} {r.get('round') or ''}".strip()
        star = " ★" if r.get("best") and r.get("phase") == "sweep" else ""
        warn = " ⚠" if r.get("disturbed") else (" ◐" if r.get("idle_cores") else "")
        value = _cell(r.get("requests_per_s")) if r.get("requests_per_s") is not None else (
            f"cold start {_cell(r.get('cold_start_s'))} s")
        lines.append(f"| {phase}{warn} | {r['system']}{star} | {r['model']} | {r['runtime']} | {r['config']} | "
                     f"{r.get('body') or '–'} | {r.get('concurrency') or '–'} | {r['batch_size']} | {value} | "
                     f"{_cell(r.get('p50_ms'))} | {_cell(r.get('p95_ms'))} | {_cell(r.get('p99_ms'))} | "
                     f"{_cell(r.get('errors'))} | {_cell(r.get('peak_rss_mb'))} | "
                     f"{_cell(r.get('frontend_cpu_ms_per_request'))} | {_cell(r.get('workers_cpu_ms_per_request'))} | "
                     f"{_pct(r.get('other_cpu_share'))} | {r.get('attempts') or 1} |")
    if doc["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f.get('system')} {f.get('config', '')}: {f['error'][:300]}"
                                          for f in doc["failures"]]
    lines += ["", "Notes:", ""] + [f"- {n}" for n in doc["notes"]] + ["", END]
    return "\n".join(lines) + "\n"


def write_markdown(doc: dict, path: str) -> str:
    """Replace only the text between the serving markers; create the file (or the section) when missing."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    section = markdown(doc)
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "# Benchmarks\n\n") + section
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_all(results: dict, settings) -> dict:
    doc = document(results, settings)
    return {"json": write_json(doc, settings.out_dir), "png": write_png(doc, settings.out_dir),
            "markdown": write_markdown(doc, settings.markdown), "doc": doc}


def summary(results: dict, paths: dict) -> str:
    lines = []
    for key, f in paths["doc"]["ratios"].items():
        if f.get("value") is None and f.get("null_reason") == "not measured in this run":
            continue
        spread = f" ({_cell(f.get('min'))}–{_cell(f.get('max'))}, {f.get('rounds')} rounds)" if f.get("min") else ""
        shown = _cell(f.get("value")) if f.get("value") is not None else f"null: {f.get('null_reason')}"
        lines.append(f"  {key:<36} {shown}{spread}")
    failed = f"\n{len(results['failures'])} failure(s): see failures in {paths['json']}" if results["failures"] else ""
    busy = disturbed_rows(paths["doc"])
    if busy:
        failed += (f"\nwarning: {busy} rows stayed disturbed by other work after their reruns; the figures built on "
                   "them are null: rerun on a quiet machine")
    return (f"bench done in {results['elapsed_s']:.0f} s: {len(results['rows'])} rows\n" + "\n".join(lines)
            + f"\nwrote {paths['json']}, {paths['png']}, {paths['markdown']}{failed}")
