"""The headline figures of `make bench`, each the median over interleaved rounds, from undisturbed rows only.

Every figure is declared once in RATIOS: which row of a round is the numerator, which the denominator (None for a
plain value such as a p50), and its goal. For each round of its comparison the figure takes the two rows of that
round; the figure is the median of the per-round values, with min, max and the number of rounds. A round whose
row was measured while other work used over 10% of the CPU (and stayed so after its reruns) makes the figure
null, with the reason naming the row.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Pick:
    """Which row of a round: the one matching these fields (the best by `metric` when several do)."""

    system: str
    model: str
    runtime: str = "torchscript"
    body: Optional[str] = "json"
    concurrency: Optional[int] = 32
    metric: str = "requests_per_s"
    choose: str = "max"  # among several matching rows: "max" or "min" of the metric
    where: Optional[Callable[[dict], bool]] = None

    def matches(self, row: dict) -> bool:
        return (row["system"] == self.system and row["model"] == self.model and row["runtime"] == self.runtime
                and row.get("body") == self.body and row.get("concurrency") == self.concurrency
                and (self.where is None or self.where(row)))

    def choose_from(self, rows: list[dict]) -> Optional[dict]:
        found = [r for r in rows if self.matches(r) and r.get(self.metric) is not None]
        if not found:
            return None
        pick = max if self.choose == "max" else min
        return pick(found, key=lambda r: r[self.metric])


@dataclass(frozen=True)
class Figure:
    key: str
    top: Pick
    bottom: Optional[Pick] = None  # None: the figure is the top row's metric itself
    phase: str = "rounds"  # "rounds": per round of the comparison; "sweep": the configuration sweep (one round)
    goal: str = ""
    about: str = ""


def _light(system: str, **kw) -> Pick:
    return Pick(system, "light", **kw)


def _heavy(system: str, **kw) -> Pick:
    return Pick(system, "heavy", **kw)


def _batching(row: dict) -> bool:
    return row["batch_size"] > 1


TUNED = " (tspack tune)"  # the config label of the deployment `tspack tune` chose, in the light rounds
DEFAULT = " (default)"  # the config label of the deployment `tspack build` writes without tuning, in the light rounds


def _tuned(row: dict) -> bool:
    return row["config"].endswith(TUNED)


def _is_default(row: dict) -> bool:
    return row["config"].endswith(DEFAULT)


def _zero_wait(row: dict) -> bool:
    return "zero-wait" in row["config"] and not _tuned(row) and not _is_default(row)


def _default(system: str, **kw) -> Pick:
    """The light model's default deployment: what `tspack build` writes without tuning."""
    return Pick(system, "light", where=_is_default, **kw)


def _batching(row: dict) -> bool:
    return row["batch_size"] > 1


def _unbatched(row: dict) -> bool:
    return row["batch_size"] == 1


