"""Development attestations for machines without a TEE: an ed25519-signed statement.

Every record says what it is: ``kind`` is ``dev``, the statement's ``notice`` says it proves
nothing about the code that ran, and verifiers reject it unless explicitly configured to accept
it. It exists so that registration, binding and verification run end to end on a laptop.

The signing key is random per process unless a seed is configured; either way it is not a
hardware key and no one should trust it.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from nacl.signing import SigningKey

from schemas.attestation import (
    DEV_STATEMENT_DOMAIN,
    Attestation,
    DevStatement,
    SignedDevStatement,
    encode_b64,
)
from schemas.canonical import canonical_bytes, domain_digest
from worker.trust.attestation.base import check_report_data

__all__ = ["DevProvider"]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class DevProvider:
    name = "dev"

    def __init__(self, seed: bytes | None = None, *, clock_ms: Callable[[], int] = _now_ms) -> None:
        self._key = SigningKey(seed if seed is not None else secrets.token_bytes(32))
        self.public_key: str = self._key.verify_key.encode().hex()
        self._clock_ms = clock_ms

    def __repr__(self) -> str:
        return f"DevProvider(public_key={self.public_key[:16]}...)"

    def attest(self, report_data: bytes) -> Attestation:
        check_report_data(report_data)
        now = self._clock_ms()
        statement = DevStatement(
            report_data=report_data.hex(), issued_unix_ms=now, public_key=self.public_key
        )
        signature = self._key.sign(domain_digest(DEV_STATEMENT_DOMAIN, statement)).signature
        signed = SignedDevStatement(statement=statement, signature=signature.hex())
        return Attestation(
            kind="dev",
            evidence=encode_b64(canonical_bytes(signed)),
            report_data=report_data.hex(),
            issued_unix_ms=now,
            provider="dev",
        )
