"""The benchmark's outputs: latest.json (rows, ratios), latest.png (throughput and p99), BENCHMARKS.md section."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re

START, END = "<!-- bench:serving:start -->", "<!-- bench:serving:end -->"
RATIO_KEYS = ("e2e_over_limit_heavy", "e2e_over_limit_heavy_best_runtime", "e2e_over_limit_light",
              "tspack_over_naive_light", "tspack_over_naive_heavy", "tspack_over_fastapi_light",
              "tspack_over_litserve_light", "p99_over_fastapi_light", "c1_p50_ms_light", "c1_p50_ms_light_min",
              "c1_p50_ms_light_unbatched", "c1_p50_ms_light_unbatched_onnx",
              "cold_start_s", "cold_start_light_s")
ROW_FIELDS = ("system", "model", "runtime", "config", "body", "concurrency", "batch_size", "requests_per_s", "p50_ms",
              "p95_ms", "p99_ms", "errors", "requests", "duration_s", "peak_rss_mb", "loadgen_cpu_share",
              "server_cpu_share", "other_cpu_share", "best")


def best_row(rows: list[dict], system: str, model: str, runtime: str = "torchscript",
             body: str | None = "json", concurrency: int = 32) -> dict | None:
    """The row with the most requests/s among one system's configurations at `concurrency`."""
    found = [r for r in rows if r["system"] == system and r["model"] == model and r["runtime"] == runtime
             and r["body"] == body and r["concurrency"] == concurrency]
    return max(found, key=lambda r: r["requests_per_s"], default=None)


def best_limit(rows: list[dict], model: str, runtime: str) -> dict | None:
    found = [r for r in rows if r["system"] == "limit" and r["model"] == model and r["runtime"] == runtime]
    return max(found, key=lambda r: r["requests_per_s"], default=None)


def mark_best(rows: list[dict]) -> None:
    """`best`: the row belongs to its (system, model, runtime, body) group's best configuration at c=32."""
    groups = {(r["system"], r["model"], r["runtime"], r["body"]) for r in rows if r["system"] != "limit"}
    winners = set()
    for system, model, runtime, body in groups:
        row = best_row(rows, system, model, runtime, body)
        if row:
            winners.add((system, model, runtime, body, row["config"]))
    for r in rows:
        if r["system"] == "limit":
            r["best"] = r is best_limit(rows, r["model"], r["runtime"])
        else:
            r["best"] = (r["system"], r["model"], r["runtime"], r["body"], r["config"]) in winners


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _rps(row: dict | None) -> float | None:
    return row["requests_per_s"] if row else None


def ratios(rows: list[dict], cold_start_s: float | None, cold_start_light_s: float | None = None) -> dict:
    """The headline numbers: requests/s ratios at concurrency 32, same runtime, each system at its best."""
    tspack_light = best_row(rows, "tspack", "light")
    heavy_runtimes = [r for r in rows if r["system"] == "tspack" and r["model"] == "heavy" and r["body"] == "npy"
                      and r["concurrency"] == 32]
    heavy_best = max(heavy_runtimes, key=lambda r: r["requests_per_s"], default=None)
    fastapi = best_row(rows, "fastapi", "light")
    c1_rows = [r for r in rows if r["system"] == "tspack" and r["model"] == "light" and r["concurrency"] == 1
               and r["p50_ms"] is not None]

    def unbatched_c1(runtime: str) -> float | None:
        return min((r["p50_ms"] for r in c1_rows if r["batch_size"] == 1 and r["runtime"] == runtime), default=None)

    c1 = [r for r in rows if tspack_light and r["system"] == "tspack" and r["model"] == "light"
          and r["runtime"] == "torchscript" and r["config"] == tspack_light["config"] and r["concurrency"] == 1]
    return {
        "e2e_over_limit_heavy": _ratio(_rps(best_row(rows, "tspack", "heavy", body="npy")),
                                       _rps(best_limit(rows, "heavy", "torchscript"))),
        "e2e_over_limit_heavy_best_runtime": _ratio(
            _rps(heavy_best), _rps(best_limit(rows, "heavy", heavy_best["runtime"])) if heavy_best else None),
        "heavy_best_runtime": heavy_best["runtime"] if heavy_best else None,
        "e2e_over_limit_light": _ratio(_rps(tspack_light), _rps(best_limit(rows, "light", "torchscript"))),
        "tspack_over_naive_light": _ratio(_rps(tspack_light), _rps(best_row(rows, "naive-torchserve", "light"))),
        "tspack_over_naive_heavy": _ratio(_rps(best_row(rows, "tspack", "heavy")),
                                          _rps(best_row(rows, "naive-torchserve", "heavy"))),
        "tspack_over_fastapi_light": _ratio(_rps(tspack_light), _rps(fastapi)),
        "tspack_over_litserve_light": _ratio(_rps(tspack_light), _rps(best_row(rows, "litserve", "light"))),
        "p99_over_fastapi_light": _ratio(tspack_light["p99_ms"] if tspack_light else None,
                                         fastapi["p99_ms"] if fastapi else None),
        "c1_p50_ms_light": c1[0]["p50_ms"] if c1 else None,
        # the lowest c=1 p50 of any batching tspack configuration (the best one at c=32 may not be the best at c=1)
        "c1_p50_ms_light_min": min((r["p50_ms"] for r in c1_rows if r["batch_size"] > 1), default=None),
        # the same path without batching (batch 1, no wait): TorchServe's own floor at c=1
        "c1_p50_ms_light_unbatched": unbatched_c1("torchscript"),
        "c1_p50_ms_light_unbatched_onnx": unbatched_c1("onnx"),
        "cold_start_s": cold_start_s,
        "cold_start_light_s": cold_start_light_s,
    }


