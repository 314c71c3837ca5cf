"""The shared model cache: content-addressed, verified, locked, leased and size-bounded.

Several worker pods mount one cache directory. For each model digest:

* **Download once.** An exclusive ``flock`` on ``locks/<digest>.lock`` is held while a process
  fetches, verifies and publishes; the others wait for it, then find the entry published.
* **Atomic, verified publication.** Bytes go to ``tmp/<digest>.part`` (kept across crashes, so
  the next fetch resumes it), are hashed against the digest, and only then become
  ``entries/<digest>/`` in one rename (see ``entries``). A finished download that fails its
  digest is deleted and fetched again from zero; a second failure is a ``ModelIntegrityError``.
* **Checked before every load.** A cached entry is re-verified (full re-hash by default) each
  time it is materialised; a damaged one is discarded under the lock and fetched again, so a
  corrupted or truncated file is never handed to an engine.
* **In use is visible across processes.** ``materialize`` returns a ``CachedModel`` holding a
  *shared* flock on ``leases/<digest>.lease`` until ``release()`` (held while the engine is
  loaded). Eviction needs that lock *exclusively* and without waiting, so it skips any model
  some process has loaded. The manifest's mtime records the last use (the LRU order).
* **Byte budget.** Before a download, under ``locks/budget.lock``, the cache counts published
  entries plus the declared size of downloads in progress in other processes
  (``reservations/<digest>``, live only while that digest's lock is held), evicts the least
  recently used entries not in use until the new model fits, and reserves its size. If it
  cannot fit, ``CacheFullError``: the budget is a hard limit, never exceeded. It counts model
  files (a single-file model is exactly its hub size, an unpacked tar a little less than
  the tar); manifests, locks and leases are not counted, nor is the transient second copy
  while a tar is being unpacked.

Lock order is lease → digest lock → budget lock; while holding the budget lock the cache only
*tries* other digests' locks, so two processes can never wait on each other.

All methods are synchronous (file locks, hashing, network): call them from a thread.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from worker.modelstore.entries import (
    MANIFEST_FILE,
    Manifest,
    model_path,
    publish,
    read_manifest,
    remove_tree,
    tree_size_bytes,
    verify_entry,
)
from worker.modelstore.files import check_digest, sha256_file
from worker.modelstore.hub import CacheFullError, ModelHub, ModelIntegrityError
from worker.modelstore.locks import FileLock, held_lock
from worker.modelstore.refs import ModelRef
from worker.modelstore.stats import CacheEvent, CacheEventKind, CacheMetrics

__all__ = ["CacheEntry", "CachedModel", "ModelCache"]

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_DOWNLOAD_ATTEMPTS = 2


class CachedModel:
    """A verified model on the shared volume, marked in use until ``release()``."""

    def __init__(
        self, ref: ModelRef, path: Path, entry: Path, lease: FileLock, *, hit: bool
    ) -> None:
        self.ref = ref
        self.path = path
        """What ``load_engine`` takes: the model file, or the unpacked directory."""
        self.hit = hit
        """True when no download was needed."""
        self._entry = entry
        self._lease = lease

    @property
    def in_use(self) -> bool:
        return self._lease.held

    def release(self) -> None:
        """Stop marking the model in use (idempotent); it becomes evictable."""
        if self._lease.held:
            _touch(self._entry / MANIFEST_FILE)
            self._lease.release()


@dataclass(frozen=True)
class CacheEntry:
    """One published model on the volume, as ``entries()`` sees it."""

    digest: str
    model: str
    size_bytes: int
    last_used_unix_s: float
    in_use: bool
    path: Path


class ModelCache:
    """Materialise models from ``hub`` into the shared directory ``root``."""

    def __init__(
        self,
        root: Path,
        hub: ModelHub,
        *,
        budget_bytes: int | None = None,
        verify_cached: bool = True,
        lock_timeout_s: float = 1800.0,
        metrics: CacheMetrics | None = None,
    ) -> None:
        self.root = Path(root)
        self.hub = hub
        self.budget_bytes = budget_bytes
        self.metrics = metrics if metrics is not None else CacheMetrics()
        self._verify_cached = verify_cached
        self._lock_timeout_s = lock_timeout_s
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._locks = self.root / "locks"
        self._leases = self.root / "leases"
        self._reservations = self.root / "reservations"
        for d in (self._entries, self._tmp, self._locks, self._leases, self._reservations):
            d.mkdir(parents=True, exist_ok=True)

    # -- public API ---------------------------------------------------------------------

    def materialize(self, ref: ModelRef) -> CachedModel:
        """A verified local copy of ``ref``, fetched if needed, held in use until released."""
        lease = FileLock(self._leases / f"{ref.digest}.lease")
        lease.acquire(shared=True, timeout_s=self._lock_timeout_s)
        try:
            path = self._ready(ref)
            hit = path is not None
            if path is None:
                with held_lock(self._lock_path(ref.digest), timeout_s=self._lock_timeout_s):
                    path = self._ready(ref, repair=True)
                    hit = path is not None
                    if path is None:
                        path = self._download(ref)
            if hit:
                self._record("hit", ref.name, ref.digest)
            else:
                self._record("usage", ref.name, ref.digest, size_bytes=self.usage_bytes())
            entry = self._entries / ref.digest
            _touch(entry / MANIFEST_FILE)
            return CachedModel(ref, path, entry, lease, hit=hit)
        except BaseException:
            lease.release()
            raise

    def pull(self, ref: ModelRef) -> CachedModel:
        """Materialise ``ref`` and release it at once (operators pre-filling a volume)."""
        cached = self.materialize(ref)
        cached.release()
        return cached

    def entries(self) -> list[CacheEntry]:
        """Published entries, least recently used first."""
        found = []
        for entry in self._entries.iterdir():
            if not _DIGEST.match(entry.name):
                continue
            manifest = read_manifest(entry)
            found.append(
                CacheEntry(
                    digest=entry.name,
                    model=manifest.model if manifest is not None else "",
                    size_bytes=_entry_size(entry, manifest),
                    last_used_unix_s=self._last_used(entry.name),
                    in_use=self._in_use(entry.name),
                    path=entry,
                )
            )
        return sorted(found, key=lambda e: e.last_used_unix_s)

    def usage_bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries())

    def evict(self, digest: str) -> int | None:
        """Remove one entry; the bytes freed, or None when it is in use (or downloading)."""
        if not _DIGEST.match(digest):
            raise ValueError("a digest is 64 lower-case hex characters")
        lease = FileLock(self._leases / f"{digest}.lease")
        if not lease.try_acquire():
            return None
        try:
            lock = FileLock(self._lock_path(digest))
            if not lock.try_acquire():
                return None
            try:
                return self._remove_entry(digest, "evict")
            finally:
                lock.release()
        finally:
            lease.release()

    def evict_to(self, budget_bytes: int) -> list[str]:
        """Evict least recently used entries not in use until usage fits ``budget_bytes``."""
        with held_lock(self._locks / "budget.lock", timeout_s=self._lock_timeout_s):
            evicted = self._evict_until(budget_bytes, exclude="")[1]
        if evicted:
            self._record("usage", "", "", size_bytes=self.usage_bytes())
        return evicted

    # -- internals ----------------------------------------------------------------------

    def _lock_path(self, digest: str) -> Path:
        return self._locks / f"{digest}.lock"

    def _ready(self, ref: ModelRef, *, repair: bool = False) -> Path | None:
        """The verified model path, or None. With ``repair`` (digest lock held) a damaged
        entry is removed so it can be fetched again."""
        entry = self._entries / ref.digest
        if not entry.is_dir():
            return None
        manifest = verify_entry(entry, ref, full=self._verify_cached)
        if manifest is not None:
            return model_path(entry, ref, manifest)
        if repair:
            self._remove_entry(ref.digest, "corrupt", model=ref.name)
        return None

    def _download(self, ref: ModelRef) -> Path:
        """Fetch, verify and publish ``ref`` (digest lock held)."""
        reservation = self._reserve(ref)
        try:
            part = self._tmp / f"{ref.digest}.part"
            fetched = 0
            for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
                before = _size(part)
                try:
                    self.hub.fetch(ref, part)
                except ModelIntegrityError:
                    part.unlink(missing_ok=True)  # do not resume from bytes a broken hub sent
                    raise
                fetched += max(0, _size(part) - before)
                actual = sha256_file(part) if part.exists() else ""
                if actual == ref.digest:
                    break
                # Truncated, or resumed onto bytes that were not the model's: start over once.
                part.unlink(missing_ok=True)
                self._record("corrupt", ref.name, ref.digest)
                if attempt == _DOWNLOAD_ATTEMPTS:
                    check_digest(ref, actual)
            build = self._tmp / f"{ref.digest}.build-{secrets.token_hex(4)}"
            target = self._entries / ref.digest
            manifest = publish(ref, part, build, target)
            self._record("miss", ref.name, ref.digest, size_bytes=fetched)
            return model_path(target, ref, manifest)
        finally:
            if reservation is not None:
                reservation.unlink(missing_ok=True)

    def _reserve(self, ref: ModelRef) -> Path | None:
        """Make room for ``ref`` under the budget and reserve it (digest lock held)."""
        budget = self.budget_bytes
        if budget is None:
            return None
        if ref.size_bytes > budget:
            raise CacheFullError(
                f"model {ref.name} ({ref.size_bytes} bytes) is larger than the cache budget "
                f"({budget} bytes)"
            )
        with held_lock(self._locks / "budget.lock", timeout_s=self._lock_timeout_s):
            used, _ = self._evict_until(budget - ref.size_bytes, exclude=ref.digest)
            if used + ref.size_bytes > budget:
                raise CacheFullError(
                    f"cache budget {budget} bytes: {used} bytes are in use or being "
                    f"downloaded, model {ref.name} needs {ref.size_bytes}"
                )
            reservation = self._reservations / ref.digest
            reservation.write_text(str(ref.size_bytes))
            return reservation

    def _evict_until(self, target_bytes: int, *, exclude: str) -> tuple[int, list[str]]:
        """Evict LRU entries not in use until usage ≤ ``target_bytes`` (budget lock held).
        Returns the bytes still used (entries + live reservations) and the digests evicted."""
        entries = [e for e in self.entries() if e.digest != exclude]
        used = sum(e.size_bytes for e in entries) + self._reserved_bytes(exclude)
        evicted: list[str] = []
        for entry in entries:
            if used <= target_bytes:
                break
            if entry.in_use:
                continue
            freed = self.evict(entry.digest)
            if freed is not None:
                used -= entry.size_bytes
                evicted.append(entry.digest)
        return used, evicted

    def _reserved_bytes(self, exclude: str) -> int:
        """Declared sizes of downloads in progress elsewhere; stale reservations (their
        digest lock is free: the downloader died) are removed."""
        total = 0
        for reservation in self._reservations.iterdir():
            digest = reservation.name
            if digest == exclude or not _DIGEST.match(digest):
                continue
            probe = FileLock(self._lock_path(digest))
            if probe.try_acquire():
                reservation.unlink(missing_ok=True)
                probe.release()
                continue
            try:
                total += int(reservation.read_text() or 0)
            except (OSError, ValueError):
                continue
        return total

    def _remove_entry(self, digest: str, kind: CacheEventKind, *, model: str = "") -> int:
        """Delete an entry and any partial download (its digest lock is held)."""
        entry = self._entries / digest
        (self._tmp / f"{digest}.part").unlink(missing_ok=True)
        if not entry.exists():
            return 0
        manifest = read_manifest(entry)
        size = _entry_size(entry, manifest)
        trash = self._tmp / f"{digest}.trash-{secrets.token_hex(4)}"
        os.rename(entry, trash)  # the entry vanishes atomically; deleting may take a while
        remove_tree(trash)
        name = model or (manifest.model if manifest is not None else "")
        self._record(kind, name, digest, size_bytes=size)
        return size

    def _in_use(self, digest: str) -> bool:
        probe = FileLock(self._leases / f"{digest}.lease")
        if probe.try_acquire():
            probe.release()
            return False
        return True

    def _last_used(self, digest: str) -> float:
        # The manifest's mtime: set when the entry is published, touched on every
        # materialise and release. (Not the lease file: probing a lease creates it.)
        entry = self._entries / digest
        for path in (entry / MANIFEST_FILE, entry):
            try:
                return path.stat().st_mtime
            except FileNotFoundError:
                continue
        return 0.0

    def _record(
        self, kind: CacheEventKind, model: str, digest: str, *, size_bytes: int = 0
    ) -> None:
        self.metrics.record(CacheEvent(kind, model, digest, size_bytes=size_bytes))


def _entry_size(entry: Path, manifest: Manifest | None) -> int:
    """Bytes of model files: what the budget counts (the manifest and lock files are not)."""
    return manifest.size_bytes if manifest is not None else tree_size_bytes(entry)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _touch(path: Path) -> None:
    now = time.time()
    try:
        os.utime(path, (now, now))
    except OSError:
        pass  # last-use time is advisory; never fail a load over it
