"""The shared model cache (``worker.modelstore.cache``) with a lease held by another process.

The other process is a real process (``sys.executable``) holding its lease through the same
code path a worker uses, so "in use by another process" is the kernel's flock, not a
simulation. The rest of the cache is tested in tests/unit/test_modelstore_cache.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.modelstore import age_entry, build_small_hub, counting_cache
from worker.modelstore.refs import ModelRef

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_hub(tmp_path: Path) -> tuple[Path, dict[str, ModelRef]]:
    return build_small_hub(tmp_path / "hub")


@contextmanager
def _held_by_another_process(cache_root: Path, hub_root: Path, name: str) -> Iterator[None]:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from worker.modelstore.cache import ModelCache\n"
        "from worker.modelstore.local_hub import LocalHub\n"
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
    cache = counting_cache(cache_root, hub_root, budget_bytes=2500)
    cache.pull(refs["a"])
    age_entry(cache, "a")  # a is the LRU entry
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
