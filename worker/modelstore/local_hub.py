"""A model hub backed by a local directory: ``<root>/index.json`` plus blobs under it.

``fetch`` copies a blob into the shared cache's partial file (see ``ModelHub``); the cache
verifies and publishes it. ``materialize`` is the older single-process shortcut, kept for
tools and tests that want a verified model without a cache: it copies (ONNX) or unpacks (HF
causal LM tar) the blob into a flat directory addressed by digest, with a temp name and an
atomic rename, but no cross-process lock, eviction or lease. Workers use ``ModelCache``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from worker.modelstore.files import check_digest, copy_limited, safe_extract, sha256_file
from worker.modelstore.hub import ModelIntegrityError
from worker.modelstore.refs import HubIndex, ModelFormat, ModelRef

__all__ = ["INDEX_FILE", "LocalHub", "ModelIntegrityError", "sha256_file"]

INDEX_FILE = "index.json"


class LocalHub:
    """A directory hub. Implements ``worker.modelstore.hub.ModelHub``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalHub({str(self.root)!r})"

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

    def fetch(self, ref: ModelRef, partial: Path) -> None:
        """Append the blob to ``partial`` from its current size (see ``ModelHub.fetch``)."""
        src_path = self.blob_path(ref)
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > ref.size_bytes:
            offset = 0  # longer than the model can be: start again
        with src_path.open("rb") as src, partial.open("r+b" if partial.exists() else "wb") as dst:
            dst.truncate(offset)
            dst.seek(offset)
            src.seek(offset)
            copy_limited(ref, src, dst, offset)
            dst.flush()
            os.fsync(dst.fileno())

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
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            self.fetch(ref, tmp)
            check_digest(ref, sha256_file(tmp))
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
        check_digest(ref, sha256_file(blob))
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            safe_extract(ref, blob, tmp)
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
