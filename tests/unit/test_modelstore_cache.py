"""The shared model cache (``worker.modelstore.cache``) over a local hub: verification, repair,
leases, budget eviction. A lease held by another process is tested in
tests/integration/test_modelstore_cache.py (it starts one).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from infra.dev.demo_models import add_model
from tests.harness.modelstore import (
    ML_EXAMPLE,
    age_entry,
    build_small_hub,
    counting_cache,
)
from worker.modelstore.cache import ModelCache
from worker.modelstore.entries import MANIFEST_FILE
from worker.modelstore.files import sha256_file
from worker.modelstore.hub import CacheFullError, ModelIntegrityError
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import ModelFormat, ModelRef
from worker.modelstore.stats import CacheEvent, CacheMetrics


@pytest.fixture
def small_hub(tmp_path: Path) -> tuple[Path, dict[str, ModelRef]]:
    return build_small_hub(tmp_path / "hub")


def _events(cache: ModelCache) -> list[CacheEvent]:
    seen: list[CacheEvent] = []
    cache.metrics.add_listener(seen.append)
    return seen


# --- materialise, verify, repair ------------------------------------------------------------


def test_miss_then_hit_gives_verified_files(demo_hub: Path, tmp_path: Path) -> None:
    cache = counting_cache(tmp_path / "cache", demo_hub)
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
    assert [e.kind for e in events] == ["miss", "usage", "hit", "miss", "usage"]
    # Each fetch reports what the shared volume holds now (the cache-size gauge's feed).
    usage = [e.size_bytes for e in events if e.kind == "usage"]
    sizes = {e.digest: e.size_bytes for e in cache.entries()}
    assert usage == [sizes[mlp.digest], sizes[mlp.digest] + sizes[lm.digest]]
    stats = cache.metrics.snapshot()
    assert (stats.hits, stats.misses) == (1, 2)
    assert stats.bytes_downloaded == mlp.size_bytes + lm.size_bytes
    assert not list((tmp_path / "cache" / "tmp").iterdir())  # no partials or build dirs left


@pytest.mark.parametrize("damage", ["flip", "truncate", "extra-file", "manifest"])
def test_damaged_entry_is_discarded_and_fetched_again(
    demo_hub: Path, tmp_path: Path, damage: str
) -> None:
    cache = counting_cache(tmp_path / "cache", demo_hub)
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
    assert [e.kind for e in events] == ["corrupt", "miss", "usage"]
    assert cache.hub.fetches["demo-lm"] == 2  # type: ignore[attr-defined]
    assert (again.path / "tokenizer.json").read_bytes() == data
    assert not (again.path / "config.override.json").exists()


def test_size_only_check_still_catches_truncation(demo_hub: Path, tmp_path: Path) -> None:
    cache = counting_cache(tmp_path / "cache", demo_hub, verify_cached=False)
    ref = cache.hub.resolve("demo-mlp")
    path = cache.pull(ref).path
    path.write_bytes(path.read_bytes()[:-10])
    repaired = cache.pull(ref)
    assert not repaired.hit and sha256_file(repaired.path) == ref.digest


def test_leftover_partial_with_wrong_bytes_is_refetched_from_zero(
    demo_hub: Path, tmp_path: Path
) -> None:
    cache = counting_cache(tmp_path / "cache", demo_hub)
    ref = cache.hub.resolve("demo-mlp")
    # A crashed earlier download left a partial whose bytes are not the model's.
    (tmp_path / "cache" / "tmp" / f"{ref.digest}.part").write_bytes(b"\0" * (ref.size_bytes // 2))
    events = _events(cache)
    path = cache.pull(ref).path
    assert sha256_file(path) == ref.digest
    assert [e.kind for e in events] == ["corrupt", "miss", "usage"]


def test_damaged_hub_blob_is_never_published(demo_hub: Path, tmp_path: Path) -> None:
    hub_root = tmp_path / "hub"
    ref = add_model(
        hub_root,
        "m",
        ModelFormat.ONNX,
        (demo_hub / "blobs/demo-mlp-1.onnx").read_bytes(),
        ML_EXAMPLE,
    )
    blob = hub_root / ref.uri
    data = bytearray(blob.read_bytes())
    data[10] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = counting_cache(tmp_path / "cache", hub_root)
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
    cache = counting_cache(tmp_path / "cache", hub_root)
    with pytest.raises(ModelIntegrityError, match="escapes"):
        cache.materialize(ref)
    assert cache.entries() == [] and not (tmp_path / "cache" / "escaped.txt").exists()


def test_threads_of_one_process_fetch_once(demo_hub: Path, tmp_path: Path) -> None:
    cache = counting_cache(tmp_path / "cache", demo_hub)
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
    cache = counting_cache(tmp_path / "cache", hub_root, budget_bytes=2500)
    events = _events(cache)
    cache.pull(refs["a"])
    cache.pull(refs["b"])
    age_entry(cache, "a")  # long unused
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
    cache = counting_cache(tmp_path / "cache", hub_root, budget_bytes=2500)
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


def test_model_larger_than_budget_is_refused(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = counting_cache(tmp_path / "cache", hub_root, budget_bytes=999)
    with pytest.raises(CacheFullError, match="larger than the cache budget"):
        cache.pull(refs["a"])
    assert cache.hub.fetches == {}  # type: ignore[attr-defined]


def test_stale_reservation_of_a_dead_downloader_is_ignored(
    small_hub: tuple[Path, dict[str, ModelRef]], tmp_path: Path
) -> None:
    hub_root, refs = small_hub
    cache = counting_cache(tmp_path / "cache", hub_root, budget_bytes=1500)
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
