"""`tspack serve start|stop|status`: run TorchServe with a generated config, and know when it is ready.

Each server gets its own run folder (key_file.json, logs, state) and its own short temp folder, which
TorchServe uses for its pid file and the worker sockets (`<tmp>/.ts.sock.<port>`); two servers on one
host therefore do not collide. Start waits until `/ping` answers and every start-up model has a READY
worker, and fails within seconds with the worker's own error when a worker dies while loading.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Optional

import requests

from archiver.deploy.properties import OIP_ADDRESS_KEY, read_properties
from archiver.errors import ApiError, ServerError
from archiver.operate import oip_process
from archiver.operate.client import TorchServeClient

STATE_FILE = "server.json"
DEFAULT_RUN_DIR = os.path.join(".tspack", "server")
TMP_PREFIX = "tspack-ts-"
JAVA_HINT = "TorchServe needs Java 17: install it with `apt-get install -y openjdk-17-jre-headless` (or set JAVA_HOME)"

WORKER_DIED = re.compile(r"Backend worker process died|Load model failed|Worker died|WorkerInitializationException")
PY_ERROR = re.compile(r"(?:^|\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit)\b:?.*)$")


@dataclass
class ServerHandle:
    """A running (or recorded) TorchServe: where it listens, its process group, and its folders."""

    run_dir: str
    config_path: str
    pid: int
    inference_url: str
    management_url: str
    metrics_url: str
    token_auth: bool
    tmp_dir: str
    started_at: str = ""
    oip_url: str = ""  # the tspack OIP gateway (archiver/operate/oip_gateway.py), when one runs beside it
    oip_pid: int = 0

    @property
    def key_file(self) -> Optional[str]:
        return os.path.join(self.run_dir, "key_file.json") if self.token_auth else None

    @property
    def log_dir(self) -> str:
        return os.path.join(self.run_dir, "logs")

    def client(self, timeout: float = 60.0) -> TorchServeClient:
        return TorchServeClient(self.inference_url, self.management_url, self.metrics_url, self.key_file, timeout)

    def authorization(self) -> str:
        """The `Authorization` value for inference ("" without token auth), renewed by the client when due."""
        key = self.client().keys.key("inference") if self.key_file else None
        return f"Bearer {key}" if key else ""

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except OSError:
            return False
        return True

    def save(self) -> None:
        with open(os.path.join(self.run_dir, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def for_config(cls, config_path: str, run_dir: str, pid: int, tmp_dir: str) -> ServerHandle:
        """The handle of a TorchServe launched (pid: the `torchserve` launcher) with `config_path` from `run_dir`;
        for launchers other than `start`, such as the image's entrypoint."""
        props = read_properties(config_path)
        return cls(
            run_dir=os.path.abspath(run_dir), config_path=os.path.abspath(config_path), pid=pid,
            inference_url=props.get("inference_address", "http://127.0.0.1:8080"),
            management_url=props.get("management_address", "http://127.0.0.1:8081"),
            metrics_url=props.get("metrics_address", "http://127.0.0.1:8082"),
            token_auth=props.get("disable_token_authorization", "false").lower() != "true", tmp_dir=tmp_dir,
            started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    @classmethod
    def load(cls, run_dir: str) -> ServerHandle:
        path = os.path.join(run_dir, STATE_FILE)
        if not os.path.isfile(path):
            raise ServerError(f"no TorchServe recorded in {run_dir}: start one with `tspack serve start`")
        with open(path, encoding="utf-8") as f:
            return cls(**json.load(f))


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
    if not java or not os.path.exists(java):
        raise ServerError(JAVA_HINT)
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServerError(f"{JAVA_HINT} ({exc})") from exc
    match = re.search(r'version "(\d+)', out)
    if not match or int(match.group(1)) < 11:
        raise ServerError(f"{JAVA_HINT}; found: {out.strip().splitlines()[0] if out.strip() else 'nothing'}")
    return java


def port_in_use(url: str) -> bool:
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return True
    return False


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1 (for tests and benchmarks)."""
    sockets, ports = [], []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
        ports.append(s.getsockname()[1])
    for s in sockets:
        s.close()
    return ports


def _torchserve_bin() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "torchserve")
    found = candidate if os.path.exists(candidate) else shutil.which("torchserve")
    if not found:
        raise ServerError("the `torchserve` command is not installed here (pip install torchserve==0.12.0)")
    return found


def start(config_path: str, run_dir: str = DEFAULT_RUN_DIR, timeout_s: float = 180.0,
          env: Optional[dict] = None, wait_for_models: bool = True, tuned: bool = True) -> ServerHandle:
    """Launch TorchServe with `config_path` and wait until it serves.

    `tuned=False` leaves the workers' environment as stock TorchServe would (for baselines).

    Raises:
        ServerError: Java is missing, a port is taken, the server exited, a worker died while loading
            (with the worker's error), or readiness did not come within `timeout_s`.
    """
    config_path = os.path.abspath(config_path)
    if not os.path.isfile(config_path):
        raise ServerError(f"config not found: {config_path} (write one with `tspack config`)")
    props = read_properties(config_path)
    run_dir = _prepare_run_dir(os.path.abspath(run_dir))
    java = find_java()
    urls = {k: props.get(f"{k}_address", d) for k, d in (
        ("inference", "http://127.0.0.1:8080"), ("management", "http://127.0.0.1:8081"),
        ("metrics", "http://127.0.0.1:8082"))}
    grpc_host = props.get("grpc_inference_address", "127.0.0.1")
    listening = dict(urls, grpc_inference=f"http://{grpc_host}:{props.get('grpc_inference_port', '7070')}",
                     grpc_management=f"http://{grpc_host}:{props.get('grpc_management_port', '7071')}")
    for kind, url in listening.items():
        if port_in_use(url):
            raise ServerError(f"{kind} address {url} is in use: stop what listens there or choose other ports")
    gateway_socket = oip_process.bind(props.get(OIP_ADDRESS_KEY))
    tmp_dir = tempfile.mkdtemp(prefix=TMP_PREFIX, dir="/tmp" if os.path.isdir("/tmp") else None)
    cmd = [_torchserve_bin(), "--start", "--foreground", "--ncs", "--ts-config", config_path]
    for flag, key in (("--model-store", "model_store"), ("--workflow-store", "workflow_store")):
        if props.get(key):
            cmd += [flag, props[key]]
    with gateway_socket or contextlib.nullcontext():  # closed here on every path; the gateway holds its own copy
        with open(os.path.join(run_dir, "logs", "torchserve.out"), "ab") as out:
            process = subprocess.Popen(cmd, cwd=run_dir, env=_child_env(run_dir, tmp_dir, java, env, tuned),
                                       stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        handle = ServerHandle.for_config(config_path, run_dir, process.pid, tmp_dir)
        handle.save()
        startup_models = [m.split("=", 1)[0] for m in props.get("load_models", "").split(",") if m and m != "ALL"]
        try:
            gateway = start_gateway(handle, props, gateway_socket) if gateway_socket else None
            wait_ready(handle, process, startup_models if wait_for_models else [], timeout_s)
            _check_gateway(handle, gateway)
        except BaseException:
            stop(run_dir, quiet=True)
            raise
    return handle


def start_gateway(handle: ServerHandle, props: dict, listening: socket.socket) -> subprocess.Popen:
    """The OIP gateway on its bound socket, beside the TorchServe `handle` describes (recorded in the handle); for
    `start` and the image's entrypoint (docker/entrypoint.py)."""
    gateway = oip_process.spawn(
        listening, handle.run_dir, handle.inference_url, handle.management_url,
        os.path.abspath(props.get("model_store", "model_store")), handle.key_file,
        int(props.get("max_request_size", 64 * 1024 * 1024)), handle.pid)
    handle.oip_url, handle.oip_pid = props[OIP_ADDRESS_KEY], gateway.pid
    handle.save()
    return gateway


def _check_gateway(handle: ServerHandle, gateway: Optional[subprocess.Popen]) -> None:
    if gateway is not None and gateway.poll() is not None:
        raise ServerError(f"the OIP gateway exited with code {gateway.returncode}: "
                          f"{_read(os.path.join(handle.log_dir, oip_process.LOG_FILE))[-2000:]}")


def ensure_not_running(run_dir: str) -> Optional[str]:
    """Refuse when a server runs from `run_dir`; clean up after one that died.

    A `kill -9` of the Java frontend (or an OOM kill) ends the launcher too, but leaves its Python workers
    running, orphaned, and its temp folder behind. Those workers hold memory (and GPUs), so they are killed
    here before a new server starts. Processes are matched by their command line (the launcher names the
    config, a worker its socket in the server's own temp folder), never by pid alone: after a reboot or a
    container restart the recorded pid may be anyone's.

    Returns:
        A line saying what was cleaned up, or None when there was nothing to clean.

    Raises:
        ServerError: a live server runs from `run_dir`.
    """
    run_dir = os.path.abspath(run_dir)
    if not os.path.isfile(os.path.join(run_dir, STATE_FILE)):
        return None
    previous = ServerHandle.load(run_dir)
    _reap(previous.pid)  # our own child (tests, benchmarks) stays a zombie, and "alive", until reaped
    launcher = previous.alive() and previous.config_path.encode() in _cmdline(previous.pid)
    if launcher and any(b"org.pytorch.serve" in _cmdline(c) for c in _children(previous.pid)):
        raise ServerError(f"TorchServe already runs from {run_dir} (pid {previous.pid}); `tspack serve stop` first")
    deadline = time.monotonic() + 10
    while launcher and previous.alive() and time.monotonic() < deadline:  # it exits once its frontend is gone
        _reap(previous.pid)
        time.sleep(0.1)
    # The frontend runs with -Djava.io.tmpdir=<tmp> and puts each worker's socket at <tmp>/.ts.sock.<port>.
    marks = (f"-Djava.io.tmpdir={previous.tmp_dir}\0".encode(), f"{previous.tmp_dir}/.ts.sock.".encode())
    leftovers = [pid for pid in _pids() if any(mark in _cmdline(pid) for mark in marks)]
    if launcher and previous.alive():
        leftovers.append(previous.pid)
    oip_process.stop_process(previous.oip_pid, previous.run_dir)  # it exits with the launcher; this makes sure
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(previous.pid)
    _remove_private_tmp(previous.tmp_dir)
    os.remove(os.path.join(run_dir, STATE_FILE))
    note = f"the TorchServe recorded in {run_dir} (pid {previous.pid}) was not running"
    return note + (f"; killed {len(leftovers)} process(es) it left behind" if leftovers else "")


def _remove_private_tmp(tmp_dir: str) -> None:
    """Remove a server's temp folder, only when it is one `start` made (a handle built for another launcher may
    name a shared folder such as /tmp)."""
    if os.path.basename(os.path.normpath(tmp_dir)).startswith(TMP_PREFIX):
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()] if os.path.isdir("/proc") else []


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _prepare_run_dir(run_dir: str) -> str:
    """Create the run folder; refuse when a server already runs from it; clear stale keys and logs."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    ensure_not_running(run_dir)
    stale = [os.path.join(run_dir, "key_file.json")]
    stale += [os.path.join(run_dir, "logs", f) for f in os.listdir(os.path.join(run_dir, "logs"))
              if f.endswith((".log", ".out"))]
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    return run_dir


def _child_env(run_dir: str, tmp_dir: str, java: str, extra: Optional[dict], tuned: bool = True) -> dict:
    env = dict(os.environ)
    # The archive's own handlers must win over any checkout on PYTHONPATH: the worker puts PYTHONPATH first.
    env.pop("PYTHONPATH", None)
    # Idle OpenMP threads sleep instead of spinning: a spinning second torch thread in a worker otherwise takes
    # the CPU the frontend needs (measured here: 14 -> 87 requests/s at concurrency 1 on 2 cores).
    if tuned:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update({
        "TEMP": tmp_dir, "TMPDIR": tmp_dir, "LOG_LOCATION": os.path.join(run_dir, "logs"),
        "METRICS_LOCATION": os.path.join(run_dir, "logs"), "PYTHONUNBUFFERED": "1",
        "JAVA_HOME": os.environ.get("JAVA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(java))),
    })
    env.update(extra or {})
    return env


def wait_ready(handle: ServerHandle, process: Optional[subprocess.Popen], models: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    client = None
    while time.monotonic() < deadline:
        death = worker_failure(handle)
        if death:
            raise ServerError(death)
        if process is not None and process.poll() is not None:
            raise ServerError(f"TorchServe exited with code {process.returncode}: {log_tail(handle)}")
        if handle.key_file and not os.path.exists(handle.key_file):
            time.sleep(0.2)
            continue
        client = client or handle.client(timeout=5)
        try:
            if client.ping().get("status") == "Healthy" and all(model_ready(client, m) for m in models):
                return
        except (requests.RequestException, ApiError, ValueError, AttributeError):
            pass
        time.sleep(0.2)
    raise ServerError(f"TorchServe was not ready within {timeout_s:.0f}s: {log_tail(handle)}")


def model_ready(client: TorchServeClient, model: str) -> bool:
    try:
        description = client.describe(model)
    except ApiError:
        return False
    return any(w.get("status") == "READY" for d in description for w in d.get("workers", []))


def _read(path: str, limit: int = 400_000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def worker_failure(handle: ServerHandle) -> Optional[str]:
    """The worker's own error when a worker died while loading, else None."""
    ts_log = _read(os.path.join(handle.log_dir, "ts_log.log"))
    if not WORKER_DIED.search(ts_log):
        return None
    worker_lines = [line.split("MODEL_LOG - ", 1)[1] for line in
                    (_read(os.path.join(handle.log_dir, "model_log.log")) + "\n" + ts_log).splitlines()
                    if "MODEL_LOG - " in line]
    errors = [m.group(1).strip() for line in worker_lines if (m := PY_ERROR.search(line))]
    reason = errors[-1] if errors else "the worker logged no Python error"
    return f"a worker died while loading its model: {reason} (logs: {handle.log_dir})"


def log_tail(handle: ServerHandle, lines: int = 15) -> str:
    text = _read(os.path.join(handle.log_dir, "torchserve.out")) + _read(os.path.join(handle.log_dir, "ts_log.log"))
    tail = [line for line in text.splitlines() if line.strip()][-lines:]
    return ("\n" + "\n".join(tail)) if tail else f"(no output; logs in {handle.log_dir})"


def stop(run_dir: str = DEFAULT_RUN_DIR, timeout_s: float = 30.0, quiet: bool = False) -> bool:
    """Stop the TorchServe recorded in `run_dir` (its whole process group). Returns False if none ran."""
    try:
        handle = ServerHandle.load(os.path.abspath(run_dir))
    except ServerError:
        if quiet:
            return False
        raise
    was_alive = handle.alive()
    oip_process.stop_process(handle.oip_pid, handle.run_dir)
    if was_alive:
        _signal_group(handle.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while handle.alive() and time.monotonic() < deadline:
            _reap(handle.pid)
            time.sleep(0.1)
        if handle.alive():
            _signal_group(handle.pid, signal.SIGKILL)
        _reap(handle.pid)
    # Workers outlive a SIGTERMed frontend for a moment; make sure none stays.
    _signal_group(handle.pid, signal.SIGKILL)
    _remove_private_tmp(handle.tmp_dir)
    for leftover in (STATE_FILE, "key_file.json"):
        try:
            os.remove(os.path.join(handle.run_dir, leftover))
        except OSError:
            pass
    return was_alive


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
