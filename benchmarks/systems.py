"""Start and stop each served system, and watch the peak RSS of its process tree.

Every start returns a `Served`: where to POST, the Authorization header, the root pid of its process
tree, and how to stop it. TorchServe systems go through `archiver.operate.server.start`/`stop` (tspack's own
config, or the naive baseline's hand-written one); peers are scripts run with benchmarks/.venv's Python.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from archiver.deploy.properties import ModelEntry, ServerConfig, write_config
from archiver.operate.server import ServerHandle, free_ports, start, stop

PEERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")


@dataclass
class Served:
    """A running system: `url` takes its own protocol's POSTs; `urls` more entry points by name ("oip")."""

    system: str
    url: str
    pid: int
    stop: Callable[[], None]
    authorization: str = ""
    extra: dict = field(default_factory=dict)
    urls: dict = field(default_factory=dict)
    handle: ServerHandle | None = None  # TorchServe systems: the management API, logs
    # Whether `pause` stops the process group. LitServe's idle worker polls its queue (~9% of a 2-core machine),
    # which would disturb the system measured beside it; TorchServe idles at ~0.1%, and its JVM's fixed-rate
    # timers would all fire at once after a pause, so it is never paused.
    pausable: bool = False

    def url_for(self, protocol: str = "") -> str:
        return self.urls.get(protocol, self.url) if protocol else self.url

    def pause(self) -> None:
        """SIGSTOP the process group while another system is measured (pausable systems only)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        if self.pausable:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass


class RssPeak:
    """Samples the summed RSS of a process tree every `interval` seconds while in a `with` block.

    `match`: count only the processes whose command line contains it (e.g. TorchServe's workers,
    "model_service_worker"), so a worker's memory is told apart from the frontend's.
    """

    def __init__(self, pid: int, interval: float = 0.25, match: str | None = None):
        self.pid, self.interval, self.match = pid, interval, match
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _counted(self, process: psutil.Process) -> bool:
        try:
            return self.match is None or any(self.match in part for part in process.cmdline())
        except psutil.Error:
            return False

    def sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        total = 0
        for process in tree:
            try:
                total += process.memory_info().rss if self._counted(process) else 0
            except psutil.Error:
                pass
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> RssPeak:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def role_of(process: psutil.Process) -> str:
    """"frontend" for TorchServe's Java frontend, "workers" for every other process (Python workers, peers)."""
    try:
        return "frontend" if "org.pytorch.serve.ModelServer" in process.cmdline() else "workers"
    except psutil.Error:
        return "workers"


