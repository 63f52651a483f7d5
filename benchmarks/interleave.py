"""Interleaved in-process timing for a shared, noisy machine: A, B, A, B ... rounds, ratios per round.

Other work on the host changes speed from minute to minute; two systems timed one after the other see different
machines. Timed in alternating turns (the order reversed every round), each round's ratio compares the systems
under nearly the same load, and the median of those ratios is the figure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Run = Callable[[dict[str, np.ndarray]], object]


def load_average() -> tuple[float, float, float]:
    """The host's 1, 5 and 15 minute load averages (0s where the OS has none)."""
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except OSError:
        return (0.0, 0.0, 0.0)


@dataclass
class Quiet:
    """Waits for the 1-minute load average to fall under `max_load`, within a total budget of `budget_s`."""

    max_load: float = 3.0
    budget_s: float = 600.0
    poll_s: float = 15.0
    waited_s: float = 0.0

    def wait(self, say: Callable[[str], None] = print) -> tuple[float, float, float]:
        """Returns the load average when measuring starts (over max_load if the budget ran out)."""
        load = load_average()
        while load[0] > self.max_load and self.waited_s < self.budget_s:
            say(f"load average {load[0]:.2f} > {self.max_load:g}: waiting ({self.waited_s:.0f}/{self.budget_s:.0f} s)")
            time.sleep(self.poll_s)
            self.waited_s += self.poll_s
            load = load_average()
        return load


@dataclass
class System:
    label: str
    run: Run
    rows: dict[str, np.ndarray]
    before: Callable[[], None] = lambda: None  # e.g. torch.set_num_threads: runtimes share the process's pool
    turns_ms: list[float] = field(default_factory=list)  # per round: median ms per call


def batch_of(inputs: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """`batch` rows of every input, repeating the inputs when they hold fewer."""
    out = {}
    for name, array in inputs.items():
        out[name] = np.ascontiguousarray(np.concatenate([array] * (batch // len(array) + 1))[:batch])
    return out


def _turn(system: System, seconds: float, min_calls: int) -> float:
    system.before()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        started = time.perf_counter()
        system.run(system.rows)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000.0


def interleave(systems: list[System], rounds: int, seconds: float, warmup: int = 10, min_calls: int = 3,
               progress: Callable[[], None] = lambda: None) -> None:
    """Time every system in `rounds` rounds of `seconds` each, alternating; fills each system's turns_ms."""
    for system in systems:
        system.before()
        for _ in range(warmup):
            system.run(system.rows)
    for index in range(rounds):
        order = systems if index % 2 == 0 else systems[::-1]
        for system in order:
            system.turns_ms.append(_turn(system, seconds, min_calls))
            progress()


def median_ms(system: System) -> float:
    return float(np.median(system.turns_ms))


def speedup(faster: System, baseline: System) -> float:
    """Median over rounds of baseline time / `faster` time (> 1: `faster` is faster)."""
    return float(np.median(np.asarray(baseline.turns_ms) / np.asarray(faster.turns_ms)))
