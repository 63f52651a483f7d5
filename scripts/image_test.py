"""`make image-test`: build the serving image and check it against the real container (GitHub issue 16).

1. the demo's archives (trained and built when missing), then `scripts/image.sh` (skip with --no-build);
2. the Python packages in the image against the host venv's `pip freeze`: the same versions must serve;
3. `docker run`, time from the container's start until /ping is Healthy with the key from the container's
   key_file.json, and until Docker's own health check says healthy;
4. a prediction with curl and that key, and the metrics port;
5. SIGTERM under load (`docker kill --signal TERM`, then wait up to the grace period, as `docker stop` and
   Kubernetes do): the container must exit in time, with no request answered 5xx and none dropped, that is
   sent before SIGTERM reached the container and never answered. Requests sent after SIGTERM are counted
   apart: refused at connect once the frontend closed its ports, or sent on a kept-alive connection that the
   stopping server closed without reading an answer (HTTP lets a client resend those on a new connection);
6. a restart on the same state volume (stale key file), timed again;
7. image size and times, printed and written into docker/README.md and build/image/image-test.json.

The client talks to the container's own address on Docker's bridge, not through a published port: Docker's
userland proxy accepts every connection itself, so a refused connection would look like one closed without an answer.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STATE = "/home/model-server/state"
README = os.path.join(ROOT, "docker", "README.md")
RESULTS = os.path.join(ROOT, "build", "image", "image-test.json")
BEGIN, END = "<!-- image-test:begin -->", "<!-- image-test:end -->"
DEMO_ARCHIVES = ("digits_v1.0.mar", "digits-image-onnx_v2.0.mar", "digits-image-int8_v2.0.mar")
GRACE_S = 60  # as the Kubernetes manifests' terminationGracePeriodSeconds


def sh(*cmd: str, check: bool = True, show: bool = True) -> str:
    if show:
        print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    if check and result.returncode != 0:
        sys.exit(f"image-test: failed (exit {result.returncode}): {' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return result.stdout


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def ensure_archives(store: str) -> None:
    """The demo's archives, as `make demo` builds them (training only when the weights are missing)."""
    if all(os.path.exists(os.path.join(store, a)) for a in DEMO_ARCHIVES):
        print(f"archives present in {store}")
        return
    work = os.path.join(ROOT, "model_store", "work")
    if not os.path.exists(os.path.join(work, "digits_v2.pt")):
        sh(sys.executable, "scripts/train_digits.py", "--out", work)
    sh(os.path.join(BIN, "tspack"), "build", "--spec", "config/deploy.yaml", "--only", "digits", "--quiet")


def inspect(ref: str, template: str) -> str:
    return sh("docker", "inspect", "--format", template, ref, show=False).strip()


def check_versions(image: str) -> list[str]:
    """Packages whose version in the image differs from the host venv's (tspack itself excepted)."""
    host = dict(line.split("==", 1) for line in sh(
        os.path.join(BIN, "python"), "-m", "pip", "freeze", "--all", "--exclude-editable", show=False).splitlines()
        if "==" in line)
    inside = sh("docker", "run", "--rm", "--entrypoint", "python", image, "-m", "pip", "freeze", "--all")
    norm = {k.lower().replace("_", "-"): v for k, v in host.items()}
    differ = []
    for line in inside.splitlines():
        name, _, version = line.partition("==")
        key = name.split(" @ ")[0].strip().lower().replace("_", "-")  # tspack: "tspack @ file:///...whl"
        if key != "tspack" and norm.get(key) != version:
            differ.append(f"{name}: image {version}, venv {norm.get(key, 'absent')}")
    print(f"  {len(inside.splitlines())} packages in the image; differing from the venv: {differ or 'none'}")
    return differ


def started_at(container: str) -> float:
    stamp = inspect(container, "{{.State.StartedAt}}")
    # Docker prints nanoseconds; Python's fromisoformat takes at most microseconds.
    stamp = re.sub(r"\.(\d{6})\d*", r".\1", stamp).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(stamp).timestamp()


