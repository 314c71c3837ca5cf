"""A model hub backed by a local directory: ``<root>/index.json`` plus blobs under it.

Materialising a model copies (ONNX) or unpacks (HF causal LM tar) the blob into a cache
directory, addressed by digest. Every write goes to a temporary name in the cache directory
first and is published with an atomic rename, so a crash or a concurrent worker never leaves a
half-written model under its final name. The blob's sha256 is checked before anything is
published; a mismatch raises ``ModelIntegrityError``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import BinaryIO

from worker.models.hub import ModelIntegrityError
from worker.models.refs import HubIndex, ModelFormat, ModelRef

__all__ = ["INDEX_FILE", "LocalHub", "ModelIntegrityError", "sha256_file"]

INDEX_FILE = "index.json"
_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class LocalHub:
    """A directory hub. Implements ``worker.models.hub.ModelHub``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def index(self) -> HubIndex:
        """Parse ``root/index.json``."""
        return HubIndex.model_validate_json((self.root / INDEX_FILE).read_bytes())

    def resolve(self, name: str) -> ModelRef:
        """The model called ``name``; ``KeyError`` if this hub does not serve it."""
        return self.index().get(name)

    def blob_path(self, ref: ModelRef) -> Path:
        """Where ``ref``'s blob lives; refuses a ``uri`` that leaves the hub root."""
        root = self.root.resolve()
        path = (root / ref.uri).resolve()
        if not path.is_relative_to(root):
            raise ModelIntegrityError(f"model {ref.name}: uri points outside the hub")
        return path

    def materialize(self, ref: ModelRef, cache_dir: Path) -> Path:
        """Return a verified local path for ``ref``: the ``.onnx`` file, or the directory an
        HF causal LM tar unpacks into. Synchronous: call it through ``asyncio.to_thread``."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        if ref.format is ModelFormat.ONNX:
            return self._materialize_file(ref, cache_dir / f"{ref.digest}.onnx")
        if ref.format is ModelFormat.FIXED_LATENCY:
            return self._materialize_file(ref, cache_dir / f"{ref.digest}.json")
        return self._materialize_tar(ref, cache_dir / ref.digest)

    def _materialize_file(self, ref: ModelRef, target: Path) -> Path:
        # A single file is cheap to re-hash, so a cached copy is checked, not trusted.
        if target.exists():
            if sha256_file(target) == ref.digest:
                return target
            target.unlink(missing_ok=True)
        with self.blob_path(ref).open("rb") as src:
            fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as dst:
                    actual = _copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                _check_digest(ref, actual)
                tmp.chmod(0o644)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
        return target

    def _materialize_tar(self, ref: ModelRef, target: Path) -> Path:
        # A directory only ever appears under its final name after verification (atomic
        # rename), so an existing one is reused without re-hashing every file in it.
        if target.is_dir():
            return target
        blob = self.blob_path(ref)
        _check_digest(ref, sha256_file(blob))
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            _safe_extract(ref, blob, tmp)
            tmp.chmod(0o755)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another worker published the same digest first: use theirs.
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return target


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := src.read(_CHUNK_BYTES):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


def _check_digest(ref: ModelRef, actual: str) -> None:
    if actual != ref.digest:
        raise ModelIntegrityError(
            f"model {ref.name}@{ref.version}: blob sha256 {actual} does not match the index "
            f"digest {ref.digest}"
        )


def _safe_extract(ref: ModelRef, blob: Path, dest: Path) -> None:
    """Unpack a tar with the ``data`` filter: no absolute paths, no ``..``, no links leaving
    ``dest``, no device files. Any refusal is an integrity error, not a crash."""
    try:
        with tarfile.open(blob, mode="r:") as tar:
            for member in tar.getmembers():
                name = member.name.replace("\\", "/")
                if name.startswith("/") or ".." in name.split("/"):
                    raise ModelIntegrityError(
                        f"model {ref.name}: archive member {member.name!r} escapes the target"
                    )
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise ModelIntegrityError(f"model {ref.name}: cannot unpack archive: {e}") from e
