"""`make bench-ab`: the A/B paths under load (issue 5), against direct predictions to one variant.

For each path (direct `/predictions/digits`, the router archive, the router with a shadow variant, the
`.war` workflow), 8 client threads send keyed requests for `--seconds` (60 by default): every request
has a new key, so the observed split is measured over all of them. Then the router and the `.war` get one
lone client for `--lone-seconds` (the issue's trap: 1 in 40 sequential workflow requests stalled). Reported
per run: requests, errors, requests over 1 s and over the workflow's node timeout, the DAG executor's
timeouts (lost answers, counted in ts_log.log), p50/p95/p99/max latency, and the split between variants.

The load generator is Python (one persistent HTTP connection per client thread) rather than wrk,
because the split and the stall count need every response's variant and latency.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import os
import sys
import threading
import time

import numpy as np

from archiver.build import build
from archiver.deploy.properties import ServerConfig, entry_from_archive, write_config
from archiver.operate.server import free_ports, start, stop
from archiver.spec import DeploySpec, WorkflowSpec
from benchmarks.sections import machine, write_section
from handlers.spec import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORK = os.path.join(ROOT, "benchmarks", "work", "ab")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
ZOO = os.path.join(ROOT, "archiver", "zoo")
MARKERS = ("<!-- bench:ab:start -->", "<!-- bench:ab:end -->")
STALL_S = 1.0
# The generated workflow's node timeout: a lost answer costs this much.
NODE_TIMEOUT_S = WorkflowSpec().timeout_ms / 1000.0
EXECUTOR_TIMEOUT = "Timed out while executing"


def executor_timeouts(log_dir: str) -> int:
    """Lost node answers the DAG executor waited out so far (TorchServe logs each before its retry)."""
    try:
        with open(os.path.join(log_dir, "ts_log.log"), encoding="utf-8", errors="replace") as f:
            return sum(EXECUTOR_TIMEOUT in line for line in f)
    except OSError:
        return 0


def artifacts(store: str) -> None:
    """digits 1.0 and 2.0 (seeded weights), an ONNX 2.0 for the shadow, the router (with and without a
    shadow) and the workflow."""
    import torch

    from archiver.zoo.digits_cnn import DigitsCNN

    os.makedirs(WORK, exist_ok=True)
    weights = {}
    for version, seed in (("1.0", 1), ("2.0", 2)):
        torch.manual_seed(seed)
        weights[version] = os.path.join(WORK, f"digits_{version}.pt")
        torch.save(DigitsCNN().state_dict(), weights[version])
    serving = {"batch_size": 8, "max_batch_delay_ms": 1, "workers": 1}
    model = {"name": "digits", "input": {"shape": [1, 8, 8]}, "samples": {"count": 32}, "serving": serving,
             "output": {"kind": "classification", "top_k": 1}}
    variants = [{"name": "a", "archive": "digits_v1.0.mar", "weight": 0.5},
                {"name": "b", "archive": "digits_v2.0.mar", "weight": 0.5}]
    spec = parse(DeploySpec, {"model_store": store, "models": [
        {**model, "version": "1.0", "source": {"model_class": f"{ZOO}/digits_cnn.py:DigitsCNN",
                                               "weights": weights["1.0"]}},
        {**model, "version": "2.0", "source": {"model_class": f"{ZOO}/digits_cnn.py:DigitsCNN",
                                               "weights": weights["2.0"]},
         "artifacts": [{"format": "torchscript"}, {"format": "onnx", "id": "onnx"}]}],
        "ab": [{"name": "ab", "version": "1.0", "variants": variants, "serving": serving},
               {"name": "ab-shadow", "version": "1.0", "variants": variants, "serving": serving,
                "shadow": {"name": "shadow", "archive": "digits-onnx_v2.0.mar"}, "workflow": {"enabled": False}}]})
    result = build(spec, progress=True)
    if result.failed:
        raise SystemExit(f"build failed: {[(e.key, e.error) for e in result.failed]}")


def run_load(url: str, key: str, body: bytes, seconds: float, clients: int, keyed: bool) -> dict:
    """`clients` threads, each on one persistent connection, for `seconds`; every request has a new key."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port, path = parts.hostname, parts.port, parts.path
    latencies: list[float] = []
    variants: dict[str, int] = {}
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        sent = 0
        while time.monotonic() < deadline:
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            if keyed:
                headers["X-Request-Key"] = f"user-{index}-{sent}"
            sent += 1
            started = time.perf_counter()
            response = None
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                elapsed = time.perf_counter() - started
                variant = json.loads(payload).get("variant", "-") if response.status == 200 else None
                if response.will_close:
                    connection.close()
                    connection = http.client.HTTPConnection(host, int(port), timeout=60)
            except (OSError, http.client.HTTPException, ValueError):
                elapsed, variant = time.perf_counter() - started, None
                connection.close()
                connection = http.client.HTTPConnection(host, int(port), timeout=60)
            with lock:
                latencies.append(elapsed)
                if variant is None or response is None or response.status != 200:
                    errors[0] += 1
                else:
                    variants[variant] = variants.get(variant, 0) + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ms = np.array(latencies) * 1000.0
    answered = sum(variants.values())
    return {"requests": len(latencies), "errors": errors[0], "stalls_over_1s": int(np.sum(ms > STALL_S * 1000)),
            "over_node_timeout": int(np.sum(ms > NODE_TIMEOUT_S * 1000)), "clients": clients,
            "req_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
            "split": {v: n / answered for v, n in sorted(variants.items())} if answered else {}}


