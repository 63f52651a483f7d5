"""Decode each request alone, infer once for all valid rows, answer each request alone.

A `Pipeline` is one served artifact: its manifest, front end and runtime. Handlers hold one; the A/B
router holds one per variant. Bad requests get their own 4xx answer and never fail their batch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np

from handlers import jsonio, oip
from handlers.cache import CachedAnswer, ResponseCache, Uncacheable, response_key
from handlers.device import Placement
from handlers.errors import InferenceFailed, TspackError, UnsupportedMediaType, error_response
from handlers.frontends import Frontend, frontend_for
from handlers.request import Decoded, Request
from handlers.runtimes import Runtime, load_runtime
from handlers.spec import ArtifactManifest

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """One request's answer: HTTP status and JSON body. `error_type` is set for non-2xx answers."""

    status: int
    body: dict
    error_type: Optional[str] = None
    rows: int = 0
    skipped: bool = False  # a workflow node that was not the chosen variant: answered without inference
    raw: Optional[bytes] = None  # the response body as is (a binary protocol); `body` is JSON-encoded otherwise
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)

    @classmethod
    def from_error(cls, exc: BaseException) -> Answer:
        status, _, body = error_response(exc)
        return cls(status=status, body=body, error_type=body["type"])

    @property
    def ok(self) -> bool:
        return self.status < 400


def refuse_form_body(request: Request) -> None:
    """TorchServe turns an x-www-form-urlencoded body into form fields, so `curl -d '{json}'` (no -H) arrives
    as a field name with an empty value. Say what happened instead of answering about an empty body."""
    content_type = (request.header("content-type") or "").split(";", 1)[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded":
        raise UnsupportedMediaType("form-encoded body; send JSON with 'Content-Type: application/json', "
                                   "image bytes, or a multipart upload (curl -F)")


def bridge_safe(request: Request, answer: Answer, meta: dict) -> Answer:
    """TorchServe 0.12's OIP gRPC bridge reads every answer as an OIP response, whatever its status, and an
    `{"error": ...}` body makes it throw, which kills the worker and its batch: refuse with an `error` output."""
    if answer.ok or not oip.is_grpc_bridge(request.headers, request.payload):
        return answer
    try:
        request_id = jsonio.loads(request.payload).get("id")
    except Exception:  # the refusal may be about this very body; the id is a courtesy
        request_id = None
    body = oip.grpc_error_body(meta.get("model"), meta.get("version"), request_id, str(answer.body.get("error")))
    return replace(answer, raw=body)


@dataclass
class BatchStats:
    """What one `Pipeline.process` call did, for metrics and logs."""

    rows: int = 0
    inference_ms: float = 0.0
    runs: int = 0
    errors: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)  # response cache outcome ("hit", "miss", "evicted") -> count


