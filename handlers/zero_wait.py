"""Zero-wait (continuous) batching: run whatever is queued the moment the model is free.

TorchServe 0.12's frontend waits `maxBatchDelay` for a batch to fill, and reads 0 as its 100 ms default, so a lone
request always pays the delay. With `asyncCommunication: true` and `batchSize: 1` in model-config.yaml it instead
streams every request to the worker as it arrives, without waiting for answers. So the worker can own the queue:
a request that finds the model idle runs at once; requests that arrive while it runs are taken together, up to
`max_batch`, as soon as it is done.

TorchServe's own asynchronous worker loop (ts/async_service.py) is too slow for that on a small model (see
`DrainingWorker.install`), so the handler installs `DrainingWorker` in its place: one thread that reads, batches,
runs the handler's ordinary batch-correct `handle` and writes the answers. A first version kept TorchServe's loop
and queued requests in an asyncio batcher inside the handler; at c=1 it added about a millisecond per request.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from ts.protocol.otf_message_handler import create_predict_response, retrieve_msg
from ts.service import PREDICTION_METRIC, Service

from handlers import read_ahead
from handlers.errors import ModelLoadError, Overloaded, SpecError
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


def is_describe(message: list[dict]) -> bool:
    """TorchServe's `describe` call (GET /models/{name}?customized=true) carries the header describe=True."""
    return any(h.get("name") == b"describe" for request in message for h in request.get("headers") or ())


class DrainingWorker:
    """The worker's loop in zero-wait mode, in place of TorchServe's asynchronous one.

    One thread: read a request (blocking while the model is idle), then the requests already waiting on the
    socket, run up to `max_batch` of them through the handler, send the answers, repeat. Requests that arrive
    while the model runs wait in the socket and form the next batch. Beyond `max_pending` held requests, the newest
    are answered 503 at once, as the frontend's job queue would; describe calls are never refused.

    `answer(data, context) -> bodies` is the handler's `handle`; `refuse(data, context, error) -> bodies` answers
    every request with `error` (when the worker is full, or when `answer` failed). Both set each request's status
    on the context. The response message itself always says 200: TorchServe's frontend answers any other code by
    failing every request the worker holds, queued ones included.
    """

    def __init__(self, config: ZeroWaitConfig, answer: Callable[[list, Any], list],
                 refuse: Callable[[list, Any, BaseException], list]):
        self.config = config
        self.answer = answer
        self.refuse = refuse
        self.batches = 0  # model runs so far (describe)
        self.held = 0  # requests read and not yet answered

    def run(self, service: Any) -> Optional[str]:
        """Serve `service`'s socket until the frontend disconnects (the worker process then exits, as TorchServe's
        own loop does). Returns an error text for TorchServe's worker to raise, as AsyncService.run does."""
        reader = read_ahead.reader_for(service.cl_socket)
        pending: deque[list[dict]] = deque()
        try:
            while True:
                while not pending:
                    self._read(service, pending)
                # Bounded, so that a flood of refusals cannot keep the model from running.
                reads = 0
                while reads < self.config.max_pending + self.config.max_batch and reader.readable():
                    self._read(service, pending)
                    reads += 1
                batch = self._take(pending)
                response = self._respond(service, batch)
                self.batches += 1
                self.held -= len(batch)
                service.cl_socket.sendall(response)
        except ConnectionError:  # the frontend went away mid-write: it restarts the worker if it still wants one
            logger.info("frontend disconnected")
            sys.exit(0)
        except Exception:  # a bug here must restart the worker loudly, not hang its requests
            logger.exception("zero-wait worker loop failed")
            return traceback.format_exc()

    def _read(self, service: Any, pending: deque) -> None:
        command, message = retrieve_msg(service.cl_socket)
        if command != b"I" or not message:
            logger.warning("zero-wait worker: unexpected command %r ignored", command)
            return
        if self.held + len(message) > self.config.max_pending and not is_describe(message):
            refusal = Overloaded(f"this worker already holds {self.held} requests "
                                 f"(zero_wait.max_pending {self.config.max_pending}); retry later")
            service.cl_socket.sendall(self._respond(service, message, refusal))
            return
        pending.append(message)
        self.held += len(message)

    def _respond(self, service: Any, batch: list[dict], refusal: Optional[BaseException] = None) -> bytes:
        """The response to `batch`: the handler's answers, or every request refused with `refusal`, or, when the
        handler fails, every request answered with that failure."""
        def refused(error: BaseException) -> bytes:
            return respond(service, batch, lambda data, context: self.refuse(data, context, error), timed=False)

        if refusal is not None:
            return refused(refusal)
        try:
            return respond(service, batch, self.answer)
        except Exception as exc:  # the handlers answer per request; this only guards against their bugs
            logger.exception("zero-wait batch of %d requests failed", len(batch))
            return refused(exc)

    def _take(self, pending: deque) -> list[dict]:
        """The requests of one model run, oldest first: whole messages up to max_batch requests (a larger one runs
        alone), and a describe call always alone (the handler reads it from the first request's headers)."""
        batch = list(pending.popleft())
        if is_describe(batch):
            return batch
        while pending and len(batch) + len(pending[0]) <= self.config.max_batch and not is_describe(pending[0]):
            batch.extend(pending.popleft())
        return batch

    def describe(self) -> dict:
        return {"mode": "zero_wait", "max_batch": self.config.max_batch, "max_pending": self.config.max_pending,
                "held": self.held, "batches": self.batches}

    def install(self) -> None:
        """Serve this worker process with this loop instead of TorchServe's asynchronous one.

        TorchServe 0.12's AsyncService (ts/async_service.py) costs more than the model on a small one: three
        threads and two thread hand-offs per request, a deep copy of the context, a `print` of the entry point and
        an f-string of the whole message (body included) for every request. The handler is loaded before the
        worker builds its AsyncService, and a worker process serves this one model, so replacing the class's
        `run` here, in this process only, changes nothing for any other model. Its constructor still runs (it
        only sets up queues this loop does not use).
        """
        from ts.async_service import AsyncService

        if not read_ahead.install():  # the loop asks the reader whether a request is waiting
            raise ModelLoadError("zero-wait batching needs TorchServe 0.12's worker protocol "
                                 "(ts.protocol.otf_message_handler._retrieve_buffer)")
        worker = self
        AsyncService.run = lambda service_wrapper: worker.run(service_wrapper.service)


