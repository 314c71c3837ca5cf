"""Cross-process file locks (``fcntl.flock``) for the shared model cache.

Why ``flock``: several pods mount the cache volume, and the kernel drops a process's locks
when it dies, so a crashed downloader never leaves a stale lock behind. Locks belong to an
open file description, so two ``FileLock`` objects on the same path conflict even inside one
process (two threads, or a worker and the CLI in the same test). Lock files are never deleted:
removing one while another process waits on it would let two processes "hold" it at once.

Waiting polls with ``LOCK_NB`` instead of blocking in ``flock``: a blocked ``flock`` cannot be
given a timeout or be interrupted cleanly from a thread pool.

NFS note: ``flock`` over NFSv4 is emulated with byte-range locks and works across clients on
Linux; on other shared filesystems check that ``flock`` is honoured before sharing a cache.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worker.modelstore.hub import CacheLockTimeout

__all__ = ["FileLock", "held_lock"]

_POLL_S = 0.02
_MAX_POLL_S = 0.25


class FileLock:
    """One lock on ``path``: shared (many holders) or exclusive (one holder)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, *, shared: bool = False) -> bool:
        """Take the lock if it is free now; never waits."""
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path.name} is already held by this object")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def acquire(self, *, shared: bool = False, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the lock; ``CacheLockTimeout`` after that."""
        deadline = time.monotonic() + timeout_s
        pause = _POLL_S
        while not self.try_acquire(shared=shared):
            if time.monotonic() >= deadline:
                raise CacheLockTimeout(
                    f"lock {self.path.name} still held by another process after {timeout_s} s"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, _MAX_POLL_S)

    def release(self) -> None:
        """Drop the lock; a no-op when not held (so cleanup paths can always call it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock


@contextmanager
def held_lock(path: Path, *, timeout_s: float, shared: bool = False) -> Iterator[FileLock]:
    """Hold the lock on ``path`` for the ``with`` block (waiting up to ``timeout_s``)."""
    lock = FileLock(path)
    lock.acquire(shared=shared, timeout_s=timeout_s)
    try:
        yield lock
    finally:
        lock.release()
