"""The shared model cache over a local hub: verification, repair, leases, budget eviction.

Other processes are real processes (``sys.executable``) holding leases through the same code
path a worker uses, so "in use by another process" is the kernel's flock, not a simulation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from worker.models.cache import ModelCache
from worker.models.demo import add_model
from worker.models.entries import MANIFEST_FILE
from worker.models.files import sha256_file
from worker.models.hub import CacheFullError, ModelIntegrityError
from worker.models.local_hub import LocalHub
from worker.models.refs import ModelFormat, ModelRef
from worker.models.stats import CacheEvent, CacheMetrics

REPO = Path(__file__).resolve().parents[2]
_ML_EXAMPLE = {"kind": "ml", "tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1.0]}}}


class CountingHub(LocalHub):
    """A local hub that counts fetches (thread-safe)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.fetches: dict[str, int] = {}
        self._lock = threading.Lock()

    def fetch(self, ref: ModelRef, partial: Path) -> None:
        with self._lock:
            self.fetches[ref.name] = self.fetches.get(ref.name, 0) + 1
        super().fetch(ref, partial)


def _sized_model(hub: Path, name: str, size_bytes: int) -> ModelRef:
    """A fixed-latency model whose blob is exactly ``size_bytes`` (budget arithmetic)."""
    head = json.dumps({"latency_ms": 1, "pad": ""}).encode()
    data = head[:-2] + name.encode()[:1] * (size_bytes - len(head)) + head[-2:]  # distinct
    assert len(data) == size_bytes
    return add_model(hub, name, ModelFormat.FIXED_LATENCY, data, _ML_EXAMPLE)


@pytest.fixture
def small_hub(tmp_path: Path) -> tuple[Path, dict[str, ModelRef]]:
    root = tmp_path / "hub"
    refs = {name: _sized_model(root, name, 1000) for name in ("a", "b", "c")}
    return root, refs


def _cache(root: Path, hub_root: Path, **kwargs: object) -> ModelCache:
    return ModelCache(root, CountingHub(hub_root), **kwargs)  # type: ignore[arg-type]


def _age(cache: ModelCache, model: str) -> None:
    entry = next(e for e in cache.entries() if e.model == model)
    os.utime(entry.path / MANIFEST_FILE, (1, 1))


def _events(cache: ModelCache) -> list[CacheEvent]:
    seen: list[CacheEvent] = []
    cache.metrics.add_listener(seen.append)
    return seen


# --- materialise, verify, repair ------------------------------------------------------------


def test_miss_then_hit_gives_verified_files(demo_hub: Path, tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", demo_hub)
    events = _events(cache)
    mlp = cache.hub.resolve("demo-mlp")
    first = cache.materialize(mlp)
    assert not first.hit and first.in_use
    assert first.path.name == "model.onnx" and sha256_file(first.path) == mlp.digest
    second = cache.materialize(mlp)
    assert second.hit and second.path == first.path
    first.release()
    second.release()
    assert not first.in_use
    lm = cache.hub.resolve("demo-lm")
    path = cache.pull(lm).path
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in path.iterdir()
    }
    assert [e.kind for e in events] == ["miss", "hit", "miss"]
    stats = cache.metrics.snapshot()
    assert (stats.hits, stats.misses) == (1, 2)
    assert stats.bytes_downloaded == mlp.size_bytes + lm.size_bytes
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no partials or build dirs left


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra-file", "manifest"])
def test_damaged_entry_is_discarded_and_fetched_again(
    demo_hub: Path, tmp_path: Path, damage: str
) -> None:
    cache = _cache(tmp_path / "cache", demo_hub)
    ref = cache.hub.resolve("demo-lm")
    entry = cache.pull(ref).path
    victim = entry / "tokenizer.json"
    data = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "extra-file":
        (entry / "config.override.json").write_text("{}")
    else:
        (entry / MANIFEST_FILE).write_text("not json")
    events = _events(cache)
    again = cache.materialize(ref)
    again.release()
    assert not again.hit
    assert [e.kind for e in events] == ["corrupt", "miss"]
    assert cache.hub.fetches["demo-lm"] == 2  # type: ignore[attr-defined]
    assert (again.path / "tokenizer.json").read_bytes() == data
    assert not (again.path / "config.override.json").exists()


