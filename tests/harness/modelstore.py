"""Model store helpers shared by unit and integration tests: a hub that counts its fetches,
models of an exact size (budget arithmetic), ageing an entry (LRU order), and a copy of the demo
hub with two slow fixed-latency models for the loaded-engine tests."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from infra.dev.demo_models import add_fixed_latency_model, add_model
from schemas.requests import MLInput
from worker.modelstore.cache import ModelCache
from worker.modelstore.entries import MANIFEST_FILE
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import ModelFormat, ModelRef

__all__ = [
    "DEMO_MLP_PAYLOAD",
    "ML_EXAMPLE",
    "CountingHub",
    "age_entry",
    "build_small_hub",
    "counting_cache",
    "demo_hub_with_slow_models",
    "sized_model",
]

ML_EXAMPLE: dict[str, Any] = {
    "kind": "ml",
    "tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1.0]}},
}
"""An example input for models added to a test hub."""


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


def sized_model(hub: Path, name: str, size_bytes: int) -> ModelRef:
    """A fixed-latency model whose blob is exactly ``size_bytes`` (budget arithmetic)."""
    head = json.dumps({"latency_ms": 1, "pad": ""}).encode()
    data = head[:-2] + name.encode()[:1] * (size_bytes - len(head)) + head[-2:]  # distinct
    assert len(data) == size_bytes
    return add_model(hub, name, ModelFormat.FIXED_LATENCY, data, ML_EXAMPLE)


def build_small_hub(root: Path) -> tuple[Path, dict[str, ModelRef]]:
    """A hub at ``root`` holding models ``a``, ``b`` and ``c`` of 1000 bytes each."""
    refs = {name: sized_model(root, name, 1000) for name in ("a", "b", "c")}
    return root, refs


def counting_cache(root: Path, hub_root: Path, **kwargs: Any) -> ModelCache:
    """A cache at ``root`` over a ``CountingHub`` of ``hub_root``."""
    return ModelCache(root, CountingHub(hub_root), **kwargs)


def age_entry(cache: ModelCache, model: str) -> None:
    """Make ``model``'s cache entry the least recently used one."""
    entry = next(e for e in cache.entries() if e.model == model)
    os.utime(entry.path / MANIFEST_FILE, (1, 1))


DEMO_MLP_PAYLOAD = MLInput.model_validate(
    {"tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1.0, 2.0, 0.25]}}}
)
"""An input every model of ``demo_hub_with_slow_models`` accepts."""


def demo_hub_with_slow_models(demo_hub: Path, root: Path) -> Path:
    """A copy of ``demo_hub`` at ``root`` (tests may add and damage models) plus two
    fixed-latency models, ``slow-a`` and ``slow-b``, with different digests."""
    shutil.copytree(demo_hub, root)
    add_fixed_latency_model(root, "slow-a", 50)
    add_fixed_latency_model(root, "slow-b", 51)  # a different blob, so a different digest
    return root
