"""Intel TDX and AMD SEV-SNP evidence through the Linux configfs-tsm interface.

The kernel (``Documentation/ABI/testing/configfs-tsm``, Linux 6.7+) exposes report generation
as a directory under ``/sys/kernel/config/tsm/report``: ``mkdir`` an entry, write the 64 bytes
of report data to ``inblob``, read the quote or report from ``outblob``, the SEV-SNP
certificate table from ``auxblob`` (when the host supplies one), the TEE driver's name from
``provider`` (``tdx_guest`` or ``sev_guest``), then ``rmdir``. ``generation`` counts writes to
the entry; if it moved by more than our one write, another process wrote ``inblob`` between our
write and read, and the outblob may answer their data, so we retry.

Creating an entry needs root (configfs directories are root-owned). A worker running without
it can use an entry that a privileged init step created and handed over (``entry``): it is
then reused and never removed.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from schemas.attestation import Attestation, encode_b64
from worker.trust.attestation.base import (
    AttestationFailed,
    AttestationUnavailable,
    check_report_data,
)

__all__ = ["DEFAULT_TSM_ROOT", "ConfigfsTsmProvider", "parse_snp_cert_table"]

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDER_KINDS: Mapping[str, Literal["tdx", "sev-snp"]] = {
    "tdx_guest": "tdx",
    "sev_guest": "sev-snp",
}
MAX_BLOB_BYTES = 1 << 20
ATTEMPTS = 3

# GHCB specification, "SNP Extended Guest Request": the certificate table's GUIDs.
VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
_TABLE_ENTRY_BYTES = 24


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _mkdir_entry(path: Path) -> None:
    """configfs creates the entry's attribute files as part of the mkdir."""
    path.mkdir()


def _rmdir_entry(path: Path) -> None:
    path.rmdir()


def _read(path: Path, *, optional: bool = False) -> bytes:
    try:
        with path.open("rb") as f:
            return f.read(MAX_BLOB_BYTES)
    except OSError as e:
        # auxblob reads fail (ENOENT, EINVAL, ENXIO) where the TEE has nothing to add.
        if optional and e.errno in (errno.ENOENT, errno.EINVAL, errno.ENXIO, errno.EOPNOTSUPP):
            return b""
        raise


def _write(path: Path, data: bytes) -> None:
    # No O_CREAT: every attribute exists on a real configfs entry; creating one would hide a
    # wrong path behind a silently ignored write.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def parse_snp_cert_table(blob: bytes) -> list[bytes]:
    """[VCEK, ASK, ARK] DER from an SEV-SNP certificate table (GHCB spec): 24-byte entries
    ``(guid[16], offset u32 LE, length u32 LE)`` ending with an all-zero entry, offsets from
    the start of the blob. GUIDs are accepted in RFC 4122 or little-endian byte order.
    Returns [] when the table lacks any of the three."""
    found: dict[uuid.UUID, bytes] = {}
    wanted = {g.bytes: g for g in (VCEK_GUID, ASK_GUID, ARK_GUID)}
    wanted.update({g.bytes_le: g for g in (VCEK_GUID, ASK_GUID, ARK_GUID)})
    for start in range(0, len(blob) - _TABLE_ENTRY_BYTES + 1, _TABLE_ENTRY_BYTES):
        entry = blob[start : start + _TABLE_ENTRY_BYTES]
        if not any(entry):
            break
        guid = wanted.get(entry[:16])
        offset = int.from_bytes(entry[16:20], "little")
        length = int.from_bytes(entry[20:24], "little")
        if guid is not None and 0 < length and offset + length <= len(blob):
            found[guid] = blob[offset : offset + length]
    if len(found) != 3:
        return []
    return [found[VCEK_GUID], found[ASK_GUID], found[ARK_GUID]]


