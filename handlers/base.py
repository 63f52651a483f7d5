"""The base every tspack handler extends.

It owns what is the same for every artifact: reading the archive's manifest, placing the worker
(device, threads), loading the runtime the manifest names, batch-correct `handle()`, per-request
HTTP statuses, `describe`, and metrics. Subclasses only say which front end they serve. An archive built for
zero-wait batching (handlers/zero_wait.py) is answered by the same `handle`, called by the handler's own worker loop.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, ClassVar, Optional

from handlers import jsonio, read_ahead
from handlers.allocator import freed_memory_wanted, keep_freed_memory
from handlers.cache import cache_for
from handlers.device import placement_for
from handlers.errors import ModelLoadError
from handlers.frontends import frontend_for
from handlers.metrics import NO_VARIANT, HandlerMetrics
from handlers.pipeline import Answer, BatchStats, Pipeline, bridge_safe
from handlers.request import Decoded, Request, requests_from_batch
from handlers.routing import decode_for_node, workflow_variant
from handlers.runtimes import load_runtime
from handlers.spec import ArtifactManifest
from handlers.zero_wait import DrainingWorker, release_described, release_jobs, zero_wait_config

logger = logging.getLogger(__name__)

def is_describe_request(context: Any) -> bool:
    """TorchServe sends `GET /models/{name}?customized=true` to the handler with header describe=True."""
    try:
        return context.get_request_header(0, "describe") == "True"
    except (AttributeError, IndexError, TypeError):
        return False


def write_answers(answers: list[Answer], context: Any) -> list[bytes]:
    """Set each request's own status and content type, and return the bodies in request order."""
    bodies = []
    for idx, answer in enumerate(answers):
        if context is not None and getattr(context, "request_processor", None):
            context.set_response_content_type(idx, answer.content_type)
            for name, value in answer.headers.items():
                context.set_response_header(idx, name, value)
            if answer.status != 200:
                phrase = answer.body.get("type", "error")
                context.set_response_status(answer.status, phrase, idx)
        bodies.append(answer.raw if answer.raw is not None else jsonio.dumps(answer.body))
    return bodies


