"""The node's ed25519 identity: signs result envelopes.

The node id is the hex public key, so any verifier can check a signature from the envelope
alone (see ``schemas.signing``). The signing key never leaves this object and is not part of
its ``repr``.
"""

from __future__ import annotations

from typing import Any

from nacl.signing import SigningKey

from schemas.canonical import domain_digest
from schemas.results import ResultEnvelope
from schemas.signing import envelope_digest

__all__ = ["Signer"]


class Signer:
    def __init__(self, seed: bytes) -> None:
        self._key = SigningKey(seed)
        self.node_id: str = self._key.verify_key.encode().hex()

    def __repr__(self) -> str:
        return f"Signer(node_id={self.node_id[:16]}...)"

    def sign_envelope(self, envelope: ResultEnvelope) -> str:
        """Hex ed25519 signature over the envelope's domain-separated digest."""
        if envelope.node_id != self.node_id:
            raise ValueError("envelope names another node")
        return self._key.sign(envelope_digest(envelope)).signature.hex()

    def sign(self, domain: bytes, value: Any) -> str:
        """Hex ed25519 signature over ``domain_digest(domain, value)``: for every signed
        message other than result envelopes (registrations, proof records), each with its own
        domain so a signature can never be replayed as another kind of message."""
        return self._key.sign(domain_digest(domain, value)).signature.hex()
