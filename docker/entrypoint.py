"""PID 1 of the tspack serving image: run TorchServe in the foreground and stop it gracefully.

Usage: entrypoint.py COMMAND [ARGS...]  (the image's CMD is `torchserve --start --foreground --ncs ...`).

Why not exec `torchserve` directly: it is a Python launcher that starts the Java frontend and waits for
it. As PID 1 it would never see SIGTERM (the kernel drops signals that a PID 1 has no handler for), so
`docker stop` and Kubernetes would wait out their grace period and SIGKILL the server mid-request. This
wrapper runs the command, passes SIGTERM and SIGINT on to the frontend (the launcher's child, whose
shutdown hook stops the workers), reaps the processes re-parented to it, and exits with the launcher's
exit code once no child is left.

Before starting it prepares the state folder (`TSPACK_STATE_DIR`, the image's VOLUME and working folder,
where TorchServe writes key_file.json and the logs): it must be writable by the server's uid, and a key file
left by a previous run is removed, so nothing reads keys that the new server no longer accepts. When the
folder holds a deployment record (deployment.json, kept by the `tspack` commands that change the
deployment), TorchServe starts with that deployment, as `tspack serve start` would: the same
archiver.operate.restore functions check the archives and write the effective config. Once TorchServe runs, the
pack's record of the server (server.json) is written there too, for the `tspack` commands.

When the config names a tspack OIP gateway (`tspack_oip_address`, `tspack config --oip-port`), it runs beside
TorchServe as under `tspack serve start`, with the same archiver.operate functions: its port is bound before
TorchServe starts (taken: the container stops at once, saying so), the gateway watches the launcher and exits
within half a second of it, and it is recorded in server.json. SIGTERM is not passed to it: it keeps forwarding
the requests TorchServe still answers while it drains, and goes when TorchServe has gone. Its log is
logs/oip_gateway.log in the state folder.

Standard library only, plus psutil when present, and tspack (archiver) for the records and the gateway: without
it, the command runs as given.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Any, Optional


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (psutil when available, else /proc)."""
    try:
        import psutil

        return [child.pid for child in psutil.Process(pid).children()]
    except ImportError:
        pass
    except Exception:  # psutil.NoSuchProcess and friends: the process is gone
        return []
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def forward(signum: int, launcher: int) -> None:
    """Signal the frontend (the launcher's children); the launcher itself when it has none yet.

    When the launcher is already gone, its orphans are our children: signal those.
    """
    if alive(launcher) and children_of(launcher):
        targets = children_of(launcher)
    elif alive(launcher):
        targets = [launcher]
    else:
        targets = children_of(os.getpid())
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_all(launcher: int, gateway: int = 0) -> int:
    """Reap every child until none is left; return the launcher's exit code (1 if it was never seen).

    A `gateway` (the OIP gateway's pid) that ends before the launcher is reported: TorchServe keeps serving, and
    the health check says unhealthy from then on.
    """
    code: Optional[int] = None
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == launcher:
            code = os.waitstatus_to_exitcode(status)
        elif pid == gateway and code is None:
            print(f"entrypoint: the OIP gateway exited (code {os.waitstatus_to_exitcode(status)}) while TorchServe "
                  "runs; its log: logs/oip_gateway.log in the state folder", file=sys.stderr)
    if code is None:
        return 1
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it


def prepare_state(state_dir: str) -> Optional[str]:
    """Create the state folder's logs folder and drop the previous run's key file and server record (its pid
    is meaningless in a new container); a message when the folder cannot be written."""
    try:
        os.makedirs(os.path.join(state_dir, "logs"), exist_ok=True)
        for stale in ("key_file.json", "server.json"):
            if os.path.exists(os.path.join(state_dir, stale)):
                os.remove(os.path.join(state_dir, stale))
    except OSError as exc:
        return (f"state folder {state_dir} is not writable by uid {os.getuid()} ({exc.strerror}): "
                f"give the volume to that uid (chown {os.getuid()} on the host folder) or use a named volume")
    return None


def plan_restore(argv: list[str], state_dir: str) -> tuple[list[str], Any]:
    """The command with `--ts-config` pointed at the effective config of the deployment recorded in the state
    folder (`tspack serve start`'s restore: archives hashed and checked, refused ones named), and the plan.

    Without a record, or without tspack, the command is unchanged. When restoring is impossible (every
    recorded archive refused, an unreadable record) the image's own config starts, and the record is left
    as it is for a later start that can use it.
    """
    if "--ts-config" not in argv[:-1]:
        return argv, None
    at = argv.index("--ts-config") + 1
    try:
        from archiver.operate.restore import prepare

        prepared = prepare(argv[at], state_dir)
    except ImportError:
        return argv, None
    except Exception as exc:  # whatever goes wrong, the image's own config still serves
        print(f"entrypoint: not restoring the recorded deployment ({type(exc).__name__}: {exc}); "
              f"starting from {argv[at]}", file=sys.stderr)
        return argv, None
    for refused in prepared.refused:
        print(f"entrypoint: REFUSED {refused}", file=sys.stderr)
    if prepared.source == "record":
        print(f"entrypoint: restoring {len(prepared.restored)} recorded version(s) from {state_dir}", file=sys.stderr)
    return argv[:at] + [prepared.config_path] + argv[at + 1:], prepared


