"""Development attestations: an ed25519-signed statement from a machine without a TEE.

It carries the same report_data binding as real evidence, so the whole registration path can
be exercised on a laptop, but nothing stops anyone from producing one: policies reject it
unless ``allow_dev`` is set, and even then only the binding, signature and age are checked.
"""

from __future__ import annotations

import hmac
import json

from pydantic import ValidationError

from schemas.attestation import DEV_STATEMENT_DOMAIN, SignedDevStatement
from schemas.signing import verify_signature
from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason

__all__ = ["parse_dev_statement", "verify_dev_statement"]

MAX_STATEMENT_BYTES = 4096


def parse_dev_statement(raw: bytes) -> SignedDevStatement:
    """Decode the evidence bytes of a ``dev`` attestation; raises ``ValueError``."""
    if len(raw) > MAX_STATEMENT_BYTES:
        raise ValueError("statement too large")
    try:
        return SignedDevStatement.model_validate(json.loads(raw))
    except (ValidationError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("not a development statement") from e


def verify_dev_statement(
    raw: bytes, *, expected_report_data: bytes, policy: AttestationPolicy
) -> AttestationVerdict:
    kind = "dev"
    if not policy.allow_dev:
        return AttestationVerdict.reject(kind, Reason.DEV_NOT_ALLOWED)
    try:
        signed = parse_dev_statement(raw)
    except ValueError:
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: dev statement")
    statement = signed.statement
    if not verify_signature(
        DEV_STATEMENT_DOMAIN, statement.public_key, statement, signed.signature
    ):
        return AttestationVerdict.reject(kind, Reason.SIGNATURE)
    measurement = statement.public_key
    reasons: list[str] = []
    if not hmac.compare_digest(bytes.fromhex(statement.report_data), expected_report_data):
        reasons.append(Reason.REPORT_DATA)
    if not policy.measurement_allowed(kind, measurement):
        reasons.append(Reason.MEASUREMENT)
    reasons += policy.age_reasons(statement.issued_unix_ms)
    claims = {"notice": statement.notice, "issued_unix_ms": str(statement.issued_unix_ms)}
    return AttestationVerdict.decide(kind, reasons, measurement, claims)