LIMIT_MODEL = {"body": None, "concurrency": None}  # the limit of the model alone
RATIOS: tuple[Figure, ...] = (
    # light model (MNIST CNN), JSON bodies, c=32 unless named; tspack is the default deployment
    Figure("tspack_over_fastapi_light", _default("tspack"), _light("fastapi"), goal=">= 1.5",
           about="req/s, tspack's default deployment vs FastAPI's best configuration, both on TorchScript"),
    Figure("tspack_over_litserve_light", _default("tspack"), _light("litserve"), goal=">= 1.5"),
    Figure("tspack_over_naive_light", _default("tspack"), _light("naive-torchserve"), goal=">= 15"),
    Figure("p99_over_fastapi_light", _default("tspack", metric="p99_ms"), _light("fastapi", metric="p99_ms"),
           goal="<= 1.0"),
    Figure("zero_wait_over_default_light", _light("tspack", where=_zero_wait), _default("tspack"),
           about="issue 14: zero-wait batching vs the default (a fixed delay), same rounds"),
    Figure("tuned_over_default_light", _light("tspack", where=_tuned), _default("tspack"),
           about="issue 14: req/s of the deployment `tspack tune` chose (SLO p99 50 ms, clients 1 and 32) vs the "
                 "default, same rounds"),
    Figure("p99_ms_light_tuned", _light("tspack", metric="p99_ms", where=_tuned), about="ms, the tuned deployment"),
    Figure("p99_ms_light_default", _default("tspack", metric="p99_ms"), about="ms, the default deployment"),
    Figure("c1_p50_ms_light_tuned", _light("tspack", metric="p50_ms", concurrency=1, where=_tuned),
           about="ms, the tuned deployment at c=1"),
    Figure("e2e_over_limit_light", _default("tspack"), _light("limit", **LIMIT_MODEL),
           about="vs the model alone in-process, best layout"),
    Figure("e2e_over_limit_decode_light", _default("tspack"), _light("limit", concurrency=None),
           about="vs decode + model in-process (the handler's own path on the same JSON body), best layout"),
    Figure("c1_p50_ms_light", _default("tspack", metric="p50_ms", concurrency=1), goal="<= 2.5",
           about="ms, the default deployment at c=1"),
    Figure("c1_p50_ms_light_zero_wait", _light("tspack", metric="p50_ms", concurrency=1, where=_zero_wait),
           about="ms, zero-wait batching at c=1"),
    Figure("c1_p50_ms_light_min", _light("tspack", metric="p50_ms", concurrency=1, choose="min", where=_batching),
           phase="sweep", about="ms, the lowest c=1 p50 of any batching configuration"),
    Figure("c1_p50_ms_light_unbatched", _light("tspack", metric="p50_ms", concurrency=1, choose="min",
                                               where=_unbatched), phase="sweep", about="ms, batch 1, no wait"),
    Figure("aoti_over_torchscript_light", _default("tspack", runtime="aoti"), _default("tspack"), goal=">= 1.2",
           about="issue 12: the same deployment with format aoti vs torchscript"),
    Figure("aoti_over_fastapi_aoti_light", _default("tspack", runtime="aoti"), _light("fastapi", runtime="aoti"),
           about="issue 14: the default deployment as aoti vs FastAPI serving the same compiled package"),
    Figure("oip_binary_over_json_light", _light("tspack", body="oip-binary"), _light("tspack", body="oip-json"),
           goal=">= 1.2", about="issue 15: OIP v2 binary tensor requests vs OIP JSON requests"),
    Figure("oip_binary_over_npy_light", _light("tspack", body="oip-binary"), _light("tspack", body="npy")),
    Figure("worker_cold_start_s_aoti", _light("tspack", runtime="aoti", body=None, concurrency=None,
                                              metric="cold_start_s"), phase="cold", goal="<= 5",
           about="s, register to READY, one worker"),
    Figure("worker_cold_start_s_torchscript", _light("tspack", body=None, concurrency=None, metric="cold_start_s"),
           phase="cold"),
    Figure("worker_peak_rss_mb_aoti", _light("tspack", runtime="aoti", body=None, concurrency=None,
                                             metric="peak_rss_mb"), phase="cold", about="MB, the worker process"),
    Figure("worker_peak_rss_mb_torchscript", _light("tspack", body=None, concurrency=None, metric="peak_rss_mb"),
           phase="cold"),
    # heavy model (ResNet-18, fp32 TorchScript), c=32
    Figure("tspack_over_fastapi_heavy", _heavy("tspack", body="npy"), _heavy("fastapi", body="npy"),
           goal=">= 1.0", about=".npy bodies, best configurations"),
    Figure("tspack_over_fastapi_heavy_json", _heavy("tspack"), _heavy("fastapi")),
    Figure("tspack_over_litserve_heavy", _heavy("tspack"), _heavy("litserve"),
           about="JSON bodies (LitServe parses every body as JSON)"),
    Figure("tspack_over_naive_heavy", _heavy("tspack"), _heavy("naive-torchserve"), about="JSON bodies"),
    # Issue 19's true limit is measured "on the same body decoding where the row says so": for a row of .npy bodies,
    # decode + model. The model alone, with no body to read, bounds no server that receives bytes; it stays beside.
    Figure("e2e_over_limit_heavy", _heavy("tspack", body="npy"), _heavy("limit", **LIMIT_MODEL),
           about="vs the model alone in-process (no body to decode), best layout and batch"),
    Figure("e2e_over_limit_decode_heavy", _heavy("tspack", body="npy"), _heavy("limit", body="npy",
                                                                                concurrency=None), goal=">= 0.90",
           about="vs the true limit: decode + model in-process on the same .npy body, best layout and batch"),
)
RATIO_KEYS = tuple(f.key for f in RATIOS) + ("e2e_over_limit_heavy_best_runtime", "heavy_best_runtime",
                                             "cold_start_s", "cold_start_light_s")


