"""The verifier's attestation policy as settings (for settlement, clients and the CLI).

Nest it in a service's settings (``attestation: AttestationPolicySettings``; env e.g.
``OG_SETTLEMENT_ATTESTATION__ALLOWED_MEASUREMENTS='{"tdx": ["…"]}'``) and call ``policy()``
where verification happens. Trust anchors stay the built-in defaults unless a policy file
replaces them in code; measurements, freshness and the dev/debug switches are settings.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.verify.attestation.policy import AttestationPolicy
from schemas.verify.attestation.roots import AMD_MILAN_ARK_SHA256

__all__ = ["AttestationPolicySettings"]

Kind = Literal["tdx", "sev-snp", "nitro", "dev"]


class AttestationPolicySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed_measurements: dict[Kind, list[str]] = Field(
        default_factory=dict,
        description="per kind, the measurements (hex) of images you trust; empty: none",
    )
    allow_dev: bool = Field(
        default=False, description="accept development attestations (no TEE; never in production)"
    )
    allow_debug: bool = False
    max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_clock_skew_s: float = Field(default=300.0, ge=0)
    now_unix_ms: int | None = Field(default=None, ge=0, description="a fixed clock (offline)")
    tdx_allowed_tcb_statuses: list[str] = Field(default_factory=lambda: ["UpToDate"])
    tdx_collateral: dict[str, str] | None = None
    snp_ark_sha256: list[str] = Field(default_factory=lambda: [AMD_MILAN_ARK_SHA256])
    snp_max_vmpl: int = Field(default=0, ge=0, le=3)

    @field_validator("allowed_measurements")
    @classmethod
    def _lower_hex(cls, value: dict[Kind, list[str]]) -> dict[Kind, list[str]]:
        out: dict[Kind, list[str]] = {}
        for kind, items in value.items():
            out[kind] = []
            for item in items:
                try:
                    bytes.fromhex(item)
                except ValueError as e:
                    raise ValueError(f"{kind} measurement is not hex") from e
                out[kind].append(item.lower())
        return out

    def policy(self) -> AttestationPolicy:
        return AttestationPolicy(
            allowed_measurements={k: frozenset(v) for k, v in self.allowed_measurements.items()},
            allow_dev=self.allow_dev,
            allow_debug=self.allow_debug,
            max_age_s=self.max_age_s,
            max_clock_skew_s=self.max_clock_skew_s,
            now_unix_ms=self.now_unix_ms,
            tdx_allowed_tcb_statuses=frozenset(self.tdx_allowed_tcb_statuses),
            tdx_collateral=self.tdx_collateral,
            snp_ark_sha256=frozenset(s.lower() for s in self.snp_ark_sha256),
            snp_max_vmpl=self.snp_max_vmpl,
        )
