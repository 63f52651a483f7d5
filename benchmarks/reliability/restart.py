"""A restart after a frontend crash (kill -9): `tspack serve start` brings back the recorded deployment, and
every answer after readiness comes from the recorded default version."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time

from archiver.operate.server import ServerHandle, free_ports, stop
from benchmarks.reliability.load import frontend_pid
from benchmarks.reliability.result import Result
from benchmarks.reliability.rig import MODEL, Rig, good_sample, tspack
from benchmarks.reliability.settings import Settings


def _restart_clients(handle_dir: str, done: threading.Event, clients: int) -> list[tuple[float, str, str]]:
    """Closed-loop clients that read the server's key file on every call (keys change at a restart):
    (end time, status or error class, answered version) per request."""
    body = {"data": good_sample().tolist()}
    results: list[list[tuple[float, str, str]]] = [[] for _ in range(clients)]

    def run(index: int) -> None:
        client = ServerHandle.load(handle_dir).client(timeout=10)
        while not done.is_set() and len(results[index]) < 20_000:
            try:
                response = client.predict(MODEL, body)
                version = response.json().get("version", "") if response.status_code == 200 else ""
                results[index].append((time.monotonic(), str(response.status_code), version))
            except Exception as exc:  # the server is down: connection refused, a key file being rewritten
                results[index].append((time.monotonic(), type(exc).__name__, ""))
                done.wait(0.05)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    done.wait()
    for thread in threads:
        thread.join(30)
    return sorted(r for rows in results for r in rows)


def scenario_restart(rig: Rig, settings: Settings) -> dict:
    """digits 1.0 at start, 2.0 registered and made the default with the CLI; clients run while the java frontend
    is killed (-9) and `tspack serve start` restores the record: every answer after readiness must be 2.0."""
    clients = 4
    result = Result("restart", "Restart after a frontend crash (kill -9): the recorded default comes back",
                    f"{clients} clients, closed loop, key file re-read per request")
    folder = os.path.join(rig.root, "restart")
    shutil.rmtree(folder, ignore_errors=True)
    store, run_dir = os.path.join(folder, "store"), os.path.join(folder, "run")
    os.makedirs(store)
    for name in (f"{MODEL}_v1.0.mar", f"{MODEL}_v2.0.mar"):
        shutil.copy2(os.path.join(rig.store, name), store)
    ports = [str(p) for p in free_ports(6)]
    config = os.path.join(folder, "config.properties")
    steps = [("config", "--load", f"{MODEL}_v1.0.mar", "--enable-model-api", "--model-store", store, "--out", config,
              "--inference-port", ports[0], "--management-port", ports[1], "--metrics-port", ports[2],
              "--grpc-ports", ports[3], ports[4], "--oip-port", ports[5]),
             ("serve", "start", "--config", config, "--run-dir", run_dir, "--fresh"),
             ("register", os.path.join(store, f"{MODEL}_v2.0.mar"), "--set-default", "--run-dir", run_dir)]
    try:
        for step in steps:
            done = tspack(*step)
            if not result.check(f"tspack {step[0]} {step[1]}", done.returncode == 0, done.stderr.strip()[-300:]):
                return result.done()
        server_pid = ServerHandle.load(run_dir).pid
        stop_clients = threading.Event()
        collected: list = []
        worker = threading.Thread(target=lambda: collected.extend(_restart_clients(run_dir, stop_clients, clients)),
                                  daemon=True)
        worker.start()
        time.sleep(settings.swap_before_s)
        java = frontend_pid(server_pid)
        killed_at = time.monotonic()
        os.kill(java, signal.SIGKILL)
        restart = tspack("serve", "start", "--config", config, "--run-dir", run_dir)
        ready_at = time.monotonic()
        time.sleep(settings.swap_after_s)
        stop_clients.set()
        worker.join(60)
    finally:
        stop(run_dir, quiet=True)
    result.check("tspack serve start after the crash exits 0", restart.returncode == 0,
                 (restart.stdout + restart.stderr).strip()[-400:])
    result.check("it says what it restored", "digits 2.0 (default)" in restart.stdout, restart.stdout.strip()[-300:])
    before = [r for r in collected if r[0] < killed_at]
    after = [r for r in collected if r[0] > ready_at]
    down = [r for r in collected if killed_at <= r[0] <= ready_at]
    result.check("before the crash: 2.0 answers", before and all(r[1:] == ("200", "2.0") for r in before),
                 status_counts_of(before))
    result.check("after readiness: every request answered 200 by 2.0 (the recorded default)",
                 after and all(r[1:] == ("200", "2.0") for r in after), status_counts_of(after))
    result["requests"] = len(collected)
    result["failures"] = sum(1 for r in after if r[1:] != ("200", "2.0"))
    result["recovery"] = f"{ready_at - killed_at:.1f} s from kill -9 to ready"
    result["duration_s"] = round((collected[-1][0] - collected[0][0]) if collected else 0.0, 1)
    result.figures.update({"restart_s": round(ready_at - killed_at, 2), "before": status_counts_of(before),
                           "during_downtime": status_counts_of(down), "after": status_counts_of(after)})
    return result.done()


def status_counts_of(rows: list[tuple[float, str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, status, version in rows:
        key = f"{status} {version}".strip()
        counts[key] = counts.get(key, 0) + 1
    return counts