def read_key(container: str, kind: str = "inference") -> str | None:
    out = subprocess.run(["docker", "exec", container, "cat", f"{STATE}/key_file.json"], text=True,
                         capture_output=True)
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)[kind]["key"]
    except (ValueError, KeyError):
        return None


def wait_ready(container: str, url: str, timeout_s: float = 180.0) -> tuple[float, float, str]:
    """Seconds from the container's start to /ping Healthy and to Docker's `healthy`; and the inference key."""
    deadline = time.time() + timeout_s
    key, ping_ready, docker_ready = None, None, None
    while time.time() < deadline and (ping_ready is None or docker_ready is None):
        if inspect(container, "{{.State.Status}}") != "running":
            sys.exit(f"image-test: the container stopped:\n{sh('docker', 'logs', '--tail', '40', container)}")
        key = key or read_key(container)
        if key and ping_ready is None:
            try:
                answer = requests.get(f"{url}/ping", headers={"Authorization": f"Bearer {key}"}, timeout=2)
                if answer.status_code == 200 and answer.json().get("status") == "Healthy":
                    ping_ready = time.time()
            except (requests.RequestException, ValueError):
                pass
        if docker_ready is None and inspect(container, "{{.State.Health.Status}}") == "healthy":
            docker_ready = time.time()
        time.sleep(0.1)
    if ping_ready is None or docker_ready is None:
        sys.exit(f"image-test: not ready within {timeout_s:.0f}s:\n{sh('docker', 'logs', '--tail', '40', container)}")
    start = started_at(container)
    return ping_ready - start, docker_ready - start, key


def predict_with_curl(url: str, key: str, body_file: str) -> dict:
    print(f'$ curl -s {url}/predictions/digits -H "Authorization: Bearer $KEY" '
          f'-H "Content-Type: application/json" --data-binary @{os.path.relpath(body_file, ROOT)}')
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{url}/predictions/digits", "-H",
                          f"Authorization: Bearer {key}", "-H", "Content-Type: application/json",
                          "--data-binary", f"@{body_file}"], text=True, capture_output=True, check=True).stdout
    body, _, code = out.rpartition("\n")
    if code != "200":
        sys.exit(f"image-test: prediction answered HTTP {code}: {body}")
    return json.loads(body)


def read_metrics(url: str) -> list[str]:
    print(f"$ curl -s {url}/metrics")
    text = requests.get(f"{url}/metrics", timeout=10).text
    lines = [line for line in text.splitlines() if line.startswith(("tspack_", "ts_inference_requests_total"))]
    if not lines:
        sys.exit("image-test: the metrics port answered no tspack_ or ts_ series")
    for line in lines[:4]:
        print("  " + line)
    return lines


class Load:
    """Clients sending predictions in a loop; each outcome counted. A client stops at its first refusal."""

    def __init__(self, url: str, key: str, body: dict, clients: int = 8):
        self.url, self.headers, self.body = url, {"Authorization": f"Bearer {key}"}, body
        self.counts = {"2xx": 0, "4xx": 0, "5xx": 0, "dropped": 0, "closed_after_sigterm": 0, "refused": 0}
        self.sigterm_at = float("inf")  # set once SIGTERM has been delivered
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]

    def count(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if detail and len(self.errors) < 5:
                self.errors.append(detail)

    def no_answer(self, sent: float, exc: Exception) -> None:
        """Sent before SIGTERM and never answered: dropped. Sent after: the stopping server closed it."""
        self.count("dropped" if sent < self.sigterm_at else "closed_after_sigterm", repr(exc)[:200])

    def client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            sent = time.time()
            try:
                answer = session.post(f"{self.url}/predictions/digits", json=self.body, headers=self.headers,
                                      timeout=30)
            except requests.ConnectionError as exc:
                # Refused at connect: nothing was accepted. Anything else (reset, closed before an answer): no answer.
                if "Connection refused" in str(exc) or "NewConnectionError" in str(exc):
                    self.count("refused")
                    return
                self.no_answer(sent, exc)
                continue
            except requests.RequestException as exc:
                self.no_answer(sent, exc)
                continue
            kind = f"{answer.status_code // 100}xx"
            self.count(kind, "" if kind == "2xx" else f"HTTP {answer.status_code}: {answer.text[:200]}")

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=35)


