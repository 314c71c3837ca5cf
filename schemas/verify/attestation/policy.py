"""What a verifier accepts (``AttestationPolicy``) and what it concluded (``AttestationVerdict``).

The policy is data, not code: the measurement allow-list, the trust anchors, the clock and the
freshness rules are all fields, so settlement, clients and the offline CLI apply the same rules
and a test can pin the clock to the time a sample was produced.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.verify.attestation import roots

__all__ = ["AttestationPolicy", "AttestationVerdict", "Reason"]


class Reason:
    """Machine-readable rejection reasons (``AttestationVerdict.reasons`` entries start with
    one of these, optionally followed by ``": detail"``)."""

    MALFORMED = "malformed"
    """The evidence (or the record around it) cannot be decoded."""
    KIND_MISMATCH = "kind_mismatch"
    """The evidence is of another kind than the record says (e.g. an SGX quote as ``tdx``)."""
    SIGNATURE = "bad_signature"
    """A signature over the evidence does not verify (tampered body, signature or key)."""
    CHAIN = "untrusted_chain"
    """The signing key does not chain to a pinned vendor root, or a certificate is invalid."""
    COLLATERAL = "collateral"
    """TDX collateral missing, expired or not matching the quote."""
    TCB_STATUS = "tcb_status"
    """The platform's TCB status is not among the accepted ones."""
    DEBUG = "debug"
    """The TEE runs with debugging enabled: the host can read its memory."""
    VMPL = "vmpl"
    REPORT_DATA = "report_data_mismatch"
    """The evidence does not bind the expected report_data (the node's keys)."""
    MEASUREMENT = "measurement_not_allowed"
    STALE = "stale"
    """Older than ``max_age_s``."""
    FUTURE = "future"
    """Issued later than now plus ``max_clock_skew_s``."""
    DEV_NOT_ALLOWED = "dev_not_allowed"
    """A development attestation, and the policy does not accept them."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class AttestationPolicy:
    """Rules for accepting TEE evidence. The defaults accept nothing but genuine, non-debug,
    fresh hardware evidence whose measurement is on ``allowed_measurements``.

    Measurements are lower-case hex of (see ``docs/protocol/attestation.md``):
    ``tdx`` MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3 (240 bytes); ``sev-snp`` MEASUREMENT
    (48 bytes); ``nitro`` PCR0 || PCR1 || PCR2 (144 bytes); ``dev`` the development signer's
    ed25519 public key (32 bytes) — for ``dev`` an absent entry means any key.
    """

    allowed_measurements: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_dev: bool = False
    """Accept ``dev`` attestations (development only: they prove nothing)."""
    allow_debug: bool = False
    """Accept debug-enabled TEEs. Only for tests against captured debug samples."""
    max_age_s: float = 7 * 24 * 3600.0
    """Reject evidence issued longer ago than this (by its hardware timestamp for Nitro, the
    signed statement for dev, and the record's ``issued_unix_ms`` for TDX and SEV-SNP)."""
    max_clock_skew_s: float = 300.0
    now_unix_ms: int | None = None
    """The verifier's clock; None means the current time. TDX collateral and CRLs and the
    SEV-SNP certificates are checked at this time; a Nitro chain at the document's own
    timestamp (its leaf lives three hours), whose age ``max_age_s`` then bounds."""
    tdx_root_ca_der: bytes = roots.INTEL_SGX_ROOT_CA_DER
    tdx_allowed_tcb_statuses: frozenset[str] = frozenset({"UpToDate"})
    """dcap-qvl TCB statuses accepted: UpToDate, SWHardeningNeeded, ConfigurationNeeded,
    ConfigurationAndSWHardeningNeeded, OutOfDate, OutOfDateConfigurationNeeded, Revoked."""
    tdx_collateral: Mapping[str, str] | None = None
    """Collateral supplied by the verifier; when set it is used instead of the node's."""
    snp_ark_sha256: frozenset[str] = frozenset({roots.AMD_MILAN_ARK_SHA256})
    snp_max_vmpl: int = 0
    nitro_root_ders: tuple[bytes, ...] = (roots.AWS_NITRO_ROOT_G1_DER,)

    def now_ms(self) -> int:
        return _now_ms() if self.now_unix_ms is None else self.now_unix_ms

    def measurement_allowed(self, kind: str, measurement: str) -> bool:
        allowed = self.allowed_measurements.get(kind)
        if allowed is None:
            return kind == "dev"
        return measurement in allowed

    def age_reasons(self, issued_unix_ms: int) -> list[str]:
        """Freshness of evidence issued at ``issued_unix_ms``."""
        now = self.now_ms()
        if issued_unix_ms > now + self.max_clock_skew_s * 1000:
            return [f"{Reason.FUTURE}: issued {issued_unix_ms - now} ms ahead"]
        if now - issued_unix_ms > self.max_age_s * 1000:
            return [f"{Reason.STALE}: issued {(now - issued_unix_ms) // 1000} s ago"]
        return []


@dataclass(frozen=True)
class AttestationVerdict:
    """The outcome. ``ok`` only when ``reasons`` is empty. ``measurement`` is set whenever the
    evidence's signature verified (so a rejected-for-policy verdict still shows what ran)."""

    ok: bool
    kind: str
    measurement: str | None = None
    reasons: tuple[str, ...] = ()
    claims: Mapping[str, str] = field(default_factory=dict)
    """Extra verified facts for diagnostics (TCB status, module id, evidence time)."""

    @classmethod
    def reject(
        cls,
        kind: str,
        *reasons: str,
        measurement: str | None = None,
        claims: Mapping[str, str] | None = None,
    ) -> AttestationVerdict:
        return cls(False, kind, measurement, tuple(reasons), dict(claims or {}))

    @classmethod
    def decide(
        cls,
        kind: str,
        reasons: list[str],
        measurement: str | None,
        claims: Mapping[str, str] | None = None,
    ) -> AttestationVerdict:
        return cls(not reasons, kind, measurement, tuple(reasons), dict(claims or {}))

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "kind": self.kind,
            "measurement": self.measurement,
            "reasons": list(self.reasons),
            "claims": dict(self.claims),
        }