def respond(service: Any, batch: list[dict], entry: Callable[[list, Any], list], timed: bool = True) -> bytes:
    """One predict response for `batch`, from `entry(data, context)`, as TorchServe's Service.predict builds it
    (request ids, headers, per-request statuses, the PredictionTime metric when `timed`), on the model's one
    context.

    Raises:
        Exception: whatever `entry` raised, or RuntimeError when it did not answer each request once.
    """
    headers, data, request_ids = Service.retrieve_data_for_inference(batch)
    context = service.context
    context.request_ids = request_ids
    context.request_processor = headers
    context.metrics.request_ids = request_ids
    context.cl_socket = service.cl_socket
    context.stopping_criteria = None  # set per batch by release_jobs; a stale one would mark the wrong answers
    started = time.time()
    count = len(data)
    bodies = entry(data, context)
    if not isinstance(bodies, list) or len(bodies) != len(request_ids):
        raise RuntimeError(f"the handler returned {len(bodies) if isinstance(bodies, list) else type(bodies)} "
                           f"answers for {count} requests")
    if timed:
        context.metrics.add_time(PREDICTION_METRIC, round((time.time() - started) * 1000, 2))
    return create_predict_response(bodies, request_ids, "Prediction success", 200, context=context)


def release_jobs(bodies: list, requests: list[Request], data: list, context: Any) -> list:
    """Make TorchServe 0.12's frontend forget each answered request; returns the bodies to send.

    Its AsyncBatchAggregator keeps every job it hands an async worker in a map, and removes one only when an answer
    carries `ts_stream_next: false` (the end of a streamed answer). A plain answer never does, so every request,
    its body included, would stay in the frontend's heap for good (checked with jmap: one RestJob per request).

    - An HTTP request (it carries a Host header): marking its answer as a stream end breaks it (the frontend then
      writes the body without a status line). So the answer goes out whole, and right behind it, in the same
      message, an empty answer for the same request id that says the stream ended: the frontend has already
      written the full response, its HTTP encoder refuses the stray tail (nothing reaches the client, the
      connection is untouched) and the job is removed.
    - A gRPC call: its answer itself is marked. The frontend completes a gRPC predict or OIP infer call whatever
      the flag says, and a second answer would complete it twice, which drops its connection to the worker.

    `data`, `context.request_ids` and `context.request_processor` belong to this one batch (`respond` sets them),
    and one answer per entry of `data` is sent.
    """
    from ts.context import RequestProcessor

    http = [i for i, request in enumerate(requests) if "host" in request.headers]
    bodies = list(bodies)
    ends = [True] * len(bodies)
    for i in http:
        ends[i] = None  # leave ts_stream_next unset: the twin appended here ends this job
        context.request_ids[len(bodies)] = context.request_ids[i]
        context.request_processor.append(RequestProcessor({}))
        data.append(None)
        bodies.append(b"")
        ends.append(True)
    # TorchServe's hook for ending streams: True sets `ts_stream_next: false` on that answer.
    context.stopping_criteria = [lambda _, end=end: end for end in ends]
    return bodies


def release_described(context: Any) -> None:
    """A describe call's answer ends its job itself: the frontend writes a describe answer whatever the flag says
    (a twin would be written as a second response)."""
    context.stopping_criteria = [lambda _: True]
