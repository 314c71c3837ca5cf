"""One entry point per question a verifier asks, dispatching on the evidence kind.

- ``verify_attestation``: is this evidence genuine, acceptable under the policy, and does it
  bind exactly these 64 bytes?
- ``verify_node_attestation``: ... and are those bytes the binding of these node keys?
- ``registration_check``: the same as a predicate over a registration, for ``RegistryPolicy``.

All are pure (no network, no files) and return an ``AttestationVerdict``; they never raise on
bad evidence.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from typing import Any

from schemas.attestation import Attestation, binding_report_data, decode_b64
from schemas.verify.admission import AttestationCheck, Verdict
from schemas.verify.attestation.dev import verify_dev_statement
from schemas.verify.attestation.nitro import verify_nitro_document
from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason
from schemas.verify.attestation.snp import verify_snp_report
from schemas.verify.attestation.tdx import verify_tdx_quote

__all__ = [
    "registration_check",
    "registration_verdict",
    "verify_attestation",
    "verify_node_attestation",
]


def verify_attestation(
    attestation: Attestation, *, expected_report_data: bytes, policy: AttestationPolicy
) -> AttestationVerdict:
    """Verify ``attestation`` and that its evidence binds ``expected_report_data``."""
    kind = attestation.kind
    try:
        verdict = _verify(attestation, expected_report_data, policy)
    except Exception as e:  # the last line of defence: bad evidence must never raise
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: {type(e).__name__}")
    if attestation.report_data != expected_report_data.hex() and not any(
        r.startswith(Reason.REPORT_DATA) for r in verdict.reasons
    ):
        reasons = (*verdict.reasons, Reason.REPORT_DATA)
        return AttestationVerdict(False, kind, verdict.measurement, reasons, verdict.claims)
    return verdict


def _verify(att: Attestation, expected: bytes, policy: AttestationPolicy) -> AttestationVerdict:
    if att.kind == "dev" and not policy.allow_dev:
        return AttestationVerdict.reject("dev", Reason.DEV_NOT_ALLOWED)
    try:
        evidence = decode_b64(att.evidence)
        certificates = [decode_b64(c) for c in att.certificates]
    except ValueError:
        return AttestationVerdict.reject(att.kind, f"{Reason.MALFORMED}: base64")
    if att.kind == "tdx":
        return verify_tdx_quote(
            evidence,
            collateral=att.collateral,
            expected_report_data=expected,
            issued_unix_ms=att.issued_unix_ms,
            policy=policy,
        )
    if att.kind == "sev-snp":
        return verify_snp_report(
            evidence,
            certificates=certificates,
            expected_report_data=expected,
            issued_unix_ms=att.issued_unix_ms,
            policy=policy,
        )
    if att.kind == "nitro":
        return verify_nitro_document(evidence, expected_user_data=expected, policy=policy)
    return verify_dev_statement(evidence, expected_report_data=expected, policy=policy)


def verify_node_attestation(
    *,
    node_id: str,
    x25519_public_key: str,
    chain_address: str,
    attestation: Attestation,
    policy: AttestationPolicy,
) -> AttestationVerdict:
    """Verify that ``attestation`` binds these three node keys (``binding_report_data``)."""
    try:
        binding = binding_report_data(
            node_id=node_id, x25519_public_key=x25519_public_key, chain_address=chain_address
        )
    except ValueError as e:
        return AttestationVerdict.reject(attestation.kind, f"{Reason.MALFORMED}: {e}")
    return verify_attestation(attestation, expected_report_data=binding, policy=policy)


_CACHE_ENTRIES = 4096


def registration_verdict(
    policy: AttestationPolicy, approved: Callable[[str, str], bool] | None = None
) -> AttestationCheck:
    """A ``schemas.verify.registry.AttestationCheck``: ``check(registration, at_unix_ms)``.

    The expensive part (signatures, certificate chains, collateral, the binding of the node's
    keys) runs once per piece of evidence and is cached; what depends on time and on who
    approves what is decided again at every use: the evidence's age at ``at_unix_ms``, and
    whether its measurement is allowed by ``policy`` or ``approved(kind, measurement)`` (the
    admission authority's approvals, which may be revoked at any time)."""
    cache: dict[tuple[str, str], AttestationVerdict] = {}
    timeless = {Reason.MEASUREMENT, Reason.STALE, Reason.FUTURE}

    def check(registration: Any, at_unix_ms: int) -> Verdict:
        attestation = getattr(registration, "attestation", None)
        if not isinstance(attestation, Attestation):
            return Verdict(False)
        key = (registration.node_id, hashlib.sha256(attestation.evidence.encode()).hexdigest())
        verdict = cache.get(key)
        if verdict is None:
            verdict = verify_node_attestation(
                node_id=registration.node_id,
                x25519_public_key=registration.x25519_public_key,
                chain_address=registration.chain_address,
                attestation=attestation,
                policy=dataclasses.replace(policy, now_unix_ms=at_unix_ms),
            )
            if len(cache) >= _CACHE_ENTRIES:
                cache.clear()
            cache[key] = verdict
        if verdict.measurement is None or any(
            r.split(":", 1)[0] not in timeless for r in verdict.reasons
        ):
            return Verdict(False, verdict.kind, verdict.measurement)
        kind, measurement = verdict.kind, verdict.measurement
        allowed = policy.measurement_allowed(kind, measurement) or (
            approved is not None and approved(kind, measurement)
        )
        at = dataclasses.replace(policy, now_unix_ms=at_unix_ms)
        fresh = not at.age_reasons(attestation.issued_unix_ms)
        return Verdict(allowed and fresh, kind, measurement)

    return check


def registration_check(policy: AttestationPolicy) -> Callable[[Any], bool]:
    """A predicate over anything with ``node_id``, ``x25519_public_key``, ``chain_address`` and
    ``attestation`` attributes (e.g. ``schemas.registry.NodeRegistration``): True when its
    attestation verifies under ``policy`` and binds those keys. For
    ``schemas.verify.registry.RegistryPolicy(attestation_check=...)``."""

    def check(registration: Any) -> bool:
        attestation = getattr(registration, "attestation", None)
        if not isinstance(attestation, Attestation):
            return False
        return verify_node_attestation(
            node_id=registration.node_id,
            x25519_public_key=registration.x25519_public_key,
            chain_address=registration.chain_address,
            attestation=attestation,
            policy=policy,
        ).ok

    return check