class ServingHandler:
    """The skeleton of every tspack entry class (one artifact, or the A/B router): TorchServe's initialize/handle
    contract, `describe`, and each request's own status. Subclasses load what they serve and answer a batch."""

    def __init__(self):
        self.initialized = False
        self.context: Any = None
        self.metrics: Optional[HandlerMetrics] = None
        self.zero_wait: Optional[DrainingWorker] = None
        self.read_ahead = False

    def initialize(self, context: Any) -> None:
        self.context = context
        self.load(context)
        self.read_ahead = read_ahead.install()
        zero_wait = zero_wait_config(getattr(context, "model_yaml_config", None))
        if zero_wait is not None:
            self.zero_wait = DrainingWorker(zero_wait, self.handle, self.refuse)
            self.zero_wait.install()
        self.initialized = True
        quiet_worker_logs(context)

    def handle(self, data: list, context: Any) -> list:
        """The bodies, in request order (in zero-wait mode, with what makes the frontend forget each job)."""
        if is_describe_request(context):
            if self.zero_wait:
                release_described(context)
            return [json.dumps(self.description())]
        requests = requests_from_batch(data, context)
        bodies = write_answers(self.answer(requests, context), context)
        return release_jobs(bodies, requests, data, context) if self.zero_wait else bodies

    def refuse(self, data: list, context: Any, error: BaseException) -> list:
        """Zero-wait mode: every request answered with `error` (the worker is full, or its batch failed)."""
        requests = requests_from_batch(data, context)
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        meta = {"model": getattr(context, "model_name", None), "version": model.get("modelVersion")}
        answers = [bridge_safe(request, Answer.from_error(error), meta) for request in requests]
        return release_jobs(write_answers(answers, context), requests, data, context)

    def description(self) -> dict:
        """`describe` plus how this worker batches."""
        if self.zero_wait is not None:
            batching = self.zero_wait.describe()
        else:
            properties = getattr(self.context, "system_properties", None) or {}
            batching = {"mode": "delay", "batch_size": properties.get("batch_size")}
        return {**self.describe(), "batching": batching}

    def load(self, context: Any) -> None:
        """Read the archive in `context.system_properties["model_dir"]` and make it ready to answer."""
        raise NotImplementedError

    def answer(self, requests: list[Request], context: Any) -> list[Answer]:
        """One answer per request, in order; a bad request gets its own error answer, never the batch's."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class TspackHandler(ServingHandler):
    """Serves one artifact. Subclasses set `frontend_name` to the front end they accept."""

    frontend_name: ClassVar[Optional[str]] = None

    def __init__(self):
        super().__init__()
        self.pipeline: Optional[Pipeline] = None
        self.model_dir = ""
        self.workflow_variant: Optional[str] = None
        self.freed_memory_kept = False

    def load(self, context: Any) -> None:
        self.model_dir = context.system_properties["model_dir"]
        manifest = ArtifactManifest.load(self.model_dir)
        if self.frontend_name and manifest.frontend != self.frontend_name:
            raise ModelLoadError(
                f"archive was built for the '{manifest.frontend}' front end "
                f"but its handler serves '{self.frontend_name}'")
        placement = placement_for(context, manifest.runtime.intra_op_threads)
        self.freed_memory_kept = freed_memory_wanted(handler_config(context)) and keep_freed_memory()
        runtime = load_runtime(manifest, self.model_dir, placement)
        self.pipeline = Pipeline(manifest, frontend_for(manifest, self.model_dir), runtime, cache_for(context))
        self.metrics = HandlerMetrics(context, manifest)
        self.workflow_variant = workflow_variant(getattr(context, "model_name", None))
        warm_up(self.pipeline)
        logger.info("tspack loaded %s %s: %s from %s", manifest.name, manifest.version,
                    runtime.describe(), os.path.dirname(os.path.abspath(__file__)))

    def answer(self, requests: list[Request], context: Any) -> list[Answer]:
        started = time.perf_counter()
        stats = BatchStats()
        decoded = [self.decode(request) for request in requests]
        meta = self.pipeline.meta
        if self.workflow_variant:
            meta["variant"] = self.workflow_variant
        answers = [bridge_safe(r, a, meta) for r, a in zip(requests, self.pipeline.infer(decoded, meta, stats))]
        served = [a for a in answers if not a.skipped]
        if served:
            self.metrics.record(served, stats, (time.perf_counter() - started) * 1000.0,
                                variant=self.workflow_variant or NO_VARIANT)
        return answers

    def decode(self, request: Request) -> Decoded | Answer:
        if self.workflow_variant:  # a node of an A/B workflow: the routing envelope decides who answers
            return decode_for_node(request, self.workflow_variant, self.pipeline.decode)
        return self.pipeline.decode(request)

    def describe(self) -> dict:
        description = self.pipeline.describe()
        description["handler"] = {"class": type(self).__name__,
                                  "code_dir": os.path.dirname(os.path.abspath(__file__)),
                                  "keep_freed_memory": self.freed_memory_kept, "read_ahead": self.read_ahead}
        return description


def handler_config(context: Any) -> dict:
    """The `handler:` section of the archive's model-config.yaml, as TorchServe hands it to the worker."""
    return (getattr(context, "model_yaml_config", None) or {}).get("handler") or {}


def quiet_worker_logs(context: Any) -> None:
    """Stop the per-request INFO lines of TorchServe's worker ("Backend received inference at: ...").

    Each is a line on the worker's stdout that the frontend reads, parses and writes to model_log.log.
    Warnings and errors still pass, and so do metrics (ts.metrics keeps INFO). model-config.yaml's
    `handler: {worker_log_level: INFO}` keeps TorchServe's default.
    """
    level = str(handler_config(context).get("worker_log_level", "WARNING")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = "WARNING"
    logging.getLogger().setLevel(level)
    logging.getLogger("ts.metrics").setLevel(logging.INFO)


def warm_up(pipeline: Pipeline) -> None:
    """Run the model twice on the front end's example so the first client does not pay for lazy init and JIT
    profiling."""
    try:
        sample = pipeline.frontend.example_input()
    except Exception:  # a warm-up failure is not fatal: real requests will report the problem
        logger.warning("no warm-up example", exc_info=True)
        return
    for _ in range(2):
        try:
            pipeline.runtime.run(sample.inputs)
        except Exception:
            logger.warning("warm-up run failed", exc_info=True)
            return