def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "os": platform.platform(terse=True)}


def document(results: dict, settings) -> dict:
    rows = results["rows"]
    mark_best(rows)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": settings.command, "quick": settings.quick, "machine": machine(),
        "elapsed_s": results["elapsed_s"], "background_cpu_share_at_start": results["background_at_start"],
        "ratios": ratios(rows, results["cold_start_s"], results.get("cold_start_light_s")),
        "cold_start_of": results.get("cold_start_of"),
        "rows": [{k: r.get(k) for k in ROW_FIELDS} for r in rows], "failures": results["failures"],
        "notes": NOTES,
    }


NOTES = [
    "requests/s counts 2xx answers; errors = non-2xx answers + socket errors (connect, read, write, timeout).",
    "Load: wrk, 1 thread, keep-alive connections = concurrency, on 127.0.0.1, one system at a time.",
    "limit rows: the archive's own runtime called in-process on full batches (no HTTP, no decoding); requests/s "
    "is samples/s and the latencies are per batch.",
    "tspack: token authorization on (Bearer inference key), model API off; each configuration is its own archive "
    "(workers, intra_op_threads, batch size, delay in model-config.yaml).",
    "naive TorchServe: benchmarks/naive_handler.py (BaseHandler, torch.tensor per request, output.tolist()), "
    "TorchServe defaults (workers = cores, batch 1, decode_input_request on, no thread tuning), token auth on.",
    "Peers (benchmarks/.venv): FastAPI async /predict and LitServe (fast_queue) load the same TorchScript file "
    "and answer softmax top-k like tspack; torch threads = 2 // workers.",
    "Bodies: the same bytes for every system: light = JSON {\"data\": ...} (~16 KB); heavy = .npy (602 KB) for "
    "tspack vs the limit, JSON (~3 MB) for tspack vs the naive TorchServe.",
    "Weights are random (seeded); heavy int8 (ORT static) is validated with quantize.min_top1_agreement relaxed "
    "to 0.75 (8 random samples), since random weights give near-tied logits.",
    "CPU columns: shares of all cores over the measured run, used by wrk, by the served system's process tree, and "
    "by anything else (other work beside the benchmark: rows above ~10% are not trustworthy).",
    "Each server gets a 6 s warm-up at concurrency 32 per body format (3 s under --quick); before each measured "
    "run the harness waits until the requests left queued by the previous run are answered.",
    "Noise between runs on this 2-core machine is 10-15%.",
]


