"""Choose and build the attestation provider the settings name (one place, at start-up)."""

from __future__ import annotations

import json
import logging
from typing import Literal

from worker.trust.attestation.base import AttestationProvider, AttestationUnavailable
from worker.trust.attestation.configfs_tsm import ConfigfsTsmProvider
from worker.trust.attestation.dev import DevProvider
from worker.trust.attestation.nitro import NitroProvider
from worker.trust.attestation.settings import AttestationSettings

__all__ = ["load_attestation_provider"]

log = logging.getLogger(__name__)


def _configfs(
    settings: AttestationSettings, kind: Literal["tdx", "sev-snp"] | None
) -> ConfigfsTsmProvider:
    collateral = None
    if settings.tdx_collateral_file is not None:
        try:
            collateral = json.loads(settings.tdx_collateral_file.read_text())
        except (OSError, ValueError) as e:
            raise AttestationUnavailable(
                f"cannot read TDX collateral {settings.tdx_collateral_file} ({type(e).__name__})"
            ) from e
        if not isinstance(collateral, dict) or not all(
            isinstance(v, str) for v in collateral.values()
        ):
            raise AttestationUnavailable("TDX collateral must be a JSON object of strings")
    certs: list[bytes] = []
    if settings.snp_certs_dir is not None:
        try:
            certs = [
                (settings.snp_certs_dir / name).read_bytes()
                for name in ("vcek.der", "ask.der", "ark.der")
            ]
        except OSError as e:
            raise AttestationUnavailable(
                f"cannot read SEV-SNP certificates in {settings.snp_certs_dir} ({e.strerror})"
            ) from e
    return ConfigfsTsmProvider(
        settings.configfs_tsm_root,
        kind=kind,
        entry=settings.configfs_tsm_entry,
        snp_certificates=certs,
        tdx_collateral=collateral,
    )


def _dev(settings: AttestationSettings) -> DevProvider:
    seed = None
    if settings.dev_key is not None:
        try:
            seed = bytes.fromhex(settings.dev_key.get_secret_value())
        except ValueError as e:
            raise AttestationUnavailable("attestation dev_key is not hex") from e
        if len(seed) != 32:
            raise AttestationUnavailable("attestation dev_key must be a 32-byte seed")
    return DevProvider(seed)


def load_attestation_provider(settings: AttestationSettings) -> AttestationProvider | None:
    """The provider ``settings.provider`` names, or None for ``none``. ``auto`` picks Nitro
    when ``/dev/nsm`` exists, configfs-tsm when its report directory exists, and otherwise
    falls back to ``dev`` with a warning (verifiers reject dev evidence by default).

    Raises ``AttestationUnavailable`` for a provider whose files cannot be read; whether the
    TEE itself answers is only known at the first ``attest``."""
    choice = settings.provider
    if choice == "none":
        return None
    if choice == "dev":
        return _dev(settings)
    if choice == "nitro":
        return NitroProvider(settings.nsm_device)
    if choice == "tdx" or choice == "sev-snp":
        return _configfs(settings, choice)
    if settings.nsm_device.exists():
        return NitroProvider(settings.nsm_device)
    if settings.configfs_tsm_root.is_dir():
        return _configfs(settings, None)
    log.warning("no TEE found: using a development attestation, which verifiers reject")
    return _dev(settings)
