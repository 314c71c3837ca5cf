"""Key material on disk: created once, never overwritten, readable by the owner only.

Keys are 32-byte seeds stored as hex in a file created with ``O_EXCL`` and mode 0600, so two
processes starting at once cannot both create (and later disagree about) the node identity.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["KeyFileError", "load_or_create_seed"]

SEED_BYTES = 32


class KeyFileError(Exception):
    """A key file exists but cannot be used (bad permissions or content)."""


def load_or_create_seed(path: Path) -> bytes:
    """Return the 32-byte seed stored at ``path``, creating it on first use."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_seed(path)
    seed = secrets.token_bytes(SEED_BYTES)
    with os.fdopen(fd, "w") as f:
        f.write(seed.hex() + "\n")
    return seed


def _read_seed(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path} is accessible by group or others (mode {mode:o}); chmod 600")
    text = path.read_text().strip()
    try:
        seed = bytes.fromhex(text)
    except ValueError as e:
        raise KeyFileError(f"{path} does not hold a hex key") from e
    if len(seed) != SEED_BYTES:
        raise KeyFileError(f"{path} holds {len(seed)} bytes, expected {SEED_BYTES}")
    return seed