def write_json(doc: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "latest.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return path


def chart_rows(doc: dict, model: str) -> list[dict]:
    """One bar per system: the best configuration at c=32 per runtime/body, plus the limit."""
    rows = [r for r in doc["rows"] if r["model"] == model and r["best"]
            and (r["system"] == "limit" or r["concurrency"] == 32)]
    order = {"limit": 0, "tspack": 1, "fastapi": 2, "litserve": 3, "naive-torchserve": 4}
    return sorted(rows, key=lambda r: (order.get(r["system"], 9), -r["requests_per_s"]))


def write_png(doc: dict, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in ("light", "heavy") if chart_rows(doc, m)]
    heights = [max(2.5, 0.55 * len(chart_rows(doc, m)) + 1.2) for m in models]
    fig, axes = plt.subplots(len(models), 2, figsize=(15, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    colors = {"limit": "#999999", "tspack": "#1f77b4", "fastapi": "#2ca02c", "litserve": "#9467bd",
              "naive-torchserve": "#d62728"}
    for axes_row, model in zip(axes, models):
        rows = chart_rows(doc, model)
        labels = [f"{r['system']} · {r['runtime']}" + (f" · {r['body']}" if r["body"] else "") + f"\n{r['config']}"
                  + (f", batch {r['batch_size']}" if r["system"] == "limit" else "")
                  + (f" [busy machine: {r['other_cpu_share']:.0%}]" if (r.get("other_cpu_share") or 0) > 0.1 else "")
                  for r in rows]
        y = list(range(len(rows)))[::-1]
        for ax, key, title in ((axes_row[0], "requests_per_s", "requests/s at concurrency 32 (limit: samples/s)"),
                               (axes_row[1], "p99_ms", "p99 latency at concurrency 32, ms (limit: per batch)")):
            values = [r[key] or 0.0 for r in rows]
            ax.barh(y, values, color=[colors.get(r["system"], "#777777") for r in rows])
            ax.set_yticks(y, labels if ax is axes_row[0] else [""] * len(rows), fontsize=8)
            ax.set_title(f"{model} model: {title}", fontsize=10)
            for yi, v, r in zip(y, values, rows):
                shown = " no answer" if r[key] is None else f" {v:,.0f}" if v >= 10 else f" {v:.1f}"
                ax.text(v, yi, shown, va="center", fontsize=8)
            ax.set_xlim(0, max(values) * 1.18 if values else 1)
            ax.grid(axis="x", alpha=0.3)
    m = doc["machine"]
    fig.suptitle(f"{doc['command']} · {m['cpu']} · {m['cores']} cores · {doc['date'][:10]}", fontsize=11)
    fig.tight_layout()
    path = os.path.join(out_dir, "latest.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def contended(doc: dict) -> int:
    return sum(1 for r in doc["rows"] if (r.get("other_cpu_share") or 0) > 0.1)


def _pct(share: float | None) -> str:
    return "–" if share is None else f"{share * 100:.1f}%"


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [START, "## Serving benchmark", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}. "
             f"Date: {doc['date']}. Command: `{doc['command']}` ({doc['elapsed_s']:.0f} s). "
             f"CPU busy with other work before the run: {_pct(doc['background_cpu_share_at_start'])}; "
             f"rows measured while other work used over 10% of the CPU: {contended(doc)} of {len(doc['rows'])}"
             + (" (**not trustworthy**: rerun on a quiet machine)" if contended(doc) else "") + ".", "",
             "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in doc["ratios"].items()]
    if doc.get("cold_start_of"):
        lines += ["", f"cold_start_s: {doc['cold_start_of']}; cold_start_light_s: one light archive."]
    lines += ["", "★ = the system's best configuration (requests/s at concurrency 32) for that runtime and body.", "",
              "| system | model | runtime | config | body | c | batch | req/s | p50 ms | p95 ms | p99 ms | errors "
              "| peak RSS MB | wrk CPU | server CPU | other CPU |", "|" + "---|" * 16]
    for r in doc["rows"]:
        lines.append(f"| {r['system']}{' ★' if r['best'] else ''} | {r['model']} | {r['runtime']} | {r['config']} | "
                     f"{r['body'] or '–'} | {r['concurrency'] or '–'} | {r['batch_size']} | "
                     f"{_cell(r['requests_per_s'])} | {_cell(r['p50_ms'])} | {_cell(r['p95_ms'])} | "
                     f"{_cell(r['p99_ms'])} | {r['errors']} | {_cell(r['peak_rss_mb'])} | "
                     f"{_pct(r['loadgen_cpu_share'])} | {_pct(r['server_cpu_share'])} | {_pct(r['other_cpu_share'])} |")
    if doc["failures"]:
        lines += ["", "Failures:", ""] + [f"- {f['system']} {f['config']}: {f['error'][:300]}" for f in doc["failures"]]
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
    ratios_text = "\n".join(f"  {k:<36} {_cell(v)}" for k, v in paths["doc"]["ratios"].items())
    failed = f"\n{len(results['failures'])} system(s) failed: see failures in {paths['json']}" \
        if results["failures"] else ""
    busy = contended(paths["doc"])
    if busy:
        failed += f"\nwarning: {busy} rows ran while other work used over 10% of the CPU; rerun on a quiet machine"
    return (f"bench done in {results['elapsed_s']:.0f} s: {len(results['rows'])} rows\n{ratios_text}\n"
            f"wrote {paths['json']}, {paths['png']}, {paths['markdown']}{failed}")
