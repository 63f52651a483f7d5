"""The outputs of `make reliability`: benchmarks/results/reliability.json and RELIABILITY.md (whole file)."""

from __future__ import annotations

import json
import os
from typing import Any

from benchmarks.sections import machine_info

HIDDEN_FIGURES = {"rows", "traceback", "text", "archives", "known_issue_cells"}


def machine() -> dict:
    info = machine_info(versions=True)
    info["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return info


def write(doc: dict, json_path: str, markdown_path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")
    with open(markdown_path, "w", encoding="utf-8") as f:
        f.write(markdown(doc))


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value).replace("|", "\\|").replace("\n", " ")


def summary_table(scenarios: list[dict]) -> list[str]:
    lines = ["| scenario | load (clients, request rate) | duration | requests | failures | recovery | result |",
             "|---|---|---:|---:|---:|---|---|"]
    for s in scenarios:
        duration = f"{s['duration_s']:g} s" if s.get("duration_s") is not None else "-"
        lines.append(f"| {_cell(s['title'])} | {_cell(s['load'])} | {duration} | {s['requests']} | {s['failures']} "
                     f"| {_cell(s.get('recovery'))} | {'PASS' if s['passed'] else '**FAIL**'} |")
    return lines


def _figure(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "`" + json.dumps(value, separators=(", ", ": "), default=str)[:600] + "`"
    return _cell(value)


def scenario_section(s: dict) -> list[str]:
    lines = [f"### {s['title']}: {'PASS' if s['passed'] else 'FAIL'}", ""]
    figures = {k: v for k, v in s.get("figures", {}).items() if k not in HIDDEN_FIGURES}
    for key, value in figures.items():
        lines.append(f"- {key}: {_figure(value)}")
    if figures:
        lines.append("")
    lines.append("<details><summary>checks</summary>")
    lines.append("")
    for c in s["checks"]:
        detail = f" ({_cell(c['detail'])[:300]})" if c["detail"] else ""
        lines.append(f"- {'✓' if c['ok'] else '✗'} {_cell(c['name'])}{detail}")
    lines += ["", "</details>", ""]
    return lines


def matrix_table(scenarios: list[dict]) -> list[str]:
    matrix = next((s for s in scenarios if s["key"] == "bad_input"), None)
    known = next((s for s in scenarios if s["key"] == "known_issues"), None)
    if matrix is None:
        return []
    cells: dict[tuple[str, str], str] = {}
    order: list[str] = []
    for row in matrix["figures"].get("rows", []):
        if row["case"] not in order:
            order.append(row["case"])
        cells[(row["case"], row["target"])] = ("" if row["ok"] else "✗ ") + row["got"].replace("HTTP ", "")
    for row in (known or {}).get("figures", {}).get("rows", []):
        if row["case"] not in order:
            order.append(row["case"])
        mark = "fixed" if row["fixed"] else f"**{row['id']}** ✗"
        cells[(row["case"], row["target"])] = f"{mark} {row['got'].replace('HTTP ', '')}"
    targets = ("tensor", "image", "router", "workflow")
    lines = ["| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
    for case in order:
        if not any((case, t) in cells for t in targets):
            continue
        lines.append(f"| {_cell(case)} | " + " | ".join(_cell(cells.get((case, t))) for t in targets) + " |")
    node = [r for r in (known or {}).get("figures", {}).get("rows", []) if r["target"] == "node"]
    for row in node:
        lines.append(f"\nAlso sent to a workflow node model directly (/predictions/ab__a): {row['case']} -> "
                     f"{row['got']} ({row['id']}).")
    return lines


def known_table(scenarios: list[dict], unit_issues: list[dict], swap_issues: list[dict]) -> list[str]:
    known = next((s for s in scenarios if s["key"] == "known_issues"), None)
    lines = ["| id | path | request | expected | got | time | serving again after | where | what |",
             "|---|---|---|---|---|---:|---:|---|---|"]
    rows = sorted((known or {}).get("figures", {}).get("rows", []), key=lambda r: int(r["id"][1:]))
    for r in rows:
        lines.append(f"| {r['id']}{' (fixed)' if r['fixed'] else ''} | {r['target']} | {_cell(r['case'])} | "
                     f"{r['expected']} | {_cell(r['got'])} | {r['latency_ms']} ms | "
                     f"{_cell(r['serving_again_after_s'])} s | {_cell(r['where'])} | {_cell(r['summary'])} |")
    swap = next((s.get("figures", {}) for s in scenarios if s["key"] == "swap"), {})
    registering = swap.get("latency_of_requests_sent_while_v2_registers")
    got = (f"{swap.get('stalled_over_1s')} answers over 1 s; max {registering['max_ms']} ms for those sent while "
           "v2.0 registered" if registering else "not measured")
    extra = [(r, f"| {r['id']} (fixed) | {_cell(r['target'])} | {_cell(r['case'])} | no stall | {got} | - | - | "
                 f"{_cell(r['where'])} | {_cell(r['summary'])} |") for r in swap_issues]
    extra += [(r, f"| {r['id']} (fixed) | {_cell(r['target'])} | {_cell(r['case'])} | 4xx | unit test | - "
                  f"| - | {_cell(r['where'])} | {_cell(r['summary'])} |") for r in unit_issues]
    ordered = sorted(list(zip(rows, lines[2:])) + extra, key=lambda pair: int(pair[0]["id"][1:]))
    lines = lines[:2] + [line for _, line in ordered]
    return lines


METHOD = [
    "- Deployment: archives built by the archiver into a work folder: the digits CNN (seeded weights) as v1.0 and "
    "v2.0, 2 workers, batch 8 / 5 ms, the spec's default 8 MiB body limit; `slow`, a state_dict model that sleeps "
    "50 ms per batch (1 worker, batch 1, job queue 4); `image` (image front end); the A/B router archive `ab` and "
    "its `.war` over digits v1.0/v2.0. One TorchServe serves them all (token auth on, model API on, free loopback "
    "ports); the security scenario also starts the config `tspack config` writes by default (model API off).",
    "- Clients are Python threads, each with its own keep-alive connection and the inference key, bounded by a "
    "request count and a deadline. Latencies measured at the client include 2 shared cores.",
    "- Swap: 16 clients back to back on /predictions/digits; `archiver.operate.swap.swap_version(client, 'digits', "
    "'digits_v2.0.mar', '2.0', workers=2, drain_s=2)` after 5 s. An answer that finished before set-default was "
    "called must be 1.0, one that started after the swap returned must be 2.0, the others may be either.",
    "- Crash: 8 clients back to back; SIGKILL to one of the 2 digits workers (its PID from the management API, "
    "checked to be a model_service_worker.py child of the server). Worker back: describe shows 2 READY workers "
    "without the victim. Throughput back: the first 1-s window after the kill with >= 80% of the answers/s of the "
    "4 s before it; both workers serving: the same, from the worker's return.",
    "- Overload: 128 clients back to back (at most 40 requests each, 15 s) against `slow`; the 503 latency is "
    "TorchServe's own (its access log) and the client's; the server tree's RSS (psutil) is sampled every 0.25 s.",
    "- Soak: 4 clients paced at 10 requests/s each; each digits worker's RSS sampled every second; growth = mean of "
    "the last 5 samples over the mean of the first 5 after the warm-up (30 s; 15 s with QUICK=1).",
    "- Bad input: every case once on every path, one at a time; afterwards every worker must be READY with the same "
    "PID and a good request must answer on every path.",
    "- Monitoring: the metrics port is scraped before and after known traffic (7 good, 3 malformed, one at a "
    "time so each is its own batch); the deltas must reach the expected values and still equal them 1.5 s later.",
]


def _by_key(scenarios: list[dict]) -> dict[str, dict]:
    return {s["key"]: s.get("figures", {}) for s in scenarios}


def observations(scenarios: list[dict]) -> list[str]:
    f = _by_key(scenarios)
    notes = []
    if f.get("swap", {}).get("statuses"):
        swap = f["swap"]
        registering = swap.get("latency_of_requests_sent_while_v2_registers") or {}
        notes.append(f"- Swap: every answer 2xx ({swap['statuses']}); the swap took {swap['swap_s']} s, most of it "
                     f"starting v2.0's two workers. Latency p99 {swap['p99_ms']} ms overall; "
                     f"{swap.get('stalled_over_1s')} answers over 1 s (max {registering.get('max_ms')} ms for "
                     "those sent while v2.0 registered). The swap registers asynchronously and polls for READY "
                     "workers: a synchronous register holds one of TorchServe's Netty I/O threads and stalled the "
                     "connections it serves for 6-10 s (K11, fixed).")
    if f.get("crash", {}).get("worker_back_s") is not None:
        crash = f["crash"]
        notes.append(f"- Crash: {crash['failed_requests']} requests failed, all {crash['failed_statuses']} "
                     "'Worker died.' from TorchServe, i.e. the killed worker's in-flight batch (at most 8). The "
                     f"other worker kept serving ({crash['lowest_1s_rps_after_kill']} answers/s at the lowest vs "
                     f"{crash['baseline_rps']} before); TorchServe restarted the worker after "
                     f"{crash['worker_back_s']} s (a 1 s back-off, then Python, torch and the model load).")
    if f.get("overload", {}).get("latency_503_in_torchserve_ms"):
        over = f["overload"]
        notes.append(f"- Overload: TorchServe rejects at once (503 p99 {over['latency_503_in_torchserve_ms']['p99']} "
                     f"ms in its access log); at the client the 503 p99 is {over['latency_503_at_client']['p99_ms']}"
                     " ms because 128 Python threads share 2 cores with the server. Server tree RSS "
                     f"{over['tree_rss_before_mb']} -> peak {over['tree_rss_peak_mb']} MB.")
    if f.get("soak", {}).get("workers"):
        soak = f["soak"]
        growth = ", ".join(f"{100 * (w['growth'] or 0):+.2f}%" for w in soak["workers"])
        frontend = soak.get("frontend") or {}
        notes.append(f"- Soak: worker RSS growth after warm-up {growth}. The JVM frontend (not asserted) went "
                     f"{frontend.get('after_warmup_mb')} -> {frontend.get('end_mb')} MB: its heap grows until the "
                     "collector settles; a longer soak would tell a leak from that.")
    return notes


def markdown(doc: dict) -> str:
    m = doc["machine"]
    scenarios = doc["scenarios"]
    verdict = "every scenario passed" if doc["passed"] else \
        f"{sum(1 for s in scenarios if not s['passed'])} of {len(scenarios)} scenarios FAILED"
    lines = [
        "# Reliability, security and monitoring",
        "",
        "GitHub issue 8: zero-downtime swaps, worker crashes, overload, a soak, bad input, security and monitoring,",
        "each proved against a real TorchServe 0.12 on loopback. Regenerated by `make reliability` "
        "(`benchmarks/reliability/`),",
        "which also writes `benchmarks/results/reliability.json`; `make reliability QUICK=1` shortens the soak to "
        "60 s. The CI suite",
        "(`tests/integration/test_reliability.py`, part of `make test`) runs the same scenario functions in a "
        "shortened form,",
        "asserting recovery itself rather than its timing.",
        "",
        f"- command: `{doc['command']}`",
        f"- date: {doc['date']}; {doc['total_s']:g} s in all, of which {doc['setup_s']:g} s to build the archives "
        "and start TorchServe",
        f"- machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; {m.get('os')}; Python "
        f"{m.get('python')}, torch {m.get('torch')}, TorchServe {m.get('torchserve')}, {m.get('java')}; load average "
        f"at the end {m.get('load_average_at_end')}",
        "- other people's jobs share this 2-core machine, so latencies and rates are noisy; only recovery times "
        "and fast 503s have bounds, and those are generous",
        f"- verdict: {verdict}",
        "",
        "## Summary",
        "",
        *summary_table(scenarios),
        "",
        "Failures: non-2xx answers and requests without an answer (overload: anything but 200 or 503; bad input: "
        "cells whose answer differs from the expected one).",
        "",
        *observations(scenarios),
        "",
        "## Method",
        "",
        *METHOD,
        "",
        "## Bad-input matrix",
        "",
        "Each cell: the HTTP status, then the JSON body's `status` and `type`. The workflow (`/wfpredict/ab`) always "
        "answers HTTP 200",
        "(TorchServe 0.12's workflow executor), so there the 4xx arrives as the body's `status` field.",
        "",
        *matrix_table(scenarios),
        "",
        "## Issues this suite found, all fixed",
        "",
        "Found by the matrix, the probes and the fuzz tests while this suite was written; each was a bug in the "
        "pack's own code and is fixed. The rows replay them as regression probes (`where`/`what` describe the bug "
        "as found).",
        "",
        *known_table(scenarios, doc.get("unit_issues", []), doc.get("swap_issues", [])),
        "",
        "## Scenarios",
        "",
    ]
    for s in scenarios:
        lines += scenario_section(s)
    lines += [
        "## Covered elsewhere",
        "",
        "- Handlers refuse weights whose SHA-256 differs from the build's: "
        "`tests/integration/test_end_to_end.py::test_worker_that_dies_at_start_fails_fast_with_its_error`.",
        "- Static security checks (production config, no pickled modules, `weights_only=True`): "
        "`tests/unit/test_security.py`.",
        "- Property-based fuzzing of every decoder (hypothesis): `tests/unit/test_fuzz_decoders.py`.",
        "",
    ]
    return "\n".join(lines)
