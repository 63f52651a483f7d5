"""Operations on a running TorchServe that take more than one API call: a zero-downtime version swap."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from archiver.errors import ApiError, ServerError
from archiver.operate.client import TorchServeClient


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


def wait_ready(client: TorchServeClient, model: str, version: str, workers: int, timeout_s: float) -> None:
    """Poll describe until `workers` workers of `model` `version` are READY."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            described = client.describe(model, version)
        except ApiError:
            described = []
        ready = sum(w.get("status") == "READY" for d in described for w in d.get("workers", []))
        if ready >= workers:
            return
        time.sleep(0.25)
    raise ServerError(f"{model} {version} had no {workers} READY worker(s) within {timeout_s:.0f}s")


def swap_version(client: TorchServeClient, model: str, archive: str, version: str, workers: int = 1,
                 drain_s: float = 2.0, retire: bool = True, probe: Optional[dict] = None,
                 ready_timeout_s: float = 300.0) -> SwapResult:
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
    # Asynchronous: TorchServe 0.12 holds a network thread for the whole of a synchronous register, stalling
    # the inference connections that thread serves (4 of 16 for 6-10 s, measured in RELIABILITY.md).
    client.register(archive, initial_workers=workers, synchronous=False)
    wait_ready(client, model, version, workers, ready_timeout_s)
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
