"""Attestation settings (nested in ``WorkerSettings`` as ``attestation``; env
``OG_WORKER_ATTESTATION__PROVIDER=tdx`` and so on)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from worker.trust.attestation.configfs_tsm import DEFAULT_TSM_ROOT
from worker.trust.attestation.nitro import DEFAULT_NSM_DEVICE

__all__ = ["AttestationSettings", "ProviderChoice"]

ProviderChoice = Literal["none", "dev", "tdx", "sev-snp", "nitro", "auto"]


class AttestationSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: ProviderChoice = Field(
        default="none",
        description=(
            "none: register without evidence; dev: labelled development statement (rejected "
            "by default verifiers); tdx / sev-snp: configfs-tsm; nitro: /dev/nsm; auto: the "
            "first TEE found (nitro, then configfs-tsm), else dev"
        ),
    )
    configfs_tsm_root: Path = DEFAULT_TSM_ROOT
    configfs_tsm_entry: str | None = Field(
        default=None,
        description="an existing report entry to reuse (created by a privileged step)",
    )
    nsm_device: Path = DEFAULT_NSM_DEVICE
    tdx_collateral_file: Path | None = Field(
        default=None,
        description="Intel collateral (dcap-qvl QuoteCollateralV3 JSON) to attach to TDX quotes",
    )
    snp_certs_dir: Path | None = Field(
        default=None,
        description="vcek.der, ask.der, ark.der from AMD KDS, when the host supplies none",
    )
    dev_key: SecretStr | None = Field(
        default=None, description="hex ed25519 seed for dev statements; default: random"
    )
    allow_dev_tee: bool = Field(
        default=False,
        description="DEVELOPMENT ONLY: serve TEE requests on dev evidence (which proves "
        "nothing); verifiers still reject such results unless they allow dev evidence",
    )
    refresh_interval_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="re-attest this often so verifiers' max evidence age is never reached",
    )