def _describe(row: dict) -> str:
    body = f" {row['body']}" if row.get("body") else ""
    concurrency = f" c={row['concurrency']}" if row.get("concurrency") else ""
    return f"{row['system']} {row['model']} {row['runtime']}{body}{concurrency} ({row['config']})"


def _groups(rows: list[dict], figure: Figure) -> list[list[dict]]:
    """The rows of each round of the figure's phase, in round order."""
    rounds: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        if row.get("phase") == figure.phase and row["model"] == figure.top.model:
            rounds[(row.get("comparison"), row.get("round") or 1)].append(row)
    return [rounds[key] for key in sorted(rounds, key=lambda k: (str(k[0]), k[1]))]


def figure_of(rows: list[dict], figure: Figure) -> dict:
    """{value, min, max, rounds, per_round, null_reason, goal, about} of one figure."""
    per_round, reasons = [], []
    for group in _groups(rows, figure):
        top = figure.top.choose_from(group)
        bottom = figure.bottom.choose_from(group) if figure.bottom else None
        if top is None or (figure.bottom and bottom is None):
            continue  # this round did not measure both sides (e.g. a system left out with --only)
        used = [top] + ([bottom] if bottom else [])
        busy = [r for r in used if r.get("disturbed")]
        if busy:
            per_round.append(None)
            reasons += [f"round {r.get('round') or 1}: {_describe(r)} was measured while other work used "
                        f"{r['other_cpu_share']:.0%} of the CPU ({r.get('attempts', 1)} tries)" for r in busy]
            continue
        denominator = bottom[figure.bottom.metric] if bottom else 1.0
        per_round.append(top[figure.top.metric] / denominator if denominator else None)
    return summarize(per_round, reasons, figure.goal, figure.about)


def summarize(per_round: list[Optional[float]], reasons: list[str], goal: str = "", about: str = "") -> dict:
    """Median and spread of per-round values; null when a round was disturbed or nothing was measured."""
    clean = [v for v in per_round if v is not None]
    reason = "; ".join(reasons) if reasons else None
    if not per_round:
        reason = "not measured in this run"
    elif not reasons and len(clean) < len(per_round):
        reason = "a round had no answer to divide by"
    value = round(float(np.median(clean)), 3) if clean and reason is None else None
    return {"value": value, "min": round(min(clean), 3) if clean else None,
            "max": round(max(clean), 3) if clean else None, "rounds": len(per_round),
            "per_round": [None if v is None else round(v, 3) for v in per_round], "null_reason": reason,
            "goal": goal, "about": about}


def best_runtime_heavy(rows: list[dict]) -> tuple[dict, dict]:
    """The heavy model's fastest runtime served with .npy bodies at c=32 (the sweep), over that runtime's limit."""
    served = [r for r in rows if r.get("phase") == "sweep" and r["system"] == "tspack" and r["model"] == "heavy"
              and r.get("body") == "npy" and r.get("concurrency") == 32]
    if not served:
        missing = summarize([], [])
        return missing, {**missing, "value": None}
    best = max(served, key=lambda r: r["requests_per_s"])
    figure = Figure("e2e_over_limit_heavy_best_runtime", _heavy("tspack", runtime=best["runtime"], body="npy"),
                    _heavy("limit", runtime=best["runtime"], **LIMIT_MODEL), phase="sweep",
                    about=f"{best['runtime']}, .npy, vs its own limit (model alone)")
    name = {"value": best["runtime"], "rounds": 1, "null_reason": None, "about": "the fastest heavy runtime served"}
    return figure_of(rows, figure), name


def compute(rows: list[dict], cold_start_s: Optional[float] = None,
            cold_start_light_s: Optional[float] = None) -> dict:
    """Every figure of RATIOS, the heavy best runtime, and the server cold starts (one measurement each)."""
    out = {figure.key: figure_of(rows, figure) for figure in RATIOS}
    out["e2e_over_limit_heavy_best_runtime"], out["heavy_best_runtime"] = best_runtime_heavy(rows)
    for key, value, goal in (("cold_start_s", cold_start_s, "<= 10"), ("cold_start_light_s", cold_start_light_s, "")):
        out[key] = summarize([value] if value is not None else [], [], goal, "s, server start to the first 200")
    return out
