"""The systems of one comparison measured in interleaved rounds, each row rerun while other work disturbs it.

A shared machine changes speed from minute to minute, so two systems timed ten minutes apart see different
machines. Here every contender of a comparison is measured once per round, in an order reversed every round
(A B C, C B A, A B C ...), so each round's ratios compare systems under nearly the same load; the ratio reported
is the median over rounds (benchmarks/ratios.py).

A row measured while other work used more than DISTURBED_SHARE of the CPU (systems.CpuWatch's `other_share`) is
measured again, up to `reruns` times; a row still disturbed is kept, marked `disturbed`, and every ratio built on
it is null.

A server that left a core idle while SATURATING_CLIENTS or more clients waited (it used under IDLE_SHARE of the
machine) is measured again the same way. That is how a multi-process peer looks when the kernel handed every
connection to one of its processes: uvicorn with 2 workers served 821 req/s with one worker idle, against 1,100 to
1,480 in the runs that spread the 32 connections (light CNN, 12 runs in a row here). Handed most of them, it idles
part of the time: on ResNet-18 it served 22 req/s using 62% and 77% of the machine, against 45 at 97%. Every other
row under 32 clients used 86-98% (a full run of 2026-12-05), hence IDLE_SHARE. A peer's figure is then its
balanced one, so no ratio is won from its bad luck. A row still idle after its reruns is kept and marked
`idle_cores`: it is how that system served, and its ratios stand.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DISTURBED_SHARE = 0.10
RERUNS = 3
IDLE_SHARE = 0.8
SATURATING_CLIENTS = 16


@dataclass
class Contender:
    """One thing measured in every round: a system serving one body, or an in-process limit.

    label: the row's identity (system, model, runtime, config, body, batch_size).
    measure: concurrency (None for in-process limits) -> the row's numbers, with `other_cpu_share`.
    concurrencies: measured every round; first_round: measured in the first round only (rows no ratio uses).
    """

    label: dict
    measure: Callable[[int | None], dict]
    concurrencies: tuple = (32,)
    first_round: tuple = ()
    # A server kept up beside the others: paused while they are measured, resumed for its own turns.
    pause: Callable[[], None] = lambda: None
    resume: Callable[[], None] = lambda: None

    @property
    def name(self) -> str:
        body = f" {self.label['body']}" if self.label.get("body") else ""
        return f"{self.label['system']} {self.label['runtime']}{body} ({self.label['config']})"


def disturbed(row: dict, share: float = DISTURBED_SHARE) -> bool:
    return (row.get("other_cpu_share") or 0.0) > share


def idle_cores(row: dict, concurrency: int | None) -> bool:
    """The server used under IDLE_SHARE of the machine with SATURATING_CLIENTS or more clients waiting."""
    share = row.get("server_cpu_share")
    return (concurrency is not None and concurrency >= SATURATING_CLIENTS and share is not None
            and share < IDLE_SHARE)


def order(contenders: Sequence, round_index: int) -> list:
    """Round 0 in the given order, round 1 reversed, and so on."""
    return list(contenders) if round_index % 2 == 0 else list(contenders)[::-1]


def measured(measure: Callable[[int | None], dict], concurrency: int | None, reruns: int = RERUNS,
             share: float = DISTURBED_SHARE, say: Callable[[str], None] = print, name: str = "") -> dict:
    """`measure(concurrency)`, repeated while other work used more than `share` of the CPU or the server left a
    core idle under load (`idle_cores`), at most `reruns` more times. The last try is kept, with `attempts`,
    `disturbed` and `idle_cores`."""
    attempts = 0
    while True:
        numbers = measure(concurrency)
        attempts += 1
        busy, idle = disturbed(numbers, share), idle_cores(numbers, concurrency)
        if not (busy or idle) or attempts > reruns:
            break
        why = (f"other work used {numbers['other_cpu_share']:.0%} of the CPU" if busy else
               f"the server used {numbers['server_cpu_share']:.0%} of the CPU with {concurrency} clients waiting")
        say(f"  rerun {attempts}/{reruns} of {name} c={concurrency}: {why}")
    return {**numbers, "attempts": attempts, "disturbed": busy, "idle_cores": idle}


@dataclass
class Rounds:
    """Runs contenders in interleaved rounds; `add` receives every row (label + numbers + phase/round fields)."""

    add: Callable[[dict], None]
    reruns: int = RERUNS
    share: float = DISTURBED_SHARE
    say: Callable[[str], None] = print
    failures: list = field(default_factory=list)

    def run(self, contenders: Sequence[Contender], rounds: int, comparison: str, phase: str = "rounds") -> None:
        for index in range(rounds):
            for contender in order(contenders, index):
                for other in contenders:
                    other.pause()
                contender.resume()
                extra = contender.first_round if index == 0 else ()
                for concurrency in (*contender.concurrencies, *extra):
                    try:
                        numbers = measured(contender.measure, concurrency, self.reruns, self.share, self.say,
                                           contender.name)
                    except Exception as exc:  # one failed measurement costs its row, not the comparison
                        self.failures.append({**contender.label, "error": f"{type(exc).__name__}: {exc}"[:2000]})
                        self.say(f"  FAILED {contender.name} c={concurrency}: {exc}")
                        continue
                    self.add({**contender.label, "concurrency": concurrency, **numbers, "phase": phase,
                              "comparison": comparison, "round": index + 1})
        for contender in contenders:
            contender.resume()
