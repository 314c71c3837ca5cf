"""The demo hub builder (``infra.dev.demo_models``): both models indexed with matching digests,
idempotent and deterministic builds that repair damage. The local hub that reads it is tested in
test_modelstore_local_hub.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from infra.dev.demo_models import build_demo_hub
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import HubIndex, ModelFormat


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_index_lists_both_models_with_matching_digests(demo_hub: Path) -> None:
    index = HubIndex.model_validate_json((demo_hub / "index.json").read_text())
    assert [ref.name for ref in index.models] == ["demo-lm", "demo-mlp"]
    assert index.get("demo-mlp").format is ModelFormat.ONNX
    assert index.get("demo-lm").format is ModelFormat.HF_CAUSAL_LM
    for ref in index.models:
        blob = demo_hub / ref.uri
        assert _sha256(blob) == ref.digest
        assert blob.stat().st_size == ref.size_bytes
    with pytest.raises(KeyError):
        index.get("no-such-model")


def test_index_json_is_pretty_and_sorted(demo_hub: Path) -> None:
    text = (demo_hub / "index.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_build_is_idempotent(demo_hub: Path) -> None:
    files = [demo_hub / "index.json", *sorted((demo_hub / "blobs").iterdir())]
    before = {p: p.stat().st_mtime_ns for p in files}
    index = build_demo_hub(demo_hub)
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert index == LocalHub(demo_hub).index()


def test_forced_rebuild_is_deterministic(demo_hub: Path, tmp_path: Path) -> None:
    copy = tmp_path / "hub"
    shutil.copytree(demo_hub, copy)
    rebuilt = build_demo_hub(copy, force=True)
    assert rebuilt == LocalHub(demo_hub).index()


def test_rebuild_repairs_a_corrupted_blob(demo_hub: Path, tmp_path: Path) -> None:
    copy = tmp_path / "hub"
    shutil.copytree(demo_hub, copy)
    ref = LocalHub(copy).resolve("demo-mlp")
    (copy / ref.uri).write_bytes(b"garbage")
    build_demo_hub(copy)
    assert _sha256(copy / ref.uri) == ref.digest
