"""Load and measurement helpers of `make reliability`: bounded HTTP clients, per-request outcomes, RSS.

Every load here is bounded three ways: a number of clients, a number of requests per client and a
wall-clock deadline; each client also stops when its `stop` event is set. Requests go to 127.0.0.1 only
(the URLs come from the server handle the rig started).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Optional

import psutil
import requests

WORKER_SCRIPT = "model_service_worker.py"


@dataclass
class Outcome:
    """One request: when it ran, its HTTP status (None: no answer), the answering version, the error body."""

    client: int
    start: float
    end: float
    status: Optional[int]
    error: str = ""
    version: Optional[str] = None
    body: Optional[dict] = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class Target:
    """What every client of a load sends: one URL, one body."""

    url: str
    body: bytes
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)


@dataclass
class Load:
    """How many clients, for how long, how many requests each at most, and an optional pace per client."""

    clients: int
    duration_s: float
    max_requests: int
    rate_per_client: Optional[float] = None
    timeout_s: float = 30.0


class Caller:
    """One client: its own connection pool (requests.Session) and the inference key."""

    def __init__(self, authorization: str, timeout_s: float = 30.0):
        self.session = requests.Session()
        self.authorization = authorization
        self.timeout_s = timeout_s

    def post(self, target: Target, client: int = 0, keep_body: bool = False) -> Outcome:
        headers = {"Content-Type": target.content_type, **target.headers}
        if self.authorization:
            headers["Authorization"] = self.authorization
        start = time.monotonic()
        try:
            response = self.session.post(target.url, data=target.body, headers=headers, timeout=self.timeout_s)
        except requests.RequestException as exc:
            return Outcome(client, start, time.monotonic(), None, error=f"{type(exc).__name__}: {exc}"[:300])
        end = time.monotonic()
        outcome = Outcome(client, start, end, response.status_code)
        body = _json_or_none(response)
        if isinstance(body, dict):
            outcome.version = body.get("version") if outcome.ok else None
            if keep_body or not outcome.ok:
                outcome.body = body
        if not outcome.ok and body is None:
            outcome.error = response.text[:300]
        return outcome

    def close(self) -> None:
        self.session.close()


def _json_or_none(response: requests.Response) -> Optional[object]:
    try:
        return response.json()
    except ValueError:
        return None



def run_load(target: Target, load: Load, authorization: str, stop: Optional[threading.Event] = None,
             on_outcome: Optional[Callable[[Outcome], None]] = None) -> list[Outcome]:
    """Run `load.clients` clients against `target` until the deadline, their request cap, or `stop`."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + load.duration_s
    results: list[list[Outcome]] = [[] for _ in range(load.clients)]

    def client(index: int) -> None:
        caller = Caller(authorization, load.timeout_s)
        interval = 1.0 / load.rate_per_client if load.rate_per_client else 0.0
        next_at = time.monotonic() + (interval * index / load.clients if interval else 0.0)
        try:
            while not stop.is_set() and len(results[index]) < load.max_requests:
                if interval:
                    pause = next_at - time.monotonic()
                    if pause > 0 and stop.wait(pause):
                        break
                    next_at += interval
                if time.monotonic() >= deadline:
                    break
                outcome = caller.post(target, index)
                results[index].append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
        finally:
            caller.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True, name=f"load-{i}") for i in range(load.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(load.duration_s + load.timeout_s + 30.0)
    return sorted((o for r in results for o in r), key=lambda o: o.start)


class Background:
    """`run_load` in a thread: start it, do something else, then `finish()` for the outcomes."""

    def __init__(self, target: Target, load: Load, authorization: str,
                 on_outcome: Optional[Callable[[Outcome], None]] = None):
        self.stop = threading.Event()
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()

        def work() -> None:
            self.outcomes = run_load(target, load, authorization, self.stop, on_outcome)

        self.thread = threading.Thread(target=work, daemon=True, name="background-load")
        self.thread.start()

    def finish(self) -> list[Outcome]:
        self.stop.set()
        self.thread.join(120.0)
        return self.outcomes


# --- figures -------------------------------------------------------------------------------------------


def percentile(values: Iterable[float], q: float) -> Optional[float]:
    ordered = sorted(values)
    if not ordered:
        return None
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def rate(outcomes: list[Outcome], start: float, end: float, ok_only: bool = True) -> float:
    """Answers per second that ended within [start, end)."""
    if end <= start:
        return 0.0
    count = sum(1 for o in outcomes if start <= o.end < end and (o.ok or not ok_only))
    return count / (end - start)


def status_counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else "no_answer"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if not o.ok]


# --- processes and memory ------------------------------------------------------------------------------


def tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants (TorchServe's launcher, the JVM, the Python workers)."""
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def rss(pid: int) -> Optional[int]:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def tree_rss(pid: int) -> int:
    total = 0
    for process in tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.Error:
            pass
    return total


def worker_processes(server_pid: int) -> list[int]:
    """PIDs of TorchServe's Python workers under the server's process tree."""
    pids = []
    for process in tree(server_pid):
        try:
            if any(WORKER_SCRIPT in part for part in process.cmdline()):
                pids.append(process.pid)
        except psutil.Error:
            pass
    return pids


def frontend_pid(server_pid: int) -> Optional[int]:
    for process in tree(server_pid):
        try:
            if "java" in process.name():
                return process.pid
        except psutil.Error:
            pass
    return None


class RssSampler:
    """Samples the server tree's total RSS and each watched PID's RSS every `interval_s`, in a thread."""

    def __init__(self, server_pid: int, pids: Callable[[], list[int]] = list, interval_s: float = 0.5):
        self.server_pid = server_pid
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, dict[int, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _loop(self) -> None:
        while not self._stop.is_set():
            per_pid = {pid: value for pid in self.pids() if (value := rss(pid)) is not None}
            self.samples.append((time.monotonic(), tree_rss(self.server_pid), per_pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10.0)

    @property
    def peak_tree(self) -> int:
        return max((s[1] for s in self.samples), default=0)

    def series(self, pid: int) -> list[tuple[float, int]]:
        return [(t, per[pid]) for t, _, per in self.samples if pid in per]


MB = 1024 * 1024
