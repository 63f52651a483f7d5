"""The OIP gateway's process beside TorchServe's: bind its port, start it, know whether it runs, stop it.

The caller (`serve start`, archiver/operate/server.py) binds the port before TorchServe starts, so a taken port
fails the start at once, like TorchServe's own ports, and hands the listening socket to the gateway process
(archiver/operate/oip_gateway.py). The gateway watches TorchServe's launcher and exits when it does; `serve stop`
ends it first. Processes are recognised by their command line, never by a recorded pid alone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Optional
from urllib.parse import urlsplit

from archiver.errors import ServerError

MODULE = "archiver.operate.oip_gateway"
LOG_FILE = "oip_gateway.log"
WATCH_S = 0.5


def bind(address: Optional[str]) -> Optional[socket.socket]:
    """The gateway's listening socket at `address` (http://HOST:PORT), bound in the caller before TorchServe starts,
    so that a taken port fails `serve start` at once, like TorchServe's own ports; None without an address.

    Raises: ServerError when the address is in use or malformed.
    """
    if not address:
        return None
    parts = urlsplit(address)
    if not parts.hostname or not parts.port:
        raise ServerError(f"OIP gateway address {address}: give http://HOST:PORT, e.g. http://127.0.0.1:8083")
    family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((parts.hostname, parts.port))
        listening.listen(128)
    except OSError as exc:
        listening.close()
        raise ServerError(f"OIP gateway address {address} is in use ({exc.strerror}): stop what listens there or "
                          "choose another port with `tspack config --oip-port`") from exc
    return listening


def spawn(listening: socket.socket, run_dir: str, inference_url: str, management_url: str, model_store: str,
          key_file: Optional[str], max_body_bytes: int, server_pid: int) -> subprocess.Popen:
    """Start the gateway on `listening` (handed over, then closed here), watching TorchServe's launcher
    `server_pid`. Its output goes to `run_dir`/logs/oip_gateway.log."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", MODULE, "--fd", str(listening.fileno()), "--run-dir", run_dir,
           "--inference-url", inference_url, "--management-url", management_url, "--model-store", model_store,
           "--max-body-bytes", str(max_body_bytes), "--server-pid", str(server_pid)]
    if key_file:
        cmd += ["--key-file", key_file]
    env = dict(os.environ, PYTHONPATH=package_root)
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    try:
        with open(os.path.join(run_dir, "logs", LOG_FILE), "ab") as out:
            return subprocess.Popen(cmd, pass_fds=(listening.fileno(),), stdout=out, stderr=subprocess.STDOUT,
                                    cwd=run_dir, env=env, start_new_session=True)
    finally:
        listening.close()


def stop_process(pid: int, run_dir: str, timeout_s: float = 5.0) -> bool:
    """End the gateway `pid` if it is the one serving `run_dir` (a recorded pid may be anyone's after a reboot).
    Returns whether it was running."""
    if not pid:
        return False
    if not running(pid, run_dir):
        _reap(pid)  # it may have exited already, our child, unreaped
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            _reap(pid)
            time.sleep(0.05)
        if not _alive(pid):
            break
    _reap(pid)
    return True


def running(pid: int, run_dir: str) -> bool:
    """Whether `pid` is the gateway serving `run_dir`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return MODULE.encode() in args and os.path.abspath(run_dir).encode() in args


def _stat(pid: int) -> Optional[tuple[str, str]]:
    """(state, start time) of `pid` from /proc, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], fields[19]


def _alive(pid: int, started: Optional[str] = None) -> bool:
    """Running, not a zombie, and (given `started`) the same process as when it was first seen."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (started is None or stat[1] == started)


def _reap(pid: int) -> None:
    if pid <= 0:  # waitpid(0) or (-1) would reap any child of the caller
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass  # not our child: whoever started it reaps it


def watch(pid: int, on_exit: Callable[[], None]) -> None:
    """Call `on_exit` once `pid` (TorchServe's launcher) has ended; it ends when its Java frontend does."""
    stat = _stat(pid)
    started = stat[1] if stat else None
    while stat is not None and _alive(pid, started):
        time.sleep(WATCH_S)
    on_exit()
