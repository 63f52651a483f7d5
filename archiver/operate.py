"""Operations on a running TorchServe that take more than one API call: a zero-downtime version swap."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from archiver.client import TorchServeClient
from archiver.errors import ApiError, ServerError


@dataclass
class SwapResult:
    model: str
    new_version: str
    old_versions: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


def _versions(client: TorchServeClient, model: str) -> list[str]:
    try:
        return [d["modelVersion"] for d in client.versions(model)]
    except ApiError as exc:
        if exc.status == 404:
            return []
        raise


def swap_version(client: TorchServeClient, model: str, archive: str, version: str, workers: int = 1,
                 drain_s: float = 2.0, retire: bool = True, probe: Optional[dict] = None) -> SwapResult:
    """Register `archive` as `version` of `model`, make it the default, then retire the older versions.

    Order matters for zero downtime: the new version's workers are READY (synchronous register) before
    it becomes the default; older versions keep serving what they already queued for `drain_s` seconds
    after the switch, and only then are unregistered.

    Args:
        probe: a request body sent to the new version before it becomes the default; a non-200 stops the
            swap and unregisters the new version again.
    """
    result = SwapResult(model=model, new_version=version)
    before = _versions(client, model)
    if version in before:
        raise ServerError(f"{model} {version} is already registered; swap to a new version")
    client.register(archive, initial_workers=workers, synchronous=True)
    result.steps.append(f"registered {model} {version} ({workers} worker(s) ready)")
    if probe is not None:
        response = client.predict(model, probe, version=version)
        if response.status_code != 200:
            client.unregister(model, version)
            raise ServerError(f"{model} {version} answered the probe with {response.status_code}: "
                              f"{response.text[:200]}; swap aborted, the old version keeps serving")
        result.steps.append(f"probe answered 200 by {model} {version}")
    client.set_default(model, version)
    result.steps.append(f"{model} {version} is the default")
    if retire and before:
        time.sleep(drain_s)
        for old in before:
            client.unregister(model, old)
            result.old_versions.append(old)
            result.steps.append(f"unregistered {model} {old} after a {drain_s:g}s drain")
    return result
