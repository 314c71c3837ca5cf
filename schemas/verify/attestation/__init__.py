"""Offline verification of TEE attestations (Intel TDX, AMD SEV-SNP, AWS Nitro, development).

Pure functions over data: the evidence, the vendor's collateral and certificates, and the trust
anchors all arrive as bytes, so settlement, clients and ``inference-node verify`` check the same
things with no network access. Results are ``AttestationVerdict`` values, never exceptions.
The byte-level rules: ``docs/protocol/attestation.md``.
"""

from schemas.verify.attestation.nitro import (
    nitro_measurement,
    parse_nitro_document,
    verify_nitro_document,
)
from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason
from schemas.verify.attestation.settings import AttestationPolicySettings
from schemas.verify.attestation.snp import verify_snp_report
from schemas.verify.attestation.tdx import tdx_measurement, verify_tdx_quote
from schemas.verify.attestation.verify import (
    registration_check,
    registration_verdict,
    verify_attestation,
    verify_node_attestation,
)

__all__ = [
    "AttestationPolicy",
    "AttestationPolicySettings",
    "AttestationVerdict",
    "Reason",
    "nitro_measurement",
    "parse_nitro_document",
    "registration_check",
    "registration_verdict",
    "tdx_measurement",
    "verify_attestation",
    "verify_nitro_document",
    "verify_node_attestation",
    "verify_snp_report",
    "verify_tdx_quote",
]
