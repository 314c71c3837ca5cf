"""Background processes tracked by pid files (the local stack's broker and services)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

__all__ = ["alive", "read_pid", "running_pid", "stop_pidfile"]

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