def bind_gateway(argv: list[str]) -> tuple[Optional[socket.socket], Optional[str]]:
    """The OIP gateway's listening socket when the config (`--ts-config`) names one, bound before TorchServe starts
    as `tspack serve start` binds it; or a message when its address is taken or malformed.

    No gateway (None, None) without a config, without the address in it, or without tspack.
    """
    if "--ts-config" not in argv[:-1]:
        return None, None
    try:
        from archiver.deploy.properties import OIP_ADDRESS_KEY, read_properties
        from archiver.errors import ServerError
        from archiver.operate import oip_process
    except ImportError:
        return None, None
    try:
        return oip_process.bind(read_properties(argv[argv.index("--ts-config") + 1]).get(OIP_ADDRESS_KEY)), None
    except (ServerError, OSError) as exc:  # OSError: an unreadable config
        return None, str(exc)


def record_server(argv: list[str], state_dir: str, pid: int, prepared: Any,
                  gateway_socket: Optional[socket.socket] = None) -> Any:
    """Write the pack's record of this server (server.json) into the state folder, so that `tspack serve
    status`, `tspack register` and the rest work inside the container with `--run-dir <state folder>`; start
    the OIP gateway on `gateway_socket` (see bind_gateway; closed here in every case); then, in the background,
    once TorchServe is ready, finish what `tspack serve start` finishes: scale restored versions to their
    recorded workers and record the deployment.

    Returns the record (ServerHandle), None without one. Best effort: an image without tspack (or with an older
    one) serves the same without the record and the gateway.
    """
    with gateway_socket or contextlib.nullcontext():
        if "--ts-config" not in argv[:-1]:
            return None
        try:
            from archiver.operate.server import ServerHandle

            config = argv[argv.index("--ts-config") + 1]
            handle = ServerHandle.for_config(config, state_dir, pid, tmp_dir=tempfile.gettempdir())
            handle.save()
        except Exception as exc:  # whatever goes wrong here must not stop the server
            print(f"entrypoint: no tspack record in {state_dir} ({type(exc).__name__}: {exc})", file=sys.stderr)
            return None
        if gateway_socket is not None:
            start_gateway(handle, config, gateway_socket)
    if prepared is not None:
        threading.Thread(target=finish_restore, args=(handle, prepared), daemon=True).start()
    return handle


def start_gateway(handle: Any, config: str, listening: socket.socket) -> None:
    """The OIP gateway beside the TorchServe of `handle`, recorded in it (server.json), as `tspack serve start`
    runs it."""
    try:
        from archiver.deploy.properties import read_properties
        from archiver.operate import oip_process, server

        gateway = server.start_gateway(handle, read_properties(config), listening)
    except Exception as exc:  # TorchServe serves without it; the health check reports it missing
        print(f"entrypoint: no OIP gateway ({type(exc).__name__}: {exc})", file=sys.stderr)
        return
    print(f"entrypoint: OIP gateway (pid {gateway.pid}) on {handle.oip_url}; log: "
          f"{os.path.join(handle.log_dir, oip_process.LOG_FILE)}", file=sys.stderr)


def finish_restore(handle: Any, prepared: Any, timeout_s: float = 300.0) -> None:
    try:
        from archiver.operate.restore import finish
        from archiver.operate.server import wait_ready

        wait_ready(handle, None, [], timeout_s)
        serving = finish(handle, prepared, timeout_s)
        print(f"entrypoint: deployment recorded in {handle.run_dir}: "
              + ", ".join(f"{r.model} {r.version}" + (" (default)" if r.default else "") for r in serving),
              file=sys.stderr)
    except Exception as exc:  # the server serves what it loaded; only the record or the scaling is missing
        print(f"entrypoint: could not finish the restore ({type(exc).__name__}: {exc})", file=sys.stderr)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: entrypoint.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    state_dir = os.environ.get("TSPACK_STATE_DIR")
    problem = prepare_state(state_dir) if state_dir else None
    if problem:
        print(f"entrypoint: {problem}", file=sys.stderr)
        return 1
    prepared, gateway_socket, handle = None, None, None
    if state_dir:
        argv, prepared = plan_restore(argv, state_dir)
        gateway_socket, problem = bind_gateway(argv)
        if problem:
            print(f"entrypoint: {problem}", file=sys.stderr)
            return 1
    # inherits stdout/stderr: TorchServe's logs reach `docker logs`; not the gateway's socket (close_fds)
    launcher = subprocess.Popen(argv)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: forward(received, launcher.pid))
    if state_dir:  # after the handlers: SIGTERM may come any time
        handle = record_server(argv, state_dir, launcher.pid, prepared, gateway_socket)
    code = wait_all(launcher.pid, getattr(handle, "oip_pid", 0))
    launcher.returncode = code  # reaped above; tell Popen so it does not wait again
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
