"""Signing and verifying: one function each, for every signed message of the protocol.

Every signature is ed25519 over ``domain_digest(domain, value)`` =
``sha256(domain || 0x00 || JCS(value))``: the domain tag names the message kind, so a signature
made for one kind can never be replayed as another. The signer's public key travels in the
message (``node_id``, ``authority_id``, ``public_key``), so verifying needs nothing but the
message; whether that key is *trusted* is the verifier's policy (``schemas.verify``).

``Signer`` holds a private key in memory only (loading it from a file or a secret is the
service's job) and never shows it in its ``repr``.
"""

from __future__ import annotations

from typing import Any, Final

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from schemas.canonical import RESULT_DOMAIN, domain_digest
from schemas.results import ResultEnvelope

__all__ = [
    "RESULT_DOMAIN",
    "Signer",
    "envelope_digest",
    "verify_digest",
    "verify_envelope_signature",
    "verify_signature",
]

SIGNATURE_BYTES: Final = 64


def verify_signature(domain: bytes, public_key_hex: str, value: Any, signature_hex: str) -> bool:
    """True when ``signature_hex`` is ``public_key_hex``'s ed25519 signature over
    ``domain_digest(domain, value)``. Never raises for malformed keys or signatures."""
    try:
        digest = domain_digest(domain, value)
    except ValueError:  # not canonicalisable: nothing can have signed it
        return False
    return verify_digest(public_key_hex, digest, signature_hex)


def verify_digest(public_key_hex: str, digest: bytes, signature_hex: str) -> bool:
    """``verify_signature`` for a digest computed already (settlement keeps it for the leaf)."""
    try:
        signature = bytes.fromhex(signature_hex)
        if len(signature) != SIGNATURE_BYTES:
            return False
        VerifyKey(bytes.fromhex(public_key_hex)).verify(digest, signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def envelope_digest(envelope: ResultEnvelope) -> bytes:
    """The 32-byte message that the node's ed25519 key signs for a result."""
    return domain_digest(RESULT_DOMAIN, envelope)


def verify_envelope_signature(envelope: ResultEnvelope, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the envelope's own node key signature over its digest
    (who that node is, and whether it is admitted, is checked by ``schemas.verify``)."""
    return verify_signature(RESULT_DOMAIN, envelope.node_id, envelope, signature_hex)


class Signer:
    """An ed25519 identity: ``node_id`` is the hex public key."""

    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)
        self.node_id: str = self._key.verify_key.encode().hex()

    def __repr__(self) -> str:
        return f"Signer(node_id={self.node_id[:16]}...)"

    def sign(self, domain: bytes, value: Any) -> str:
        """Hex ed25519 signature over ``domain_digest(domain, value)``."""
        return self._key.sign(domain_digest(domain, value)).signature.hex()

    def sign_envelope(self, envelope: ResultEnvelope) -> str:
        """Hex signature over a result envelope; refuses an envelope naming another node."""
        if envelope.node_id != self.node_id:
            raise ValueError("envelope names another node")
        return self._key.sign(envelope_digest(envelope)).signature.hex()