def markdown(result: dict) -> str:
    rows = result["rows"]
    direct = rows["direct"]
    lines = [MARKERS[0], "## A/B paths under load", "",
             f"Machine: {result['machine']}. Date: {result['date']}. Command: `make bench-ab` "
             f"({result['seconds']:.0f} s per path, {result['clients']} clients, a new X-Request-Key on every "
             "request, digits CNN, 50/50).", "",
             f"| path | clients | requests | req/s | errors | over 1 s | over {NODE_TIMEOUT_S:g} s | executor timeouts "
             "| p50 ms | p95 ms | p99 ms | max ms | p99 / direct | split a / b |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        split = " / ".join(f"{100 * row['split'].get(v, 0):.1f}%" for v in ("a", "b")) if name != "direct" else "-"
        ratio = f"{row['p99_ms'] / direct['p99_ms']:.2f}" if row["clients"] == direct["clients"] else "-"
        lines.append(f"| {name} | {row['clients']} | {row['requests']:,} | {row['req_per_s']:,.0f} | {row['errors']} | "
                     f"{row['stalls_over_1s']} | {row['over_node_timeout']} | {row['executor_timeouts']} | "
                     f"{row['p50_ms']:.1f} | {row['p95_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['max_ms']:.0f} | {ratio} | {split} |")
    router, war, shadow = rows["router"], rows["workflow (.war)"], rows["router+shadow"]
    lone = rows.get("workflow (.war), lone client")
    lines += ["", "Targets for the recommended path (router): zero requests over 1 s "
              f"({'met' if router['stalls_over_1s'] == 0 else 'MISSED'}), zero errors "
              f"({'met' if router['errors'] == 0 else 'MISSED'}), p99 <= 1.5x direct "
              f"({'met' if router['p99_ms'] <= 1.5 * direct['p99_ms'] else 'MISSED'}: "
              f"{router['p99_ms'] / direct['p99_ms']:.2f}x), split within 2 points of 50/50 over "
              f"{router['requests']:,} keyed requests "
              f"({'met' if abs(router['split'].get('a', 0) - 0.5) <= 0.02 else 'MISSED'}).",
              "", "The shadow's budget: it never holds the primary's answer (it runs after the answer is formed, "
              "from a bounded queue that drops when full), and its CPU cost keeps the router's p99 within 1.5x "
              f"direct ({'met' if shadow['p99_ms'] <= 1.5 * direct['p99_ms'] else 'MISSED'}: "
              f"{shadow['p99_ms'] / direct['p99_ms']:.2f}x with every request shadowed, sample_rate 1.0); "
              f"throughput falls to {shadow['req_per_s'] / router['req_per_s']:.0%} of the router's, since the "
              "shadow runs a second model on the same cores.",
              "", "The `.war` runs TorchServe's DAG executor (route -> a, b -> merge): four worker hops per request "
              f"instead of one, and its lost-answer race is still there. Under load: {war['executor_timeouts']} "
              f"executor timeouts (lost answers) in {war['requests']:,} requests, {war['over_node_timeout']} "
              f"requests over {NODE_TIMEOUT_S:g} s, {war['stalls_over_1s']} over 1 s, "
              f"the slowest {war['max_ms'] / 1000:.2f} s."]
    if lone:
        lines += ["", f"With one client, sequentially (the issue's measurement): {lone['executor_timeouts']} executor "
                  f"timeouts in {lone['requests']:,} requests, {lone['over_node_timeout']} over {NODE_TIMEOUT_S:g} s, "
                  "the slowest "
                  f"{lone['max_ms'] / 1000:.2f} s (router, one client: p99 {rows['router, lone client']['p99_ms']:.1f} "
                  f"ms; .war: {lone['p99_ms']:.1f} ms)."]
    workflow = WorkflowSpec()
    lines += ["", f"The generated spec only bounds the damage: a {workflow.timeout_ms} ms node timeout with "
              f"{workflow.retry_attempts} retries instead of TorchServe's 10 s (a lost answer costs "
              f"{NODE_TIMEOUT_S:g} s, not 10 s), and batching with a 5 ms delay on every "
              "node, so that a node's answer is rarely ready before the executor attaches its promise.", MARKERS[1]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--lone-seconds", type=float, default=30.0, help="one sequential client (0: skip)")
    args = parser.parse_args()
    store = os.path.join(WORK, "store")
    artifacts(store)
    ports = free_ports(5)
    entries = [entry_from_archive(name, store) for name in ("digits_v1.0.mar", "ab_v1.0.mar", "ab-shadow_v1.0.mar")]
    config = ServerConfig(model_store=store, inference_port=ports[0], management_port=ports[1], metrics_port=ports[2],
                          grpc_inference_port=ports[3], grpc_management_port=ports[4], models=tuple(entries),
                          model_api=True)
    run_dir = os.path.join(WORK, "server")
    handle = start(write_config(config, os.path.join(run_dir, "config.properties")), os.path.join(run_dir, "run"))
    try:
        client = handle.client()
        client.register_workflow("ab_v1.0.war")
        key = json.load(open(handle.key_file))["inference"]["key"]
        body = json.dumps({"data": np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8).tolist()}).encode()
        paths = {"direct": ("predictions/digits", False), "router": ("predictions/ab", True),
                 "router+shadow": ("predictions/ab-shadow", True), "workflow (.war)": ("wfpredict/ab", True)}
        runs = [(name, path, keyed, args.seconds, args.clients) for name, (path, keyed) in paths.items()]
        if args.lone_seconds > 0:
            runs += [(f"{name}, lone client", paths[name][0], True, args.lone_seconds, 1)
                     for name in ("router", "workflow (.war)")]
        rows = {}
        for name, path, keyed, seconds, clients in runs:
            print(f"{name}: {seconds:.0f} s at {clients} clients", flush=True)
            timeouts_before = executor_timeouts(handle.log_dir)
            rows[name] = run_load(f"{handle.inference_url}/{path}", key, body, seconds, clients, keyed)
            rows[name]["executor_timeouts"] = executor_timeouts(handle.log_dir) - timeouts_before
            print(f"  {rows[name]}", flush=True)
    finally:
        stop(handle.run_dir)
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(),
              "seconds": args.seconds, "clients": args.clients, "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "ab.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    section = markdown(result)
    write_section(MARKERS, section)
    print(section)
    return 0



if __name__ == "__main__":
    sys.exit(main())
