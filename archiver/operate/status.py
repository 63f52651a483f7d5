"""`tspack serve status` and `tspack versions`: health, versions, workers, build figures, error rate."""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Optional

import requests

from archiver.errors import ApiError, ServerError
from archiver.operate.client import TorchServeClient

HISTORY_FILE = "metrics_history.json"
HISTORY_KEEP_S = 900
SAMPLE = re.compile(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+([-+0-9.eEinfNa]+)')
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict, float]]:
    """Samples of a Prometheus text exposition: (metric name, labels, value)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        if match:
            labels = dict(LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric_sum(samples: list[tuple[str, dict, float]], name: str, **labels: str) -> float:
    return sum(v for n, tags, v in samples if n == name and all(tags.get(k) == want for k, want in labels.items()))


def model_versions(client: TorchServeClient, model: str) -> list[dict]:
    """Each version: workers, default flag, and the build figures its archive recorded."""
    described = client.describe(model, "all")
    listing = {m["modelName"]: m.get("modelUrl") for m in client.models()}
    versions = []
    for d in described:
        version = d.get("modelVersion")
        workers = d.get("workers", [])
        ready = sum(1 for w in workers if w.get("status") == "READY")
        entry = {"version": version, "archive": d.get("modelUrl"), "default": listing.get(model) == d.get("modelUrl"),
                 "workers": f"{ready}/{len(workers)} ready", "ready_workers": ready, "batch_size": d.get("batchSize")}
        entry.update(_build_figures(client, model, version))
        versions.append(entry)
    return sorted(versions, key=lambda v: str(v["version"]))


def endpoints(inference_url: str, model: str, oip_url: str = "") -> dict[str, str]:
    """Where clients send a model's requests: TorchServe's own route and the Open Inference Protocol v2 one.

    With the tspack OIP gateway (`oip_url`), OIP goes to it: it has every OIP route, versions included. Without
    it, to TorchServe's own OIP infer, which reaches only the default version (`/v2/models/NAME/versions/V/infer`
    answers 501), so a version is addressed through `/predictions/NAME/V`, which takes the same OIP bodies.
    """
    oip = f"{oip_url or inference_url}/v2/models/{model}"
    return {"predictions": f"{inference_url}/predictions/{model}", "oip": f"{oip}/infer",
            **({"oip_version": f"{oip}/versions/VERSION/infer", "oip_metadata": oip} if oip_url else {})}


def format_endpoints(inference_url: str, model: str, oip_url: str = "") -> str:
    urls = endpoints(inference_url, model, oip_url)
    oip = urls["oip"].replace("/infer", "[/versions/VERSION]/infer") if oip_url else urls["oip"]
    return f"POST {urls['predictions']}[/VERSION]   OIP v2: POST {oip}"


def _build_figures(client: TorchServeClient, model: str, version: str) -> dict:
    """The handler's own description (runtime, build time, validation), when a worker can answer."""
    try:
        described = client.describe(model, version, customized=True)
        meta = described[0].get("customizedMetadata")
        data = json.loads(meta) if isinstance(meta, str) else (meta or {})
    except (ApiError, requests.RequestException, ValueError, IndexError, KeyError):
        return {}
    validation = data.get("validation") or {}

    def fmt(value: Any, pct: bool = False) -> Optional[str]:
        if value is None:
            return None
        return f"{100 * value:.1f}%" if pct else f"{value:.1e}"

    batching = data.get("batching") or {}
    zero_wait = f"zero-wait batch {batching.get('max_batch')}" if batching.get("mode") == "zero_wait" else None
    return {"built_at": data.get("built_at"), "runtime": (data.get("runtime") or {}).get("runtime"),
            "max_abs_error": fmt(validation.get("max_abs_error")), "accuracy": fmt(validation.get("accuracy"), True),
            # TorchServe's batchSize is 1 for a zero-wait worker, which batches on its own
            **({"batching": zero_wait} if zero_wait else {})}


def request_counts(client: TorchServeClient) -> dict[str, float]:
    """Prediction answers by status class, as the handlers counted them. TorchServe's own Requests2XX/4XX/5XX
    would also count pings, management calls and this command's describes."""
    counts = {"2XX": 0.0, "4XX": 0.0, "5XX": 0.0}
    for name, labels, value in parse_prometheus(client.metrics()):
        kind = f"{labels.get('Status', '0')[:1]}XX"
        if name == "tspack_requests_total" and kind in counts:
            counts[kind] += value
    return counts


