"""AMD SEV-SNP attestation reports, verified offline with ``omne-attest`` and AMD's chain as data.

omne-attest checks the report's ECDSA P-384 signature under the VCEK, the chain VCEK <- ASK <-
ARK (RSA-PSS), the ARK against a pinned hash, and that the VCEK belongs to this chip (CHIP_ID)
at this TCB (REPORTED_TCB). It does not look at certificate validity periods, so we do, at the
verifier's clock; and we apply our policy: debug bit, VMPL, report_data, measurement, age.
"""

from __future__ import annotations

import hashlib
import hmac
import warnings
from datetime import UTC, datetime

import omne_attest  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning

from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason

__all__ = ["verify_snp_report"]

POLICY_DEBUG = 1 << 19
"""Guest policy bit 19 (DEBUG): the hypervisor may debug the guest, so it is not confidential."""

_CHAIN_FAILURES = {"chain_signature", "ark_not_pinned", "chip_id_mismatch", "tcb_mismatch"}
_CERT_FAILURES = {"vcek_parse", "vcek_key_type", "missing_extension"}


def verify_snp_report(
    report: bytes,
    *,
    certificates: list[bytes],
    expected_report_data: bytes,
    issued_unix_ms: int,
    policy: AttestationPolicy,
) -> AttestationVerdict:
    """Verify a raw 1,184-byte report. ``certificates`` = [VCEK, ASK, ARK] DER. Never raises."""
    kind = "sev-snp"
    if len(certificates) != 3:
        return AttestationVerdict.reject(kind, f"{Reason.CHAIN}: need VCEK, ASK and ARK")
    vcek, ask, ark = certificates
    ark_sha256 = hashlib.sha256(ark).hexdigest()
    if ark_sha256 not in policy.snp_ark_sha256:
        return AttestationVerdict.reject(kind, f"{Reason.CHAIN}: ARK is not pinned")
    # AMD issues VCEKs with serial number 0, which cryptography loads with a deprecation
    # warning; the certificate is AMD's and correct for its purpose, so the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            parsed = omne_attest.verify(
                report,
                vcek,
                ask,
                ark,
                bytes.fromhex(ark_sha256),
                omne_attest.Policy(max_vmpl=3, reject_debug=False),
            )
        except omne_attest.Fail as e:
            return AttestationVerdict.reject(kind, _fail_reason(e))
        except Exception:  # a malformed certificate can fail inside cryptography
            return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: certificate")
        validity = _validity_reasons(certificates, policy.now_ms())

    measurement = bytes(parsed.measurement).hex()
    reasons = list(validity)
    if parsed.policy & POLICY_DEBUG and not policy.allow_debug:
        reasons.append(f"{Reason.DEBUG}: guest policy allows debugging")
    if parsed.vmpl > policy.snp_max_vmpl:
        reasons.append(f"{Reason.VMPL}: {parsed.vmpl}")
    if not hmac.compare_digest(bytes(parsed.report_data), expected_report_data):
        reasons.append(Reason.REPORT_DATA)
    if not policy.measurement_allowed(kind, measurement):
        reasons.append(Reason.MEASUREMENT)
    reasons += policy.age_reasons(issued_unix_ms)
    tcb = parsed.reported_tcb
    claims = {
        "report_version": str(parsed.version),
        "guest_policy": hex(parsed.policy),
        "vmpl": str(parsed.vmpl),
        "reported_tcb": f"bl={tcb.boot_loader} tee={tcb.tee} snp={tcb.snp} ucode={tcb.microcode}",
    }
    return AttestationVerdict.decide(kind, reasons, measurement, claims)


def _fail_reason(e: Exception) -> str:
    kind = getattr(getattr(e, "kind", None), "value", "")
    if kind == "report_signature":
        return f"{Reason.SIGNATURE}: report signature does not verify under the VCEK"
    if kind in _CHAIN_FAILURES:
        return f"{Reason.CHAIN}: {kind}"
    if kind in _CERT_FAILURES:
        return f"{Reason.CHAIN}: {kind}"
    return f"{Reason.MALFORMED}: {kind or 'report'}"


def _validity_reasons(certificates: list[bytes], now_ms: int) -> list[str]:
    now = datetime.fromtimestamp(now_ms / 1000, UTC)
    reasons = []
    for name, der in zip(("VCEK", "ASK", "ARK"), certificates, strict=True):
        cert = x509.load_der_x509_certificate(der)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            reasons.append(f"{Reason.CHAIN}: {name} not valid at verification time")
    return reasons
