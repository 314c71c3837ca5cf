"""Published cache entries: one directory per digest, with a manifest of what it holds.

An entry is built under a temporary name and appears under ``entries/<digest>/`` in one
atomic rename, manifest included, so a reader sees a whole entry or none. Single-file
artifacts (ONNX, fixed-latency) are moved in as they are, already verified against the digest;
a tar (HF causal LM, vLLM) is unpacked and its files are hashed into the manifest, so a later
check can tell a damaged file from a good one without the tar.

Manifest (``.og-manifest.json``)::

    {"digest": "<sha256 of the hub artifact>", "model": "<name it was fetched for>",
     "packing": "file" | "tar", "files": {"<relative path>": {"sha256": ..., "size_bytes": N}}}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from worker.modelstore.files import fsync_dir, safe_extract, sha256_file
from worker.modelstore.refs import ModelFormat, ModelRef

__all__ = [
    "MANIFEST_FILE",
    "FileRecord",
    "Manifest",
    "model_path",
    "packing",
    "publish",
    "read_manifest",
    "remove_tree",
    "tree_size_bytes",
    "verify_entry",
]

MANIFEST_FILE = ".og-manifest.json"
Packing = Literal["file", "tar"]
_FILE_NAMES = {ModelFormat.ONNX: "model.onnx", ModelFormat.FIXED_LATENCY: "model.json"}


class FileRecord(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    sha256: str
    size_bytes: int


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    digest: str
    model: str
    packing: Packing
    files: dict[str, FileRecord]

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files.values())


def packing(ref: ModelRef) -> Packing:
    return "file" if ref.format in _FILE_NAMES else "tar"


def model_path(entry: Path, ref: ModelRef, manifest: Manifest) -> Path:
    """What an engine loads: the single file, or the unpacked directory."""
    if manifest.packing == "file":
        (name,) = manifest.files
        return entry / name
    return entry


def read_manifest(entry: Path) -> Manifest | None:
    try:
        return Manifest.model_validate_json((entry / MANIFEST_FILE).read_bytes())
    except (OSError, ValidationError):
        return None


def verify_entry(entry: Path, ref: ModelRef, *, full: bool) -> Manifest | None:
    """The manifest if ``entry`` holds exactly what it lists, else None (damaged).

    ``full`` re-hashes every file; otherwise only names and sizes are compared (cheap, but a
    flipped bit goes unnoticed: a deliberate trade-off for multi-gigabyte models).
    """
    manifest = read_manifest(entry)
    if manifest is None or manifest.digest != ref.digest or manifest.packing != packing(ref):
        return None
    if manifest.packing == "file" and len(manifest.files) != 1:
        return None
    present = {
        p.relative_to(entry).as_posix(): p
        for p in entry.rglob("*")
        if p.name != MANIFEST_FILE and not p.is_dir()
    }
    if set(present) != set(manifest.files):
        return None
    for rel, record in manifest.files.items():
        path = present[rel]
        if path.is_symlink() or path.stat().st_size != record.size_bytes:
            return None
        if full and sha256_file(path) != record.sha256:
            return None
    return manifest


def publish(ref: ModelRef, blob: Path, build: Path, target: Path) -> Manifest:
    """Turn a verified ``blob`` into the entry ``target`` (consumes ``blob``).

    ``build`` is a fresh temporary directory on the same filesystem; the caller holds the
    digest's lock, so ``target`` does not exist.
    """
    build.mkdir(mode=0o755)
    try:
        if packing(ref) == "file":
            name = _FILE_NAMES[ref.format]
            os.replace(blob, build / name)
            (build / name).chmod(0o644)
            files = {name: FileRecord(sha256=ref.digest, size_bytes=(build / name).stat().st_size)}
        else:
            safe_extract(ref, blob, build)
            blob.unlink()
            files = {}
            for path in sorted(p for p in build.rglob("*") if p.is_file()):
                _fsync_file(path)
                rel = path.relative_to(build).as_posix()
                files[rel] = FileRecord(sha256=sha256_file(path), size_bytes=path.stat().st_size)
        manifest = Manifest(digest=ref.digest, model=ref.name, packing=packing(ref), files=files)
        with (build / MANIFEST_FILE).open("w") as f:
            f.write(manifest.model_dump_json())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(build)
        os.rename(build, target)
        fsync_dir(target.parent)
    except BaseException:
        remove_tree(build)
        raise
    return manifest


def tree_size_bytes(path: Path) -> int:
    """Bytes in the files under ``path`` (0 if it is gone)."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())