def _tree_cpu(pid: int, seen: dict[int, float], roles: dict[int, str] | None = None) -> None:
    """Record, per process of the tree under `pid`, its CPU seconds so far (user + system), and its role."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    for process in tree:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        # children_*: what its reaped children used (short-lived helpers, e.g. TorchServe's metric collector)
        seen[process.pid] = times.user + times.system + times.children_user + times.children_system
        if roles is not None and process.pid not in roles:
            roles[process.pid] = role_of(process)


def _busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


class CpuWatch:
    """CPU shares of the machine while in a `with` block: the watched tree's, and everything else's.

    `other_share` is what neither the tree, this process, nor `excluded_cpu_s` (wrk's rusage) used: a
    test suite or a build running beside the benchmark shows up there, and the report flags such rows.
    `cpu_s_by_role`: the tree's CPU seconds split into TorchServe's Java frontend and the rest (`role_of`),
    which is where a served system spends its CPU per request. `match`: count as the tree only its processes whose
    command line contains it (the in-process limit's children, not the servers this process also started).
    """

    def __init__(self, pid: int, match: str | None = None):
        self.pid, self.cores, self.match = pid, psutil.cpu_count() or 1, match
        self.excluded_cpu_s = 0.0
        self.tree_share = self.other_share = 0.0
        self.cpu_s_by_role: dict[str, float] = {}

    def __enter__(self) -> CpuWatch:
        self._before: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        _tree_cpu(self.pid, self._before, self._roles)
        self._self_before = sum(psutil.Process().cpu_times()[:2])
        self._busy_before, self._t0 = _busy_seconds(), time.monotonic()
        return self

    def _counted(self, pid: int) -> bool:
        if self.match is None:
            return True
        try:
            return any(self.match in part for part in psutil.Process(pid).cmdline())
        except psutil.Error:
            return False

    def __exit__(self, *exc) -> None:
        wall = max(1e-6, time.monotonic() - self._t0)
        busy = _busy_seconds() - self._busy_before
        after: dict[int, float] = {}
        _tree_cpu(self.pid, after, self._roles)
        used = {pid: cpu - self._before.get(pid, 0.0) for pid, cpu in after.items() if self._counted(pid)}
        tree = sum(used.values())
        self.cpu_s_by_role = {}
        for pid, cpu in used.items():
            role = self._roles.get(pid, "workers")
            self.cpu_s_by_role[role] = round(self.cpu_s_by_role.get(role, 0.0) + cpu, 3)
        own = 0.0 if os.getpid() in used else sum(psutil.Process().cpu_times()[:2]) - self._self_before
        capacity = wall * self.cores
        self.tree_share = round(tree / capacity, 4)
        self.other_share = round(max(0.0, busy - tree - own - self.excluded_cpu_s) / capacity, 4)


def background_share(seconds: float = 2.0) -> float:
    """Share of the machine busy with other work while nothing of the benchmark runs."""
    with CpuWatch(os.getpid()) as watch:
        time.sleep(seconds)
    return watch.other_share



def _torchserve(system: str, config_path: str, run_dir: str, model: str, tuned: bool = True,
                env: dict | None = None) -> Served:
    handle = start(config_path, run_dir, timeout_s=240, tuned=tuned, env=env)
    urls = {"oip": f"{handle.inference_url}/v2/models/{model}/infer"}
    return Served(system, f"{handle.inference_url}/predictions/{model}", handle.pid,
                  lambda: stop(run_dir, quiet=True), handle.authorization(), urls=urls, handle=handle)


def start_tspack(folder: str, store: str, entry: ModelEntry | None, model_api: bool = False,
                 env: dict | None = None) -> Served:
    """tspack: our config (token auth on, model API off), one model version with its archive's settings.

    `entry` None with `model_api`: a server with no model, for timing a registration (worker cold start).
    `env`: extra environment for the server and its workers.
    """
    inference, management, metrics, grpc_inference, grpc_management = free_ports(5)
    config = ServerConfig(model_store=store, inference_port=inference, management_port=management,
                          metrics_port=metrics, grpc_inference_port=grpc_inference,
                          grpc_management_port=grpc_management, models=(entry,) if entry else (),
                          model_api=model_api)
    path = write_config(config, os.path.join(folder, "config.properties"))
    return _torchserve("tspack", path, os.path.join(folder, "run"), entry.name if entry else "", env=env)


NAIVE_PROPERTIES = """# The naive baseline: TorchServe's defaults, plus the ports this benchmark picked.
# Token authorization stays on (TorchServe 0.12's default); workers = cores, batch size 1.
inference_address=http://127.0.0.1:{0}
management_address=http://127.0.0.1:{1}
metrics_address=http://127.0.0.1:{2}
grpc_inference_port={3}
grpc_management_port={4}
model_store={store}
load_models={model}={model}.mar
"""


def start_naive(folder: str, store: str, model: str) -> Served:
    """TorchServe with its defaults (decode_input_request on, default workers) and the naive handler."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "config.properties")
    with open(path, "w", encoding="utf-8") as f:
        f.write(NAIVE_PROPERTIES.format(*free_ports(5), store=os.path.abspath(store), model=model))
    return _torchserve("naive-torchserve", path, os.path.join(folder, "run"), model, tuned=False)


PEER_SCRIPTS = {"fastapi": "fastapi_server.py", "litserve": "litserve_server.py"}


def start_peer(system: str, python: str, args: list[str], env: dict, log_path: str,
               timeout_s: float = 180.0, script: str | None = None) -> Served:
    """Run a peer script in its own process group; ready once GET /health answers 200.

    `script`: the server file (default: benchmarks/peers/ + PEER_SCRIPTS[system]), run as `python SCRIPT PORT ARGS`.
    """
    port = free_ports(1)[0]
    script = script or os.path.join(PEERS, PEER_SCRIPTS[system])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "ab") as log:
        process = subprocess.Popen([python, script, str(port), *args], env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)

    def stop_peer() -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        try:  # uvicorn / LitServe workers may outlive their parent for a moment
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            stop_peer()
            raise RuntimeError(f"{system} exited with {process.returncode}; see {log_path}")
        if http_status(base + "/health", None, "", "") == 200:
            return Served(system, base + "/predict", process.pid, stop_peer, pausable=True)
        time.sleep(0.25)
    stop_peer()
    raise RuntimeError(f"{system} was not ready within {timeout_s:.0f}s; see {log_path}")


def http_status(url: str, body: bytes | None, content_type: str, authorization: str, timeout: float = 30,
                extra_headers: dict | None = None) -> int:
    """The HTTP status of one GET (body None) or POST; 0 when nothing answered."""
    headers = {"Content-Type": content_type} if body is not None else {}
    headers.update(extra_headers or {})
    if authorization:
        headers["Authorization"] = authorization
    request = urllib.request.Request(url, data=body, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0