class Pipeline:
    """One artifact ready to serve: decode -> (cache) -> run -> encode. `cache`: None unless the archive turns the
    response cache on; each pipeline (each A/B variant) has its own."""

    def __init__(self, manifest: ArtifactManifest, frontend: Frontend, runtime: Runtime,
                 cache: Optional[ResponseCache] = None):
        self.manifest = manifest
        self.frontend = frontend
        self.runtime = runtime
        self.cache = cache

    @classmethod
    def load(cls, model_dir: str, placement: Placement, cache: Optional[ResponseCache] = None) -> Pipeline:
        manifest = ArtifactManifest.load(model_dir)
        runtime = load_runtime(manifest, model_dir, placement)
        return cls(manifest, frontend_for(manifest, model_dir), runtime, cache)

    @property
    def meta(self) -> dict:
        return {"model": self.manifest.name, "version": self.manifest.version}

    def decode(self, request: Request) -> Decoded | Answer:
        try:
            refuse_form_body(request)
            return self.frontend.decode(request)
        except TspackError as exc:
            return Answer.from_error(exc)
        except Exception as exc:  # a decoder bug must cost one request, not the batch
            logger.exception("decoder failed")
            return Answer.from_error(exc)

    def process(self, requests: list[Request], meta: Optional[dict] = None,
                stats: Optional[BatchStats] = None) -> list[Answer]:
        """Answer every request; the valid ones share one runtime call per input shape."""
        decoded = [self.decode(r) for r in requests]
        answers = self.infer(decoded, meta, stats)
        return [bridge_safe(r, a, self.meta if meta is None else meta) for r, a in zip(requests, answers)]

    def infer(self, decoded: list[Decoded | Answer], meta: Optional[dict] = None,
              stats: Optional[BatchStats] = None) -> list[Answer]:
        meta = self.meta if meta is None else meta
        stats = stats if stats is not None else BatchStats()
        answers: list[Optional[Answer]] = [d if isinstance(d, Answer) else None for d in decoded]
        valid = [i for i, item in enumerate(decoded) if isinstance(item, Decoded)]
        keys = self._answer_from_cache(decoded, valid, answers, meta, stats) if self.cache is not None else {}
        valid = [i for i in valid if answers[i] is None]  # hits never join a batch
        if valid:
            try:
                batches = self.frontend.collate([decoded[i] for i in valid])
            except Exception as exc:  # a collate bug must answer every request, not lose the batch
                logger.exception("collating a batch failed")
                batches = []
                for i in valid:
                    answers[i] = Answer.from_error(exc)
            for positions, inputs in batches:
                indices = [valid[p] for p in positions]
                self._run_group([decoded[i] for i in indices], indices, inputs, answers, meta, stats)
        if keys:
            self._fill_cache(keys, answers, stats)
        for answer in answers:
            if answer.error_type:
                stats.errors[answer.error_type] = stats.errors.get(answer.error_type, 0) + 1
        return answers

    def _answer_from_cache(self, decoded: list, valid: list[int], answers: list[Optional[Answer]], meta: dict,
                           stats: BatchStats) -> dict[int, str]:
        """Answer the requests the cache holds; returns {index: key} of the misses, filled once encoded."""
        keys = {}
        for i in valid:
            try:
                key = response_key(self.manifest.name, self.manifest.version, meta, decoded[i])
            except Uncacheable as exc:  # runs uncached rather than risk two requests sharing an answer
                self.cache.bypass(exc)
                continue
            cached = self.cache.lookup(key, stats.cache)
            if cached is not None:
                answers[i] = Answer(**cached.answer_fields())
            else:
                keys[i] = key
        return keys

    def _fill_cache(self, keys: dict[int, str], answers: list[Optional[Answer]], stats: BatchStats) -> None:
        """Store the misses' 200 answers (errors are not cached: a failed run may succeed on retry)."""
        for i, key in keys.items():
            answer = answers[i]
            if answer is None or answer.status != 200:
                continue
            try:
                cached = CachedAnswer.of(answer)
            except (TypeError, ValueError) as exc:  # a body JSON cannot hold still answers, uncached
                self.cache.bypass(exc)
                continue
            answer.raw = cached.body  # the miss answers the very bytes a later hit will
            self.cache.store(key, cached, stats.cache)

    def _run_group(self, items: list[Decoded], indices: list[int], inputs: dict[str, np.ndarray],
                   answers: list[Optional[Answer]], meta: dict, stats: BatchStats) -> None:
        """One runtime call for requests whose rows stack; each request then gets its own slice of every output."""
        rows = sum(item.rows for item in items)
        started = time.perf_counter()
        try:
            outputs = self.runtime.run(inputs)
            short = [name for name, array in outputs.items() if array.shape[0] != rows]
            if short:
                raise InferenceFailed(f"model returned {outputs[short[0]].shape[0]} rows of '{short[0]}' "
                                      f"for {rows} inputs")
        except Exception as exc:
            logger.exception("inference failed for %d rows", rows)
            failure = exc if isinstance(exc, TspackError) else InferenceFailed(f"inference failed: {exc}")
            for i in indices:
                answers[i] = Answer.from_error(failure)
            return
        finally:
            stats.inference_ms += (time.perf_counter() - started) * 1000.0
            stats.runs += 1
        stats.rows += rows
        offset = 0
        for item, i in zip(items, indices):
            chunk = {name: array[offset:offset + item.rows] for name, array in outputs.items()}
            offset += item.rows
            try:
                encoded = self.frontend.encode(item, chunk, meta)
                answers[i] = encoded if isinstance(encoded, Answer) else Answer(200, encoded, rows=item.rows)
            except Exception as exc:  # one answer that fails to encode must not cost the others
                if not isinstance(exc, TspackError):
                    logger.exception("encoding an answer failed")
                answers[i] = Answer.from_error(exc)

    def describe(self) -> dict:
        from handlers.spec import to_dict

        m = self.manifest
        return {
            "model": m.name, "version": m.version, "built_at": m.built_at, "frontend": m.frontend,
            "runtime": {**self.runtime.describe(), "format": m.runtime.format, "file": m.runtime.file,
                        "sha256": m.runtime.sha256, "quantization": m.runtime.quantization},
            "inputs": to_dict(m.inputs), "outputs": list(m.outputs), "output": to_dict(m.output),
            **({"input": to_dict(m.inputs[0])} if len(m.inputs) == 1 else {}),
            "preprocessing": to_dict(m.image) if m.image else None, "text": to_dict(m.text) if m.text else None,
            "optimizations": list(m.optimizations), "validation": m.validation,
            "max_body_bytes": m.max_body_bytes,
            "cache": self.cache.describe() if self.cache is not None else None,
        }
