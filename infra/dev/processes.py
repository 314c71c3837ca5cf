"""Background processes tracked by pid files (the local stack's broker, chain and services).

Development tooling: the services never import this module (their child processes go through
``infra.children``)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "alive",
    "log_tail",
    "port_open",
    "read_pid",
    "running_pid",
    "spawn",
    "stop_pidfile",
    "terminate",
    "wait_started",
]

_POLL_INTERVAL_S = 0.05


def read_pid(pid_path: Path) -> int | None:
    try:
        pid = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as dead)."""
    # Reap the process if it is our own child, or a finished child would linger as a zombie
    # that signal 0 still reports as existing.
    with contextlib.suppress(ChildProcessError):
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # /proc/<pid>/stat is "pid (comm) STATE ..."; a zombie is dead to us.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline_has(pid: int, marker: bytes) -> bool:
    # Guards against a stale pid file whose pid now belongs to an unrelated process.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs (macOS): cannot check, trust the file
    except OSError:
        return False
    return marker in cmdline


def running_pid(pid_path: Path, marker: bytes) -> int | None:
    """The pid in ``pid_path`` if that process runs and its command line contains ``marker``."""
    pid = read_pid(pid_path)
    if pid is None or not alive(pid) or not _cmdline_has(pid, marker):
        return None
    return pid


def stop_pidfile(pid_path: Path, *, marker: bytes, timeout_s: float = 5.0) -> bool:
    """SIGTERM the process named by ``pid_path``, SIGKILL it after ``timeout_s``.

    Returns False when nothing matching was running. The pid file is removed in every case; a
    stale file (process gone, or the pid reused by a program whose command line lacks
    ``marker``) is removed without signalling anything.
    """
    try:
        pid = running_pid(pid_path, marker)
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while alive(pid):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                while alive(pid):
                    time.sleep(_POLL_INTERVAL_S)
                break
            time.sleep(_POLL_INTERVAL_S)
        return True
    except ProcessLookupError:
        return False
    finally:
        pid_path.unlink(missing_ok=True)


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(log_path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


def terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM a child, SIGKILL it after ``timeout_s``, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def spawn(
    args: list[str], *, log_path: Path, detach: bool, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a service binary with its output in ``log_path``.

    ``detach=True``: its own session, outliving the caller (``stack up``). Otherwise it is
    tied to the caller: on Linux it gets SIGKILL when the caller dies, so a test run that
    crashes (or is killed) never leaves a broker or chain behind.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        return subprocess.Popen(  # noqa: S603 - our own fixed binaries, no shell
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=detach,
            preexec_fn=None if detach else _die_with_parent,
        )


def wait_started(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    log_path: Path,
    timeout_s: float,
    error: type[Exception],
    pid_path: Path | None = None,
) -> None:
    """Poll ``ready`` until it holds; raise ``error`` (with the log's tail) if the process
    exits first or is not ready in time (then it is stopped). Writes ``pid_path`` on success."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            raise error(
                f"{what} exited with status {proc.returncode} before becoming ready; "
                f"end of {log_path}:\n{log_tail(log_path)}"
            )
        if time.monotonic() >= deadline:
            terminate(proc, timeout_s=2.0)
            tail = log_tail(log_path)
            raise error(f"{what} not ready after {timeout_s:.1f} s; end of {log_path}:\n{tail}")
        time.sleep(_POLL_INTERVAL_S)
    if pid_path is not None:
        pid_path.parent.mkdir(parents=True, exist_ok=True)
        pid_path.write_text(f"{proc.pid}\n")


def _die_with_parent() -> None:
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_PR_SET_PDEATHSIG = 1
