"""The tuning report, in the manner of Triton's Model Analyzer: every configuration tried as a table, throughput
against p99 as a PNG with the Pareto front marked, and the winner under the latency SLO.

Files: report.md (the table and the verdict), report.json (the same as data), pareto.png.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Optional

from archiver.operate.tune.measure import Trial
from archiver.operate.tune.search import TuneSettings, meets_slo, pareto
from archiver.tables import render

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
PLOT_PNG = "pareto.png"


def table_rows(trials: list[Trial], settings: TuneSettings, winner: Optional[Trial]) -> list[list[str]]:
    """Header + one row per trial: the configuration, then requests/s and p99 at each concurrency."""
    front = {t.number for t in pareto(trials)}
    header = ["#", "runtime", "batching", "batch", "workers x threads"]
    for c in settings.concurrency:
        header += [f"req/s c={c}", f"p99 ms c={c}"]
    header += ["SLO", "note"]
    rows = [header]
    for t in trials:
        cfg = t.config
        batching = "none" if cfg.batch_size == 1 else (
            "zero_wait" if cfg.batching == "zero_wait" else f"delay {cfg.delay_ms} ms")
        row = [str(t.number), cfg.runtime.label, batching, str(cfg.batch_size), f"{cfg.workers} x {cfg.threads}"]
        for c in settings.concurrency:
            level = t.level(c)
            row += [f"{level.requests_per_s:.0f}" if level else "-",
                    f"{level.p99_ms:.1f}" if level and level.p99_ms is not None else "-"]
        notes = (["WINNER"] if winner is t else []) + (["pareto"] if t.number in front else [])
        notes += [t.error] if t.error else []
        notes += [f"{sum(lv.errors for lv in t.levels)} errors"] if any(lv.errors for lv in t.levels) else []
        row += ["met" if meets_slo(t, settings.slo_p99_ms) else "missed", ", ".join(notes)]
        rows.append(row)
    return rows


def verdict(winner: Optional[Trial], settings: TuneSettings) -> str:
    top = max(settings.concurrency)
    if winner is None:
        return (f"No configuration kept p99 within {settings.slo_p99_ms:g} ms at every concurrency without errors; "
                f"nothing was written. Raise --slo-p99-ms, lower the top concurrency, or add cores.")
    level = winner.levels[-1]
    said = (f"Winner under the p99 SLO of {settings.slo_p99_ms:g} ms: #{winner.number}, "
            f"{winner.config.describe()}: {level.requests_per_s:.0f} requests/s at {top} clients, "
            f"p99 {level.p99_ms:.1f} ms.")
    if winner.config.batching == "zero_wait" and winner.config.batch_size > 1:
        said += (" Zero-wait is opt-in: TorchServe 0.12's asynchronous frontend has lost workers under load "
                 "(README, \"Zero-wait batching\"); watch the READY worker count.")
    return said


def write(folder: str, trials: list[Trial], settings: TuneSettings, winner: Optional[Trial],
          cores: int, tuned_spec: Optional[str]) -> dict[str, str]:
    """Write the report files into `folder`; returns {kind: path}."""
    os.makedirs(folder, exist_ok=True)
    rows = table_rows(trials, settings, winner)
    paths = {"markdown": os.path.join(folder, REPORT_MD), "json": os.path.join(folder, REPORT_JSON),
             "plot": os.path.join(folder, PLOT_PNG)}
    lines = [f"# tspack tune: {settings.model}", "",
             f"{len(trials)} configurations on {cores} cores, {settings.duration_s:g} s per concurrency "
             f"({', '.join(map(str, settings.concurrency))} clients). A configuration meets the SLO when its p99 "
             f"stays within {settings.slo_p99_ms:g} ms at every concurrency without errors; the winner is the one "
             f"that meets it with the most requests/s at {max(settings.concurrency)} clients. Pareto: no other "
             "configuration has both more requests/s and a lower p99 at that concurrency.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows[1:]]
    lines += ["", verdict(winner, settings)]
    if tuned_spec:
        lines += ["", f"Tuned spec: `{tuned_spec}`. Rebuild with it (`tspack build --spec ...`) and deploy the "
                      f"winner's archive ({os.path.basename(winner.config.runtime.archive)})."]
    lines += ["", f"![throughput against p99]({PLOT_PNG})", ""]
    with open(paths["markdown"], "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"settings": asdict(settings), "cores": cores, "tuned_spec": tuned_spec,
                   "winner": winner.number if winner else None,
                   "pareto": [t.number for t in pareto(trials)],
                   "trials": [trial_json(t, settings) for t in trials]}, f, indent=2)
    plot(trials, settings, winner, paths["plot"])
    return paths


def trial_json(trial: Trial, settings: TuneSettings) -> dict:
    cfg = trial.config
    return {"number": trial.number, "runtime": cfg.runtime.label, "archive": cfg.runtime.archive,
            "batching": cfg.batching, "batch_size": cfg.batch_size, "delay_ms": cfg.delay_ms,
            "workers": cfg.workers, "threads": cfg.threads, "seconds": round(trial.seconds, 1),
            "error": trial.error, "meets_slo": meets_slo(trial, settings.slo_p99_ms),
            "levels": [asdict(level) for level in trial.levels]}


def plot(trials: list[Trial], settings: TuneSettings, winner: Optional[Trial], path: str) -> str:
    """requests/s against p99 at the top concurrency, one point per served trial; the Pareto front joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    served = [t for t in trials if t.error is None and t.levels and t.levels[-1].p99_ms is not None]
    figure = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    top = max(settings.concurrency)
    for t in served:
        rps, p99 = t.levels[-1].requests_per_s, t.levels[-1].p99_ms
        axes.scatter([p99], [rps], color="tab:blue" if meets_slo(t, settings.slo_p99_ms) else "tab:gray", s=30)
        axes.annotate(f"#{t.number}", (p99, rps), textcoords="offset points", xytext=(4, 4), fontsize=8)
    front = sorted(pareto(trials), key=lambda t: t.levels[-1].p99_ms)
    if front:
        axes.plot([t.levels[-1].p99_ms for t in front], [t.levels[-1].requests_per_s for t in front],
                  color="tab:orange", marker="o", label="Pareto front")
    if winner is not None:
        axes.scatter([winner.levels[-1].p99_ms], [winner.levels[-1].requests_per_s], s=160, facecolors="none",
                     edgecolors="tab:red", linewidths=2, label=f"winner #{winner.number}")
    axes.axvline(settings.slo_p99_ms, color="tab:red", linestyle="--", linewidth=1,
                 label=f"p99 SLO {settings.slo_p99_ms:g} ms")
    axes.set_xlabel(f"p99 latency at {top} clients (ms)")
    axes.set_ylabel(f"requests/s at {top} clients")
    axes.set_title(f"tspack tune: {settings.model} (blue: meets the SLO at every concurrency)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return path


def text_table(trials: list[Trial], settings: TuneSettings, winner: Optional[Trial]) -> str:
    return render(table_rows(trials, settings, winner))