def stop_with_sigterm(container: str, load: Load) -> tuple[float, bool]:
    """SIGTERM, then up to GRACE_S for the container to exit, then SIGKILL: what `docker stop` does, but
    the moment SIGTERM was delivered (`docker kill` has returned) is known to the clients' bookkeeping.
    Returns (seconds from SIGTERM to exit, killed)."""
    sh("docker", "kill", "--signal", "TERM", container)
    load.sigterm_at = delivered = time.time()
    while time.time() - delivered < GRACE_S:
        if inspect(container, "{{.State.Running}}") != "true":
            return time.time() - delivered, False
        time.sleep(0.1)
    sh("docker", "kill", container)
    return time.time() - delivered, True


def sigterm_under_load(container: str, url: str, key: str, body: dict) -> dict:
    with Load(url, key, body) as load:
        time.sleep(5)
        print(f"  under load for 5 s: {load.counts['2xx']} answered 2xx; now SIGTERM, {GRACE_S} s grace")
        stopped_s, killed = stop_with_sigterm(container, load)
        time.sleep(1)
    exit_code = int(inspect(container, "{{.State.ExitCode}}"))
    result = {"stop_s": round(stopped_s, 2), "exit_code": exit_code, "killed": killed, **load.counts,
              "errors": load.errors}
    result["passed"] = load.counts["5xx"] == 0 and load.counts["dropped"] == 0 and not killed
    print(f"  exited {stopped_s:.1f} s after SIGTERM, exit code {exit_code}; requests: {load.counts}")
    for error in load.errors:
        print(f"    {error}")
    return result


def write_readme(results: dict) -> None:
    s = results["sigterm"]
    block = "\n".join([
        BEGIN,
        f"Measured by `make image-test` on {results['date']} ({results['host']}):",
        "",
        "| | |",
        "|---|---|",
        f"| image `{results['image']}` size | {results['size_gb']:.2f} GB (limit 2.5 GB) |",
        f"| container start to ready (`/ping` Healthy, the demo's three archives) | {results['ready_s']:.1f} s "
        f"(limit 15 s) |",
        f"| container start to Docker's `healthy` (checks every 5 s) | {results['docker_healthy_s']:.1f} s |",
        f"| restart on the same state volume, start to ready | {results['restart_ready_s']:.1f} s "
        f"({'deployment restored from the record' if results.get('restored_from_record') else 'no record restored'})"
        " |",
        f"| SIGTERM under load (8 keep-alive clients), {GRACE_S} s grace | exited {s['stop_s']:.1f} s after "
        f"SIGTERM, code {s['exit_code']}; {s['2xx']} answered 2xx, {s['5xx']} 5xx, {s['dropped']} dropped; "
        f"after SIGTERM: {s['closed_after_sigterm']} closed unanswered on a kept-alive connection, "
        f"{s['refused']} refused |",
        f"| packages differing from the venv that built the archives | {len(results['version_drift'])} |",
        END,
    ])
    with open(README, encoding="utf-8") as f:
        text = f.read()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(README, "w", encoding="utf-8") as f:
        f.write(text)