class ConfigfsTsmProvider:
    """Evidence from configfs-tsm. ``kind`` None accepts whichever TEE the kernel provides."""

    name = "configfs-tsm"

    def __init__(
        self,
        root: Path = DEFAULT_TSM_ROOT,
        *,
        kind: Literal["tdx", "sev-snp"] | None = None,
        entry: str | None = None,
        snp_certificates: Sequence[bytes] = (),
        tdx_collateral: Mapping[str, str] | None = None,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.root = root
        self.kind = kind
        self.entry = entry
        self._snp_certificates = list(snp_certificates)
        self._tdx_collateral = dict(tdx_collateral) if tdx_collateral is not None else None
        self._clock_ms = clock_ms

    def __repr__(self) -> str:
        return f"ConfigfsTsmProvider(root={str(self.root)!r}, kind={self.kind!r})"

    def attest(self, report_data: bytes) -> Attestation:
        check_report_data(report_data)
        if not self.root.is_dir():
            raise AttestationUnavailable(
                f"configfs-tsm is not available at {self.root} (needs Linux 6.7+, configfs "
                "mounted at /sys/kernel/config and the tdx_guest or sev_guest driver)"
            )
        own = self.entry is None
        path = self.root / (self.entry or f"og-{os.getpid()}-{secrets.token_hex(4)}")
        if own:
            try:
                _mkdir_entry(path)
            except PermissionError as e:
                raise AttestationUnavailable(
                    f"cannot create a report entry under {self.root}: run as root, or have a "
                    "privileged step create one and name it in the attestation settings"
                ) from e
            except OSError as e:
                raise AttestationFailed(f"cannot create a report entry ({e.strerror})") from e
        try:
            provider, outblob, auxblob = self._generate(path, report_data)
        finally:
            if own:
                try:
                    _rmdir_entry(path)
                except OSError:
                    pass  # a leaked entry holds no secret; the kernel frees it on reboot
        return self._attestation(provider, outblob, auxblob, report_data)

    def _generate(self, path: Path, report_data: bytes) -> tuple[str, bytes, bytes]:
        try:
            for _ in range(ATTEMPTS):
                before = int(_read(path / "generation").strip() or b"0")
                _write(path / "inblob", report_data)
                outblob = _read(path / "outblob")
                auxblob = _read(path / "auxblob", optional=True)
                after = int(_read(path / "generation").strip() or b"0")
                if after == before + 1:
                    provider = _read(path / "provider").decode("ascii", "replace").strip()
                    return provider, outblob, auxblob
        except FileNotFoundError as e:
            raise AttestationUnavailable(
                f"{path} is not a configfs-tsm report entry (missing {Path(str(e.filename)).name})"
            ) from e
        except (OSError, ValueError) as e:
            raise AttestationFailed(f"configfs-tsm report failed ({type(e).__name__})") from e
        raise AttestationFailed("configfs-tsm entry written concurrently by another process")

    def _attestation(
        self, provider: str, outblob: bytes, auxblob: bytes, report_data: bytes
    ) -> Attestation:
        kind = PROVIDER_KINDS.get(provider)
        if kind is None:
            raise AttestationUnavailable(f"unsupported configfs-tsm provider {provider[:32]!r}")
        if self.kind is not None and kind != self.kind:
            raise AttestationUnavailable(f"configured for {self.kind} but this is {kind}")
        if not outblob:
            raise AttestationFailed("configfs-tsm returned empty evidence")
        certificates: list[bytes] = []
        if kind == "sev-snp":
            certificates = parse_snp_cert_table(auxblob) or self._snp_certificates
            if len(certificates) != 3:
                raise AttestationFailed(
                    "SEV-SNP: the host supplies no VCEK/ASK/ARK certificate table and none "
                    "are configured (snp_certs_dir)"
                )
        return Attestation(
            kind=kind,
            evidence=encode_b64(outblob),
            report_data=report_data.hex(),
            issued_unix_ms=self._clock_ms(),
            provider=provider,
            certificates=[encode_b64(c) for c in certificates],
            collateral=self._tdx_collateral if kind == "tdx" else None,
        )
