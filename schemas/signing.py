"""Signature verification of result envelopes (pure: no key storage, no I/O).

A node signs ``domain_digest(RESULT_DOMAIN, envelope)`` with its ed25519 key; the public key is
the envelope's ``node_id``. Verifying therefore needs nothing but the envelope and signature.
"""

from __future__ import annotations

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from schemas.canonical import RESULT_DOMAIN, domain_digest
from schemas.results import ResultEnvelope

__all__ = ["envelope_digest", "verify_envelope_signature"]


def envelope_digest(envelope: ResultEnvelope) -> bytes:
    """The 32-byte message that the node's ed25519 key signs."""
    return domain_digest(RESULT_DOMAIN, envelope)


def verify_envelope_signature(envelope: ResultEnvelope, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the envelope's node key signature over its digest."""
    try:
        key = VerifyKey(bytes.fromhex(envelope.node_id))
        key.verify(envelope_digest(envelope), bytes.fromhex(signature_hex))
    except (BadSignatureError, ValueError):
        return False
    return True