def run_checks(image: str, container: str, body_file: str, body: dict) -> dict:
    engine = sh("docker", "info", "--format", "{{.ServerVersion}} {{.Driver}}", show=False).split()
    results: dict = {"image": image, "date": dt.date.today().isoformat(),
                     "host": f"{os.cpu_count()} CPUs, Docker {engine[0]}, storage driver {engine[-1]}"}
    step("2. The same versions as the venv that built and validated the archives")
    results["version_drift"] = check_versions(image)
    results["size_gb"] = int(inspect(image, "{{.Size}}")) / 1e9
    print(f"  image size: {results['size_gb']:.2f} GB")

    step("3. Run it and wait for the health check")
    sh("docker", "run", "-d", "--name", container, image)
    ip = inspect(container, "{{.NetworkSettings.IPAddress}}")
    inference, metrics = f"http://{ip}:8080", f"http://{ip}:8082"
    results["ready_s"], results["docker_healthy_s"], key = wait_ready(container, inference)
    print(f"  start to ready: {results['ready_s']:.1f} s (/ping Healthy); Docker healthy at "
          f"{results['docker_healthy_s']:.1f} s")

    step("4. A prediction with the key from the container's key_file.json, then the metrics port")
    print(f"$ KEY=$(docker exec {container} python -c \"import json;print(json.load(open('key_file.json'))"
          f"['inference']['key'])\")")
    top = predict_with_curl(inference, key, body_file)["predictions"][0]
    print(f"  -> predicted {top['index']} ({top['label']}, p={top['probability']:.3f})")
    results["metrics_lines"] = len(read_metrics(metrics))
    # The entrypoint records the server in the state folder, so the pack's own commands work in the container.
    status = subprocess.run(["docker", "exec", container, "tspack", "serve", "status", "--run-dir", STATE],
                            text=True, capture_output=True)
    print(f"$ docker exec {container} tspack serve status --run-dir {STATE}\n"
          + "\n".join("  " + line for line in (status.stdout + status.stderr).strip().splitlines()[:8]))
    results["tspack_status_rc"] = status.returncode

    step(f"5. SIGTERM under load: exit within {GRACE_S} s, no 5xx, nothing dropped")
    results["sigterm"] = sigterm_under_load(container, inference, key, body)

    step("6. Restart on the same state volume (the old key file is still there)")
    sh("docker", "start", container)
    results["restart_ready_s"], _, _ = wait_ready(container, inference)
    print(f"  start to ready: {results['restart_ready_s']:.1f} s")
    # The first start recorded the deployment in the state volume; this one must have restored it.
    logs = subprocess.run(["docker", "logs", container], text=True, capture_output=True)
    said = [line for line in (logs.stdout + logs.stderr).splitlines() if line.startswith("entrypoint:")]
    for line in said:
        print("  " + line)
    results["restored_from_record"] = any("restoring" in line for line in said)
    sh("docker", "stop", "--time", str(GRACE_S), container)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=os.environ.get("IMAGE_TAG", "tspack-serve:cpu"))
    parser.add_argument("--no-build", action="store_true", help="test the image as it is")
    args = parser.parse_args()
    store = os.environ.get("ARCHIVES", os.path.join(ROOT, "model_store"))
    step("1. The demo's archives and the image")
    ensure_archives(store)
    if not args.no_build:
        subprocess.run([os.path.join(ROOT, "scripts", "image.sh")], cwd=ROOT, check=True,
                       env=dict(os.environ, ARCHIVES=store, IMAGE_TAG=args.image))
    held_out = np.load(os.path.join(ROOT, "model_store", "work", "heldout.npz"))
    body = {"data": held_out["x"][0].tolist()}
    body_file = os.path.join(ROOT, "build", "image", "heldout_0.json")
    with open(body_file, "w", encoding="utf-8") as f:
        json.dump(body, f)
    container = f"tspack-image-test-{os.getpid()}"
    try:
        results = run_checks(args.image, container, body_file, body)
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", container], capture_output=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    write_readme(results)
    passed = (results["sigterm"]["passed"] and not results["version_drift"] and results["size_gb"] <= 2.5
              and results["ready_s"] <= 15)
    print(f"\nimage-test: {'PASS' if passed else 'FAIL'}: {results['size_gb']:.2f} GB, ready in "
          f"{results['ready_s']:.1f} s, SIGTERM {results['sigterm']}; written to docker/README.md and "
          f"{os.path.relpath(RESULTS, ROOT)}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
