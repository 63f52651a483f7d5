"""Shadow traffic: a variant that also answers, off the answer path, to measure agreement with the primary.

The router hands (request, primary answer) pairs to a bounded queue and returns its answers at once; a
background thread runs the shadow variant and counts agree / disagree / error. When the queue is full
the pair is dropped (counted), so a slow shadow can never hold up or grow without bound.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable
from typing import Any, Optional

import numpy as np

from handlers.pipeline import Answer, Pipeline
from handlers.request import Request

logger = logging.getLogger(__name__)

MAX_SHADOW_BATCH = 16
Outcome = str  # "agree" | "disagree" | "error" | "dropped"


def agreement(primary: dict, shadow: dict) -> Outcome:
    """Compare two answers' content: top-1 classes for classifiers, values (rtol 1e-3) otherwise."""
    if "error" in primary or "error" in shadow:
        same = primary.get("type") == shadow.get("type")
        return "agree" if same else "error"
    first, second = _comparable(primary), _comparable(shadow)
    if first is None or second is None or len(first) != len(second):
        return "disagree"
    if all(isinstance(a, int) for a in first):
        return "agree" if first == second else "disagree"
    return "agree" if np.allclose(np.asarray(first, float), np.asarray(second, float), rtol=1e-3, atol=1e-5) \
        else "disagree"


def _comparable(answer: dict) -> Optional[list]:
    rows = answer.get("results") or [answer]
    if all("predictions" in r for r in rows):
        return [int(r["predictions"][0]["index"]) for r in rows]
    if "outputs" in answer:
        return list(np.ravel(answer["outputs"][0]["data"]))
    if all("output" in r for r in rows):
        return list(np.ravel([r["output"] for r in rows]))
    return None


class ShadowRunner:
    """Runs `pipeline` on copies of routed requests in a daemon thread and reports each outcome."""

    def __init__(self, pipeline: Pipeline, name: str, report: Callable[[str, str, Outcome], None],
                 sample_rate: float = 1.0, queue_size: int = 64, seed: Optional[int] = None):
        self.pipeline = pipeline
        self.name = name
        self.report = report
        self.sample_rate = sample_rate
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.rng = random.Random(seed)
        self.thread = threading.Thread(target=self._loop, name=f"shadow-{name}", daemon=True)
        self.thread.start()

    def submit(self, primary_variant: str, pairs: list[tuple[Request, Answer]]) -> None:
        for request, answer in pairs:
            if self.sample_rate < 1.0 and self.rng.random() >= self.sample_rate:
                continue
            try:
                self.queue.put_nowait((primary_variant, request, answer))
            except queue.Full:
                self.report(primary_variant, self.name, "dropped")

    def _loop(self) -> None:
        while True:
            items = [self.queue.get()]
            while len(items) < MAX_SHADOW_BATCH:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._run(items)
            except Exception:  # the shadow must never take the worker down
                logger.exception("shadow variant %s failed", self.name)
                for primary, _, _ in items:
                    self.report(primary, self.name, "error")
            finally:
                for _ in items:
                    self.queue.task_done()

    def _run(self, items: list[tuple[str, Request, Answer]]) -> None:
        answers = self.pipeline.process([request for _, request, _ in items], meta={})
        for (primary, _, primary_answer), shadow_answer in zip(items, answers):
            self.report(primary, self.name, agreement(primary_answer.body, shadow_answer.body))

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until every submitted pair was compared (tests, shutdown)."""
        done = threading.Event()

        def waiter() -> Any:
            self.queue.join()
            done.set()

        threading.Thread(target=waiter, daemon=True).start()
        return done.wait(timeout_s)
