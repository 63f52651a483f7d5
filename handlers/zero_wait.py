"""Zero-wait (continuous) batching: run whatever is queued the moment the model is free.

TorchServe 0.12's frontend waits `maxBatchDelay` for a batch to fill, and reads 0 as its 100 ms default, so a lone
request always pays the delay. With `asyncCommunication: true` and `batchSize: 1` in model-config.yaml it instead
hands every request to the worker as it arrives, and the worker awaits the handler's coroutine for each one on a
single asyncio loop (ts/async_service.py). So the handler owns the queue: a request that finds the model idle runs
at once; requests that arrive while it runs are taken together, up to `max_batch`, as soon as it is done.

The model runs on the loop's own thread. Requests that arrive meanwhile are not held back by that: TorchServe's
receiving threads read them off the socket and schedule them on the loop, and the loop starts them all (each
joins the queue) before the next batch is taken. A separate model thread was tried first: it adds two thread
hand-offs per batch, and it writes metric lines to stdout while the loop thread prints TorchServe's per-request
`self._entry_point=...` line; the two interleave and glue lines together, and the frontend drops a glued metric
line. So everything this worker writes to stdout is written from the loop thread (metrics counters included,
see `flush`).

The handlers keep their own decode -> infer -> encode path (`answer`); this module only decides when it runs.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from handlers.errors import ModelLoadError, Overloaded, SpecError
from handlers.pipeline import Answer
from handlers.request import Request
from handlers.spec import parse, require

logger = logging.getLogger(__name__)

# TorchServe's default job queue per model: the frontend never queues for a zero-wait worker, so the worker bounds
# its own queue the same way.
DEFAULT_MAX_PENDING = 100


@dataclass(frozen=True)
class ZeroWaitConfig:
    """model-config.yaml's `handler.zero_wait`. max_batch: requests per model run; max_pending: requests this worker
    holds (running and queued) before it answers 503 at once."""

    max_batch: int = 8
    max_pending: int = DEFAULT_MAX_PENDING

    def __post_init__(self):
        require(self.max_batch >= 1, f"zero_wait.max_batch: must be >= 1, got {self.max_batch}")
        require(self.max_pending >= self.max_batch,
                f"zero_wait.max_pending: must be >= max_batch ({self.max_batch}), got {self.max_pending}")


def zero_wait_config(model_yaml_config: Optional[dict]) -> Optional[ZeroWaitConfig]:
    """The archive's zero-wait settings when it asks TorchServe for the asynchronous worker, else None.

    `asyncCommunication: true` is the switch, not `handler.zero_wait`: with it TorchServe awaits whatever the
    handler returns, so the handler must answer with a coroutine whatever the rest of the file says.

    Raises:
        ModelLoadError: the section is there but invalid (a hand-edited model-config.yaml; builds check it).
    """
    config = model_yaml_config or {}
    if config.get("asyncCommunication") is not True:
        return None
    try:
        return parse(ZeroWaitConfig, ((config.get("handler") or {}).get("zero_wait")) or {}, "handler.zero_wait")
    except SpecError as exc:
        raise ModelLoadError(f"model-config.yaml: {exc}") from exc


@dataclass
class _Call:
    """One call of TorchServe's `predict` (one request with the frontend's batchSize 1) waiting for its answers."""

    requests: list[Request]
    future: asyncio.Future


class ZeroWaitBatcher:
    """The worker's queue and its one runner.

    `answer(requests) -> answers` is the handler's batch-correct path (decode, cache, infer, encode, metrics); it
    answers every request itself, errors included. `flush` (the metrics' counters) is called on the loop every
    `flush_s` seconds from the first batch on, instead of from a thread of its own.
    """

    def __init__(self, answer: Callable[[list[Request]], list[Answer]], config: ZeroWaitConfig,
                 flush: Optional[Callable[[], None]] = None, flush_s: float = 1.0):
        self.answer = answer
        self.config = config
        self.flush = flush
        self.flush_s = flush_s
        self._calls: deque[_Call] = deque()
        self._held = 0  # requests queued or running
        self._runner: Optional[asyncio.Task] = None
        self._flush_timer: Optional[asyncio.TimerHandle] = None
        self.batches = 0  # model runs so far (describe)

    async def submit(self, requests: list[Request]) -> list[Answer]:
        """Queue `requests` and return their answers, in order, once the runner has served them."""
        if self._held + len(requests) > self.config.max_pending:
            refusal = Overloaded(f"this worker already holds {self._held} requests "
                                 f"(zero_wait.max_pending {self.config.max_pending}); retry later")
            return [Answer.from_error(refusal) for _ in requests]
        loop = asyncio.get_running_loop()
        call = _Call(requests, loop.create_future())
        self._calls.append(call)
        self._held += len(requests)
        if self._runner is None:  # the model is idle: this request starts it, now
            self._runner = loop.create_task(self._run())
        return await call.future

    async def _run(self) -> None:
        """Serve the queue until it is empty. It sees every request that arrived during the previous batch: those
        were started (and queued themselves) before this task, created by the first of them, got the loop."""
        try:
            while self._calls:
                calls = self._take()
                requests = [r for call in calls for r in call.requests]
                try:
                    answers = self.answer(requests)
                except Exception as exc:  # `answer` answers per request; this only guards against its bugs
                    logger.exception("zero-wait batch of %d requests failed", len(requests))
                    answers = [Answer.from_error(exc) for _ in requests]
                self.batches += 1
                self._held -= len(requests)
                offset = 0
                for call in calls:
                    if not call.future.done():
                        call.future.set_result(answers[offset:offset + len(call.requests)])
                    offset += len(call.requests)
                if self.flush is not None and self._flush_timer is None:
                    self._flush_timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush)
                # With a backlog, let the answered calls go out (and new ones queue up) before the next batch.
                await asyncio.sleep(0)
        finally:
            self._runner = None

    def _flush(self) -> None:
        try:
            self.flush()
        except Exception:  # a broken metric must never break serving
            logger.warning("flushing metrics failed", exc_info=True)
        # Every second, like the thread it replaces: a shadow variant counts after the answer has gone.
        self._flush_timer = asyncio.get_running_loop().call_later(self.flush_s, self._flush)

    def _take(self) -> list[_Call]:
        """The calls that fit into one model run, oldest first; a call larger than max_batch runs alone."""
        calls = [self._calls.popleft()]
        size = len(calls[0].requests)
        while self._calls and size + len(self._calls[0].requests) <= self.config.max_batch:
            size += len(self._calls[0].requests)
            calls.append(self._calls.popleft())
        return calls

    def describe(self) -> dict:
        return {"mode": "zero_wait", "max_batch": self.config.max_batch, "max_pending": self.config.max_pending,
                "held": self._held, "batches": self.batches}


def copy_context_shallowly(context: Any) -> None:
    """Make the per-request copy of the model's context that TorchServe's async worker takes a shallow one.

    Its `predict` deep-copies the context for every request, metrics cache and parsed metrics config included: a
    fifth of the worker's busy time on the light CNN at 32 clients (py-spy). The copy exists so that each call
    has its own request ids, headers and socket, and `predict` sets those on it afterwards; the handler sets
    statuses and headers through the per-request objects those hold. A shallow copy gives each call the same.
    Set on this one context object (copy.deepcopy honours an instance's `__deepcopy__`), not on TorchServe's class.
    """
    context.__deepcopy__ = lambda memo: copy.copy(context)


def release_jobs(bodies: list, requests: list[Request], data: list, context: Any) -> list:
    """Make TorchServe 0.12's frontend forget each answered HTTP request; returns the bodies `predict` must send.

    Its AsyncBatchAggregator keeps every job it hands an async worker in a map, and removes one only when an answer
    carries `ts_stream_next: false` (the end of a streamed answer). A plain answer never does, so every request,
    its body included, would stay in the frontend's heap for good (checked with jmap: one RestJob per request).
    Marking the answer itself as a stream end breaks it (the frontend then writes the body without a status line).
    So each answer goes out whole, and right behind it, in the same message, an empty answer for the same request
    id that says the stream ended: the frontend has already written the full response, its HTTP encoder refuses
    the stray tail (nothing reaches the client, the connection is untouched) and the job is removed.

    Only for HTTP requests (they carry a Host header): for a gRPC call the second answer would complete the call
    twice, which makes the frontend drop its connection to the worker. gRPC jobs and describe calls are not
    released; they are rare and small.

    `data`, `context.request_ids` and `context.request_processor` belong to this one `predict` call (TorchServe
    deep-copies the context per call), and `predict` sends one answer per entry of `data`.
    """
    from ts.context import RequestProcessor

    http = [i for i, request in enumerate(requests) if "host" in request.headers]
    if not http:
        return bodies
    bodies = list(bodies)
    keep_headers = [lambda _: None] * len(bodies)  # None: leave this answer's ts_stream_next unset
    for i in http:
        context.request_ids[len(bodies)] = context.request_ids[i]
        context.request_processor.append(RequestProcessor({}))
        data.append(None)
        bodies.append(b"")
    # TorchServe's hook for ending streams: True sets `ts_stream_next: false` on that answer.
    context.stopping_criteria = keep_headers + [lambda _: True] * len(http)
    return bodies
