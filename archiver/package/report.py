"""The build report: `model_store/build_report.json`, one entry per artifact, and its table."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

from archiver.tables import render

REPORT_FILE = "build_report.json"


@dataclass
class ArtifactReport:
    """One artifact's build: what it is, what was done to it, and whether it still computes the same."""

    name: str
    version: str
    format: str
    archive: Optional[str] = None
    model: str = ""
    artifact_id: str = "main"
    runtime: str = ""
    optimizations: list[str] = field(default_factory=list)
    size_bytes: Optional[int] = None
    parameters: Optional[int] = None
    sparsity: Optional[float] = None
    tolerance: Optional[float] = None
    max_abs_error: Optional[float] = None
    top1_agreement: Optional[float] = None
    accuracy: Optional[float] = None
    reference_accuracy: Optional[float] = None
    latency_ms_b1: Optional[float] = None
    latency_ms_b32: Optional[float] = None
    build_s: Optional[float] = None  # export (+ compile) time, without validation and packaging
    validated: bool = True
    passed: bool = False
    error: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    built_at: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.version}"


def load_report(model_store: str) -> dict:
    path = os.path.join(model_store, REPORT_FILE)
    if not os.path.isfile(path):
        return {"artifacts": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(model_store: str, entries: list[ArtifactReport]) -> str:
    """Merge `entries` into the report (replacing same name@version) and write it atomically."""
    os.makedirs(model_store, exist_ok=True)
    report = load_report(model_store)
    for entry in entries:
        report["artifacts"][entry.key] = asdict(entry)
    path = os.path.join(model_store, REPORT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    return path


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "err":
        return f"{value:.1e}"
    if kind == "ms":
        return f"{value:.2f}"
    if kind == "s":
        return f"{value:.1f}"
    if kind == "size":
        return f"{value / 1e6:.2f}MB" if value >= 1e5 else f"{value / 1e3:.1f}kB"
    return str(value)


def format_table(entries: list[ArtifactReport]) -> str:
    """A fixed-width table of the entries, one row each."""
    columns = [
        ("artifact", lambda e: e.key, None), ("format", lambda e: e.runtime or e.format, None),
        ("optimizations", lambda e: ",".join(e.optimizations) or "-", None),
        ("size", lambda e: e.size_bytes, "size"), ("params", lambda e: e.parameters, None),
        ("sparsity", lambda e: e.sparsity, "pct"), ("max_abs_err", lambda e: e.max_abs_error, "err"),
        ("top1_agree", lambda e: e.top1_agreement, "pct"), ("accuracy", lambda e: e.accuracy, "pct"),
        ("ms@b1", lambda e: e.latency_ms_b1, "ms"), ("ms@b32", lambda e: e.latency_ms_b32, "ms"),
        ("build_s", lambda e: e.build_s, "s"),
        ("result", lambda e: ("PASS" if e.validated else "BUILT-UNVALIDATED") if e.passed else "FAIL", None),
    ]
    rows = [[name for name, _, _ in columns]]
    for entry in entries:
        rows.append([_fmt(get(entry), kind) for _, get, kind in columns])
    lines = render(rows).splitlines()
    for entry in entries:
        if entry.error:
            lines.append(f"  {entry.key}: {entry.error}")
        for note in entry.notes:
            lines.append(f"  {entry.key}: {note}")
    return "\n".join(lines)
