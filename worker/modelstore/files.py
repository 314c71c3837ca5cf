"""File helpers shared by the hubs and the cache: hashing, durable writes, safe unpacking."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path
from typing import BinaryIO

from worker.modelstore.hub import ModelIntegrityError
from worker.modelstore.refs import ModelRef

__all__ = [
    "CHUNK_BYTES",
    "check_digest",
    "copy_limited",
    "fsync_dir",
    "safe_extract",
    "sha256_file",
]

CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def check_digest(ref: ModelRef, actual: str) -> None:
    if actual != ref.digest:
        raise ModelIntegrityError(
            f"model {ref.name}@{ref.version}: blob sha256 {actual} does not match the index "
            f"digest {ref.digest}"
        )


def copy_limited(ref: ModelRef, src: BinaryIO, dst: BinaryIO, already_bytes: int) -> int:
    """Copy ``src`` to ``dst`` until EOF; refuse to grow past ``ref.size_bytes``.

    A hub that sends more than the index promised is broken or hostile: stopping at the
    declared size keeps it from filling the shared volume. Returns the bytes copied.
    """
    copied = 0
    while chunk := src.read(CHUNK_BYTES):
        copied += len(chunk)
        if already_bytes + copied > ref.size_bytes:
            raise ModelIntegrityError(
                f"model {ref.name}: the hub sent more than the {ref.size_bytes} bytes its "
                "index declares"
            )
        dst.write(chunk)
    return copied


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a crash must not lose a publish)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_extract(ref: ModelRef, blob: Path, dest: Path) -> None:
    """Unpack a tar with the ``data`` filter: no absolute paths, no ``..``, no links leaving
    ``dest``, no device files. Any refusal is an integrity error, not a crash. Only plain
    (uncompressed) tars are read, so what is unpacked is never larger than the blob."""
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
