"""TorchServe handler for A/B tests: one archive that holds the variants and routes each request to one.

The recommended A/B path. It never touches TorchServe's workflow executor: a request is one job for
one worker, which decides the variant (sticky by key, else weighted at random), runs only that
variant's model, and answers with the variant and model version named in the body and in headers.
An optional shadow variant runs off the answer path (see handlers/shadow.py).
Each variant is a separately built, validated artifact, stored as-is under `variants/<name>/`.
TorchServe wants exactly one class here.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from typing import Any, Optional

from handlers.base import ServingHandler, warm_up
from handlers.cache import cache_for
from handlers.device import placement_for
from handlers.errors import ModelLoadError, TspackError
from handlers.metrics import HandlerMetrics
from handlers.pipeline import Answer, BatchStats, Pipeline
from handlers.request import Request
from handlers.routing import ROUTER_MANIFEST_FILE, RouterManifest, body_limit, json_body
from handlers.shadow import ShadowRunner

logger = logging.getLogger(__name__)

VARIANT_HEADER = "X-Tspack-Variant"
VERSION_HEADER = "X-Tspack-Model-Version"


class ABRouterHandler(ServingHandler):
    def __init__(self):
        super().__init__()
        self.manifest: Optional[RouterManifest] = None
        self.pipelines: dict[str, Pipeline] = {}
        self.shadow: Optional[ShadowRunner] = None
        self.rng = random.Random()
        self.body_limit: Optional[int] = None

    def load(self, context: Any) -> None:
        model_dir = context.system_properties["model_dir"]
        path = os.path.join(model_dir, ROUTER_MANIFEST_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                self.manifest = RouterManifest.from_json(json.load(f))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{ROUTER_MANIFEST_FILE}: cannot read the router manifest: {exc}") from exc
        placement = placement_for(context)
        # The shadow loads first so that the primaries' runtimes have the last word on shared torch settings.
        shadow = self.manifest.shadow
        shadow_pipeline = Pipeline.load(os.path.join(model_dir, shadow.folder), placement) if shadow else None
        for variant in self.manifest.policy.variants:
            # Each variant has its own cache, looked up after routing, so a sticky user keeps their variant.
            self.pipelines[variant.name] = Pipeline.load(os.path.join(model_dir, variant.folder), placement,
                                                         cache_for(context))
            warm_up(self.pipelines[variant.name])
        first = next(iter(self.pipelines.values())).manifest
        self.body_limit = max(body_limit(p.manifest) for p in self.pipelines.values())
        self.metrics = HandlerMetrics(context, first)
        self.metrics.model = getattr(context, "model_name", None) or self.manifest.name
        if shadow_pipeline is not None:
            warm_up(shadow_pipeline)
            self.shadow = ShadowRunner(shadow_pipeline, shadow.name, self.metrics.shadow, shadow.sample_rate,
                                       shadow.queue_size)
        variants = [(v.name, v.weight, self.pipelines[v.name].manifest.version) for v in self.manifest.policy.variants]
        logger.info("tspack router %s %s: variants %s, shadow %s", self.manifest.name, self.manifest.version,
                    variants, shadow.name if shadow else None)

    def route(self, requests: list) -> tuple[dict[str, list[int]], dict[int, Answer]]:
        """Variant name -> request indices; requests whose routing key is invalid get their 4xx here."""
        policy = self.manifest.policy
        groups: dict[str, list[int]] = defaultdict(list)
        refused: dict[int, Answer] = {}
        for idx, request in enumerate(requests):
            body = json_body(request, self.body_limit) if policy.sticky_field else None
            if body is not None:
                request.payload = body  # parsed once: the variant's front end accepts a decoded body
            try:
                groups[policy.choose(policy.key_of(request, body), self.rng).name].append(idx)
            except TspackError as exc:
                refused[idx] = Answer.from_error(exc)
        return groups, refused

    def answer(self, requests: list[Request], context: Any) -> list[Answer]:
        groups, refused = self.route(requests)
        answers: list[Optional[Answer]] = [refused.get(i) for i in range(len(requests))]
        for name, indices in groups.items():
            pipeline = self.pipelines[name]
            started = time.perf_counter()
            stats = BatchStats()
            served = pipeline.process([requests[i] for i in indices], {**pipeline.meta, "variant": name}, stats)
            self.metrics.record(served, stats, (time.perf_counter() - started) * 1000.0,
                                version=pipeline.manifest.version, variant=name)
            for i, answer in zip(indices, served):
                answer.headers = {**answer.headers, VARIANT_HEADER: name, VERSION_HEADER: pipeline.manifest.version}
                answers[i] = answer
            if self.shadow is not None:
                self.shadow.submit(name, [(requests[i], answers[i]) for i in indices])
        if refused:
            errors = Counter(a.error_type for a in refused.values())
            self.metrics.record(list(refused.values()), BatchStats(errors=dict(errors)), 0.0, variant="unrouted")
        return answers

    def describe(self) -> dict:
        from handlers.spec import to_dict

        policy = self.manifest.policy
        return {
            "router": self.manifest.name, "version": self.manifest.version, "built_at": self.manifest.built_at,
            "policy": {"variants": [to_dict(v) for v in policy.variants], "sticky_header": policy.sticky_header,
                       "sticky_field": policy.sticky_field},
            "shadow": to_dict(self.manifest.shadow) if self.manifest.shadow else None,
            "variants": {name: p.describe() for name, p in self.pipelines.items()},
        }
