"""`tspack tune`'s search: coordinate descent over the serving space, within a time budget.

Not a grid: from the spec's own settings it tries every value of one dimension (the runtime, the batching, the
batch size, the worker/thread layout) with the others held at the best so far, moves to the best, and repeats
until a full pass finds nothing better or the budget is spent. A configuration is compared on the SLO first:
one that keeps p99 within it at every concurrency (and answers every request) beats one that does not; among
those, the higher requests/s at the highest concurrency wins; among the others, the lower worst p99.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Optional

from archiver.operate.tune.measure import Trial
from archiver.operate.tune.space import BATCH_SIZES, Config, Runtime, batchings, worker_layouts
from handlers.spec import require


@dataclass(frozen=True)
class TuneSettings:
    """What `tspack tune` measures and how long it may take. `cores`: None for the cores this process may use."""

    spec_path: str
    model: str
    version: Optional[str] = None
    slo_p99_ms: float = 50.0
    concurrency: tuple[int, ...] = (1, 8, 32)
    budget_s: float = 300.0
    duration_s: float = 5.0
    max_trials: Optional[int] = None
    write: bool = False
    report_dir: Optional[str] = None
    cores: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        require(self.slo_p99_ms > 0, f"--slo-p99-ms: must be > 0, got {self.slo_p99_ms}")
        require(len(self.concurrency) >= 1 and all(c >= 1 for c in self.concurrency),
                f"--concurrency: a comma-separated list of client counts >= 1, got {list(self.concurrency)}")
        require(self.budget_s > 0, f"--budget-s: must be > 0, got {self.budget_s}")
        require(self.duration_s >= 1, f"--duration-s: wrk measures whole seconds; give >= 1, got {self.duration_s}")
        require(self.max_trials is None or self.max_trials >= 1, "--max-trials: must be >= 1")
        require(self.cores is None or self.cores >= 1, "--cores: must be >= 1")
        object.__setattr__(self, "concurrency", tuple(sorted(set(self.concurrency))))  # the winner's is the last


def meets_slo(trial: Trial, slo_ms: float) -> bool:
    return (trial.error is None and bool(trial.levels)
            and all(lv.errors == 0 and lv.p99_ms is not None and lv.p99_ms <= slo_ms for lv in trial.levels))


def score(trial: Trial, slo_ms: float) -> tuple[int, float]:
    """Higher is better: (2, requests/s at the top concurrency) under the SLO, (1, -worst p99) over it, (0, 0)
    when it could not be served."""
    if trial.error is not None or not trial.levels:
        return (0, 0.0)
    if meets_slo(trial, slo_ms):
        return (2, trial.levels[-1].requests_per_s)
    return (1, -max(lv.p99_ms if lv.p99_ms is not None else float("inf") for lv in trial.levels))


def dimensions(runtimes: list[Runtime], cores: int) -> list[Callable[[Config], list[Config]]]:
    """Each dimension: the configurations that differ from `config` in it alone (thread counts kept within
    `cores`; an artifact compiled for N threads runs with N)."""

    def runtime(config: Config) -> list[Config]:
        out = []
        for r in runtimes:
            threads = r.compiled_threads or config.threads
            workers = config.workers if config.workers * threads <= cores else max(1, cores // threads)
            out.append(replace(config, runtime=r, workers=workers, threads=min(threads, cores)))
        return out

    def batching(config: Config) -> list[Config]:
        size = config.batch_size if config.batch_size > 1 else 8
        return [replace(config, batching=m, batch_size=b, delay_ms=d) for m, b, d in batchings(size)]

    def batch_size(config: Config) -> list[Config]:
        return [replace(config, batch_size=b) for b in BATCH_SIZES] if config.batch_size > 1 else []

    def layout(config: Config) -> list[Config]:
        return [replace(config, workers=w, threads=t)
                for w, t in worker_layouts(cores, config.runtime.compiled_threads)]

    return [runtime, batching, batch_size, layout]


@dataclass
class Search:
    """Coordinate descent from `start`. `evaluate(number, config) -> Trial` serves and measures one configuration;
    `on_trial` sees each trial (the progress bar). The first trial always runs; later ones only while the time
    spent plus the slowest trial so far fits `budget_s`."""

    evaluate: Callable[[int, Config], Trial]
    slo_ms: float
    budget_s: float
    max_trials: Optional[int] = None
    on_trial: Callable[[Trial], None] = lambda trial: None
    clock: Callable[[], float] = time.monotonic
    trials: list[Trial] = field(default_factory=list)
    _seen: dict = field(default_factory=dict)

    def run(self, start: Config, moves: list[Callable[[Config], list[Config]]]) -> list[Trial]:
        self._started = self.clock()
        best = self._try(start)
        improved = True
        while improved and not self.spent():
            improved = False
            for neighbours in moves:
                for candidate in neighbours(best.config):
                    if candidate.key in self._seen:
                        continue
                    if self.spent():
                        return self.trials
                    trial = self._try(candidate)
                    if score(trial, self.slo_ms) > score(best, self.slo_ms):
                        best, improved = trial, True
        return self.trials

    def spent(self) -> bool:
        if self.max_trials is not None and len(self.trials) >= self.max_trials:
            return True
        slowest = max((t.seconds for t in self.trials), default=0.0)
        return self.clock() - self._started + slowest > self.budget_s

    def _try(self, config: Config) -> Trial:
        trial = self.evaluate(len(self.trials) + 1, config)
        self._seen[config.key] = trial
        self.trials.append(trial)
        self.on_trial(trial)
        return trial


def winner(trials: list[Trial], slo_ms: float) -> Optional[Trial]:
    """The best trial that met the SLO, or None."""
    met = [t for t in trials if meets_slo(t, slo_ms)]
    return max(met, key=lambda t: score(t, slo_ms)) if met else None


def pareto(trials: list[Trial]) -> list[Trial]:
    """The trials no other beats on both requests/s and p99 at the top concurrency (served ones only)."""
    served = [t for t in trials if t.error is None and t.levels and t.levels[-1].p99_ms is not None]

    def beats(a: Trial, b: Trial) -> bool:
        (ra, pa), (rb, pb) = _point(a), _point(b)
        return ra >= rb and pa <= pb and (ra > rb or pa < pb)

    return [t for t in served if not any(beats(o, t) for o in served if o is not t)]


def _point(trial: Trial) -> tuple[float, float]:
    top = trial.levels[-1]
    return top.requests_per_s, top.p99_ms


def default_report_dir(model_store: str, model: str, version: str) -> str:
    return os.path.join(model_store, "tune", f"{model}_v{version}")
