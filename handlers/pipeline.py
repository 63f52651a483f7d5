"""Decode each request alone, infer once for all valid rows, answer each request alone.

A `Pipeline` is one served artifact: its manifest, front end and runtime. Handlers hold one; the A/B
router holds one per variant. Bad requests get their own 4xx answer and never fail their batch.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from handlers.device import Placement
from handlers.errors import InferenceFailed, TspackError, UnsupportedMediaType, error_response
from handlers.frontends import frontend_for
from handlers.request import Decoded, Request
from handlers.runtimes import load_runtime
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


@dataclass
class BatchStats:
    """What one `Pipeline.process` call did, for metrics and logs."""

    rows: int = 0
    inference_ms: float = 0.0
    runs: int = 0
    errors: dict = field(default_factory=dict)


class Pipeline:
    """One artifact ready to serve: decode -> run -> encode."""

    def __init__(self, manifest: ArtifactManifest, frontend: Any, runtime: Any):
        self.manifest = manifest
        self.frontend = frontend
        self.runtime = runtime

    @classmethod
    def load(cls, model_dir: str, placement: Placement) -> Pipeline:
        manifest = ArtifactManifest.load(model_dir)
        runtime = load_runtime(manifest, model_dir, placement)
        return cls(manifest, frontend_for(manifest), runtime)

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
        return self.infer(decoded, meta, stats)

    def infer(self, decoded: list[Decoded | Answer], meta: Optional[dict] = None,
              stats: Optional[BatchStats] = None) -> list[Answer]:
        meta = self.meta if meta is None else meta
        stats = stats if stats is not None else BatchStats()
        answers: list[Optional[Answer]] = [d if isinstance(d, Answer) else None for d in decoded]
        # Rows can only be stacked when their sample shapes agree (free axes, e.g. sequence length, may not).
        groups: dict[tuple, list[int]] = defaultdict(list)
        for idx, item in enumerate(decoded):
            if isinstance(item, Decoded):
                groups[(item.array.shape[1:], item.array.dtype.str)].append(idx)
        for indices in groups.values():
            self._run_group([decoded[i] for i in indices], indices, answers, meta, stats)
        for answer in answers:
            if answer.error_type:
                stats.errors[answer.error_type] = stats.errors.get(answer.error_type, 0) + 1
        return answers

    def _run_group(self, items: list[Decoded], indices: list[int], answers: list[Optional[Answer]], meta: dict,
                   stats: BatchStats) -> None:
        """One runtime call for requests whose rows stack; each request then gets its own slice."""
        batch = items[0].array if len(items) == 1 else np.concatenate([item.array for item in items])
        started = time.perf_counter()
        try:
            outputs = self.runtime.run(batch)
            if outputs.shape[0] != batch.shape[0]:
                raise InferenceFailed(f"model returned {outputs.shape[0]} rows for {batch.shape[0]} inputs")
        except Exception as exc:
            logger.exception("inference failed for %d rows", batch.shape[0])
            failure = exc if isinstance(exc, TspackError) else InferenceFailed(f"inference failed: {exc}")
            for i in indices:
                answers[i] = Answer.from_error(failure)
            return
        finally:
            stats.inference_ms += (time.perf_counter() - started) * 1000.0
            stats.runs += 1
        stats.rows += batch.shape[0]
        offset = 0
        for item, i in zip(items, indices):
            chunk = outputs[offset:offset + item.rows]
            offset += item.rows
            try:
                answers[i] = Answer(200, self.frontend.encode(item, chunk, meta), rows=item.rows)
            except Exception as exc:  # one answer that fails to encode must not cost the others
                logger.exception("encoding an answer failed")
                answers[i] = Answer.from_error(exc)

    def describe(self) -> dict:
        from handlers.spec import to_dict

        m = self.manifest
        return {
            "model": m.name, "version": m.version, "built_at": m.built_at, "frontend": m.frontend,
            "runtime": {**self.runtime.describe(), "format": m.runtime.format, "file": m.runtime.file,
                        "sha256": m.runtime.sha256, "quantization": m.runtime.quantization},
            "input": to_dict(m.input), "output": to_dict(m.output),
            "preprocessing": to_dict(m.image) if m.image else None,
            "optimizations": list(m.optimizations), "validation": m.validation,
            "max_body_bytes": m.max_body_bytes,
        }