def test_size_only_check_still_catches_truncation(demo_hub: Path, tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", demo_hub, verify_cached=False)
    ref = cache.hub.resolve("demo-mlp")
    path = cache.pull(ref).path
    path.write_bytes(path.read_bytes()[:-10])
    repaired = cache.pull(ref)
    assert not repaired.hit and sha256_file(repaired.path) == ref.digest


def test_leftover_partial_with_wrong_bytes_is_refetched_from_zero(
    demo_hub: Path, tmp_path: Path
) -> None:
    cache = _cache(tmp_path / "cache", demo_hub)
    ref = cache.hub.resolve("demo-mlp")
    # A crashed earlier download left a partial whose bytes are not the model's.
    (tmp_path / "cache" / "tmp" / f"{ref.digest}.part").write_bytes(b"\0" * (ref.size_bytes // 2))
    events = _events(cache)
    path = cache.pull(ref).path
    assert sha256_file(path) == ref.digest
    assert [e.kind for e in events] == ["corrupt", "miss"]


def test_damaged_hub_blob_is_never_published(demo_hub: Path, tmp_path: Path) -> None:
    hub_root = tmp_path / "hub"
    ref = add_model(
        hub_root,
        "m",
        ModelFormat.ONNX,
        (demo_hub / "blobs/demo-mlp-1.onnx").read_bytes(),
        _ML_EXAMPLE,
    )
    blob = hub_root / ref.uri
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = _cache(tmp_path / "cache", hub_root)
    with pytest.raises(ModelIntegrityError, match="does not match"):
        cache.materialize(ref)
    assert cache.hub.fetches["m"] == 2  # type: ignore[attr-defined]  # retried once from zero
    assert cache.entries() == []
    assert cache.evict(ref.digest) == 0  # nothing there to free


def test_unsafe_archive_is_refused(tmp_path: Path) -> None:
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    hub_root = tmp_path / "hub"
    chat = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}
    ref = add_model(hub_root, "evil", ModelFormat.HF_CAUSAL_LM, buffer.getvalue(), chat)
    cache = _cache(tmp_path / "cache", hub_root)
    with pytest.raises(ModelIntegrityError, match="escapes"):
        cache.materialize(ref)
    assert cache.entries() == [] and not (tmp_path / "cache" / "escaped.txt").exists()


def test_threads_of_one_process_fetch_once(demo_hub: Path, tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", demo_hub)
    ref = cache.hub.resolve("demo-lm")
    results: list[bool] = []

    def worker() -> None:
        cached = cache.materialize(ref)
        results.append(cached.hit)
        cached.release()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.hub.fetches == {"demo-lm": 1}  # type: ignore[attr-defined]
    assert sorted(results) == [False, True, True, True]


# --- leases and eviction ----------------------------------------------------------------------


def test_lru_eviction_keeps_usage_under_budget(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = _cache(tmp_path / "cache", hub_root, budget_bytes=2500)
    events = _events(cache)
    cache.pull(refs["a"])
    cache.pull(refs["b"])
    _age(cache, "a")  # long unused
    cache.pull(refs["b"])  # b: used again
    cache.pull(refs["c"])
    assert {e.model for e in cache.entries()} == {"b", "c"}
    assert cache.usage_bytes() <= 2500
    assert [e.kind for e in events].count("evict") == 1
    assert cache.metrics.snapshot().bytes_evicted == 1000


def test_model_in_use_here_is_never_evicted(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = _cache(tmp_path / "cache", hub_root, budget_bytes=2500)
    held_a = cache.materialize(refs["a"])  # oldest, but loaded
    cache.pull(refs["b"])
    cache.pull(refs["c"])  # must evict b, not a
    assert {e.model for e in cache.entries()} == {"a", "c"}
    assert cache.evict(refs["a"].digest) is None
    held_c = cache.materialize(refs["c"])
    with pytest.raises(CacheFullError, match="in use"):
        cache.pull(refs["b"])  # a and c in use: nothing may go
    assert {e.model for e in cache.entries()} == {"a", "c"}
    held_a.release()
    cache.pull(refs["b"])  # now a may go
    assert {e.model for e in cache.entries()} == {"b", "c"}
    held_c.release()
    assert cache.usage_bytes() <= 2500


@contextmanager
def _held_by_another_process(cache_root: Path, hub_root: Path, name: str) -> Iterator[None]:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from worker.models.cache import ModelCache\n"
        "from worker.models.local_hub import LocalHub\n"
        "hub = LocalHub(Path(sys.argv[2]))\n"
        "cached = ModelCache(Path(sys.argv[1]), hub).materialize(hub.resolve(sys.argv[3]))\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"
        "cached.release()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(cache_root), str(hub_root), name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_model_in_use_by_another_process_is_never_evicted(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache_root = tmp_path / "cache"
    cache = _cache(cache_root, hub_root, budget_bytes=2500)
    cache.pull(refs["a"])
    _age(cache, "a")  # a is the LRU entry
    with _held_by_another_process(cache_root, hub_root, "a"):
        assert [e.in_use for e in cache.entries()] == [True]
        cache.pull(refs["b"])
        cache.pull(refs["c"])  # a is older, but loaded elsewhere: b goes
        assert {e.model for e in cache.entries()} == {"a", "c"}
        assert cache.evict(refs["a"].digest) is None
    # The other process let go just now, which counts as a use: c is the LRU entry now.
    cache.pull(refs["b"])
    assert {e.model for e in cache.entries()} == {"a", "b"}
    assert cache.evict(refs["a"].digest) == 1000  # and nothing holds a any more


def test_model_larger_than_budget_is_refused(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = _cache(tmp_path / "cache", hub_root, budget_bytes=999)
    with pytest.raises(CacheFullError, match="larger than the cache budget"):
        cache.pull(refs["a"])
    assert cache.hub.fetches == {}  # type: ignore[attr-defined]


def test_stale_reservation_of_a_dead_downloader_is_ignored(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = _cache(tmp_path / "cache", hub_root, budget_bytes=1500)
    # A downloader died after reserving 1000 bytes: its digest lock is free, so it is stale.
    (tmp_path / "cache" / "reservations" / refs["b"].digest).write_text("1000")
    cache.pull(refs["a"])
    assert not (tmp_path / "cache" / "reservations" / refs["b"].digest).exists()


def test_listener_failure_does_not_break_loading(demo_hub: Path, tmp_path: Path) -> None:
    def broken(event: CacheEvent) -> None:
        raise RuntimeError("exporter down")

    cache = ModelCache(tmp_path / "cache", LocalHub(demo_hub), metrics=CacheMetrics((broken,)))
    cache.pull(cache.hub.resolve("demo-mlp"))
    assert cache.metrics.snapshot().misses == 1