def _error_rate(run_dir: str, counts: dict[str, float]) -> dict:
    """Error rate over about the last minute, from counter snapshots kept in the run folder."""
    path = os.path.join(run_dir, HISTORY_FILE)
    now = time.time()
    try:
        with open(path, encoding="utf-8") as f:
            history = json.load(f)
    except (OSError, ValueError):
        history = []
    history = [h for h in history if now - h["t"] <= HISTORY_KEEP_S]
    older = [h for h in history if now - h["t"] >= 60]
    base = older[-1] if older else {"t": None, "counts": {k: 0.0 for k in counts}}
    if any(counts[k] < base["counts"].get(k, 0.0) for k in counts):  # counters went back: the server restarted
        history, base = [], {"t": None, "counts": {k: 0.0 for k in counts}}
    history.append({"t": now, "counts": counts})
    with open(path, "w", encoding="utf-8") as f:
        json.dump(history, f)
    delta = {k: counts[k] - base["counts"].get(k, 0.0) for k in counts}
    total = sum(delta.values())
    window = f"last {now - base['t']:.0f}s" if base["t"] else "since start"
    return {"window": window, "requests": int(total), "errors_4xx": int(delta["4XX"]), "errors_5xx": int(delta["5XX"]),
            "error_rate": (delta["4XX"] + delta["5XX"]) / total if total else 0.0}


def server_status(run_dir: str) -> dict:
    from archiver.operate.server import ServerHandle

    run_dir = os.path.abspath(run_dir)
    try:
        handle = ServerHandle.load(run_dir)
    except ServerError as exc:
        return {"healthy": False, "running": False, "message": str(exc)}
    status: dict[str, Any] = {"running": handle.alive(), "pid": handle.pid, "started_at": handle.started_at,
                              "inference_url": handle.inference_url, "oip_url": handle.oip_url, "healthy": False,
                              "models": {}}
    if not status["running"]:
        status["message"] = f"the recorded TorchServe (pid {handle.pid}) is not running"
        return status
    client = handle.client(timeout=10)
    try:
        status["ping"] = client.ping().get("status")
        for model in client.models():
            status["models"][model["modelName"]] = model_versions(client, model["modelName"])
            status.setdefault("endpoints", {})[model["modelName"]] = endpoints(
                handle.inference_url, model["modelName"], handle.oip_url)
        status["traffic"] = _error_rate(run_dir, request_counts(client))
    except (ApiError, requests.RequestException) as exc:
        status["message"] = str(exc)
        return status
    if handle.oip_url:
        from archiver.operate.oip_process import running

        status["oip_gateway"] = {"url": handle.oip_url, "pid": handle.oip_pid,
                                 "running": running(handle.oip_pid, handle.run_dir)}
    status["healthy"] = status["ping"] == "Healthy" and all(
        any(v["ready_workers"] for v in versions) for versions in status["models"].values()) and (
        status.get("oip_gateway", {}).get("running", True))
    status["record"] = _record_summary(run_dir)
    return status


def _record_summary(run_dir: str) -> Optional[dict]:
    """Where the deployment record is, when it was last written, and how many versions it holds."""
    from archiver.errors import DeploymentError
    from archiver.operate.deployment import load, record_path

    try:
        deployment = load(run_dir)
    except DeploymentError as exc:
        return {"path": record_path(run_dir), "error": str(exc)}
    if deployment is None:
        return None
    return {"path": record_path(run_dir), "updated_at": deployment.updated_at, "versions": deployment.version_count()}


def format_status(status: dict) -> str:
    if not status.get("running"):
        return f"TorchServe: not running. {status.get('message', '')}"
    lines = [f"TorchServe pid {status['pid']} since {status['started_at']}: "
             f"{'healthy' if status['healthy'] else 'UNHEALTHY'} (ping: {status.get('ping', '-')})"]
    for model, versions in status.get("models", {}).items():
        for v in versions:
            mark = " (default)" if v["default"] else ""
            batching = v.get("batching") or f"batch {v.get('batch_size')}"
            lines.append(f"  {model} {v['version']}{mark}: {v['workers']}, {batching}, "
                         f"runtime {v.get('runtime') or '-'}, built {v.get('built_at') or '-'}")
        lines.append(f"    {format_endpoints(status['inference_url'], model, status.get('oip_url', ''))}")
    gateway = status.get("oip_gateway")
    if gateway:
        lines.append(f"  OIP v2 gateway {gateway['url']} (pid {gateway['pid']}): "
                     + ("running; probes /v2/health/live|ready take no token" if gateway["running"] else "NOT RUNNING"))
    traffic = status.get("traffic")
    if traffic:
        lines.append(f"  traffic ({traffic['window']}): {traffic['requests']} requests, "
                     f"{traffic['errors_4xx']} 4xx, {traffic['errors_5xx']} 5xx, "
                     f"error rate {100 * traffic['error_rate']:.2f}%")
    record = status.get("record")
    if record:
        lines.append(f"  record: {record['path']}, " + (record["error"] if "error" in record else
                     f"{record['versions']} version(s), written {record['updated_at']}"))
    if status.get("message"):
        lines.append("  " + status["message"])
    return "\n".join(lines)
