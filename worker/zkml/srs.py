"""Where a circuit's KZG SRS comes from, kept by content under ``<root>/srs/``.

A ceremony SRS (``SrsFile``) is copied in once, named by its sha256; EZKL uses the first
2^logrows points of a larger one. A development SRS (``DevSrs``) is generated locally with
``ezkl.gen_srs`` (random each time: whoever generated it could forge proofs), labelled
``dev-k<logrows>-<digest prefix>`` and reused for every circuit of that size.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.proofs import DEV_SRS_PREFIX
from worker.modelstore.locks import held_lock
from worker.zkml.files import atomic_copy, atomic_write, file_sha256

__all__ = ["DevSrs", "SrsError", "SrsFile", "SrsSource", "ensure_srs"]


class SrsError(ValueError):
    """The SRS file cannot serve this circuit (too few rows)."""


@dataclass(frozen=True)
class SrsFile:
    """An SRS from a trusted setup ceremony, given as a file; ``label`` goes into proofs."""

    path: Path
    label: str


@dataclass(frozen=True)
class DevSrs:
    """Generate an SRS locally (``ezkl.gen_srs``): development only, labelled ``dev-…``."""


SrsSource = SrsFile | DevSrs


def ensure_srs(root: Path, logrows: int, srs: SrsSource, ezkl: Any) -> tuple[Path, str, str]:
    """(path, label, sha256) of an SRS for ``logrows`` rows in ``root/srs``."""
    store = root / "srs"
    store.mkdir(parents=True, exist_ok=True)
    if isinstance(srs, SrsFile):
        with srs.path.open("rb") as f:
            k = int.from_bytes(f.read(4), "little")
        if k < logrows:
            raise SrsError(f"SRS {srs.label} has 2^{k} rows; the circuit needs 2^{logrows}")
        digest = file_sha256(srs.path)
        target = store / f"{digest}.srs"
        if not target.exists():
            atomic_copy(srs.path, target)
        return target, srs.label, digest
    sidecar = store / f"dev-k{logrows}.json"
    with held_lock(root / "locks" / f"srs-dev-k{logrows}.lock", timeout_s=600):
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads(sidecar.read_bytes())
            if (store / f"{known['sha256']}.srs").is_file():
                return store / f"{known['sha256']}.srs", known["label"], known["sha256"]
        fd, tmp = tempfile.mkstemp(dir=store, prefix=".tmp-", suffix=".srs")
        os.close(fd)
        try:
            ezkl.gen_srs(tmp, logrows)
            os.chmod(tmp, 0o644)
            digest = file_sha256(Path(tmp))
            os.replace(tmp, store / f"{digest}.srs")
        finally:
            Path(tmp).unlink(missing_ok=True)
        label = f"{DEV_SRS_PREFIX}k{logrows}-{digest[:8]}"
        atomic_write(sidecar, json.dumps({"label": label, "sha256": digest}).encode())
        return store / f"{digest}.srs", label, digest
