"""One scenario's result row (checks, figures, pass/fail) and the latency figures every scenario reports."""

from __future__ import annotations

import time
from typing import Any, Optional

from benchmarks.reliability.load import Outcome, percentile


class Result:
    """One scenario's row: load, duration, requests, failures, recovery, pass/fail, and the checks behind it."""

    def __init__(self, key: str, title: str, load: str = ""):
        self.started = time.monotonic()
        self.data: dict[str, Any] = {"key": key, "title": title, "load": load, "duration_s": None, "requests": 0,
                                     "failures": 0, "recovery": None, "passed": False, "checks": [], "figures": {}}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def figures(self) -> dict:
        return self.data["figures"]

    def check(self, name: str, ok: Any, detail: Any = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": str(detail)})
        return bool(ok)

    def done(self) -> dict:
        if self.data["duration_s"] is None:
            self.data["duration_s"] = round(time.monotonic() - self.started, 1)
        checks = self.data["checks"]
        self.data["passed"] = bool(checks) and all(c["ok"] for c in checks)
        return self.data


def failed_checks(result: dict) -> list[str]:
    return [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["ok"]]


def ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds * 1000.0, 1)


def latency_figures(outcomes: list[Outcome]) -> dict:
    values = [o.latency_s for o in outcomes]
    return {"p50_ms": ms(percentile(values, 50)), "p99_ms": ms(percentile(values, 99)),
            "max_ms": ms(max(values, default=None))}
