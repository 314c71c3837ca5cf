"""The local model hub (``worker.modelstore.local_hub``) and its model refs
(``worker.modelstore.refs``): verified materialisation of files and archives, corrupted blobs and
escaping archive members refused, bad ref fields rejected."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pytest

from worker.modelstore.hub import ModelHub
from worker.modelstore.local_hub import LocalHub, ModelIntegrityError
from worker.modelstore.refs import HubIndex, ModelFormat, ModelRef


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_hub_is_a_model_hub(demo_hub: Path) -> None:
    assert isinstance(LocalHub(demo_hub), ModelHub)


def test_materialize_onnx_copies_verified_file(demo_hub: Path, tmp_path: Path) -> None:
    hub = LocalHub(demo_hub)
    ref = hub.resolve("demo-mlp")
    path = hub.materialize(ref, tmp_path / "cache")
    assert path == tmp_path / "cache" / f"{ref.digest}.onnx"
    assert _sha256(path) == ref.digest
    assert hub.materialize(ref, tmp_path / "cache") == path


def test_materialize_lm_extracts_directory(demo_hub: Path, tmp_path: Path) -> None:
    hub = LocalHub(demo_hub)
    ref = hub.resolve("demo-lm")
    path = hub.materialize(ref, tmp_path / "cache")
    assert path == tmp_path / "cache" / ref.digest
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert hub.materialize(ref, tmp_path / "cache") == path
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [ref.digest]


@pytest.mark.parametrize("name", ["demo-mlp", "demo-lm"])
def test_corrupted_blob_is_refused(demo_hub: Path, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "hub"
    shutil.copytree(demo_hub, copy)
    hub = LocalHub(copy)
    ref = hub.resolve(name)
    blob = copy / ref.uri
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="does not match"):
        hub.materialize(ref, cache)
    assert list(cache.iterdir()) == []


def _hub_with_tar(root: Path, members: dict[str, bytes]) -> tuple[LocalHub, ModelRef]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "blobs").mkdir(parents=True)
    blob = root / "blobs" / "evil.tar"
    blob.write_bytes(buffer.getvalue())
    ref = ModelRef(
        name="evil",
        version="1",
        format=ModelFormat.HF_CAUSAL_LM,
        digest=_sha256(blob),
        size_bytes=blob.stat().st_size,
        uri="blobs/evil.tar",
        example_input={"kind": "chat", "messages": [{"role": "user", "content": "hi"}]},
    )
    (root / "index.json").write_text(HubIndex(models=[ref]).model_dump_json())
    return LocalHub(root), ref


@pytest.mark.parametrize("member", ["../escaped.txt", "sub/../../escaped.txt", "/tmp/abs.txt"])
def test_tar_member_escaping_the_target_is_refused(tmp_path: Path, member: str) -> None:
    hub, ref = _hub_with_tar(tmp_path / "hub", {"config.json": b"{}", member: b"x"})
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError, match="escapes"):
        hub.materialize(ref, cache)
    assert not (tmp_path / "escaped.txt").exists()
    assert list(cache.iterdir()) == []


def test_model_ref_rejects_bad_fields() -> None:
    good = {
        "name": "m",
        "version": "1",
        "format": "onnx",
        "digest": "0" * 64,
        "size_bytes": 1,
        "uri": "blobs/m.onnx",
        "example_input": {
            "kind": "ml",
            "tensors": {"x": {"dtype": "int64", "shape": [1], "data": [1]}},
        },
    }
    ModelRef.model_validate(good)
    for field, bad in [
        ("digest", "A" * 64),
        ("uri", "../outside.onnx"),
        ("example_input", {"kind": "video"}),
        ("format", "pickle"),
    ]:
        with pytest.raises(ValueError):
            ModelRef.model_validate({**good, field: bad})
    with pytest.raises(ValueError):
        ModelRef.model_validate({**good, "extra": 1})
