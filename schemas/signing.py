"""Signing and verifying: one function each, for every signed message of the protocol.

**ed25519** (every message a node or an authority signs): a signature over
``domain_digest(domain, value)`` = ``sha256(domain || 0x00 || JCS(value))``. The domain tag
names the message kind, so a signature made for one kind can never be replayed as another.
The signer's public key travels in the message (``node_id``, ``authority_id``, ``key``), so
verifying needs nothing but the message; whether that key is *trusted* is the verifier's
policy (``schemas.verify``).

**secp256k1** (results, beside ed25519; payer grants may use it too): an EIP-191
``personal_sign`` of the same 32-byte digest, i.e. an ECDSA signature over
``keccak256("\\x19Ethereum Signed Message:\\n32" || digest)``, 65 bytes ``r || s || v`` with
``v`` in {27, 28} and ``s`` in the lower half of the curve order, hex with ``0x``. An EVM
contract checks it with ``ecrecover`` against the signer's chain address (the node registry
contract's ``verifyResult``).

``Signer`` and ``ChainSigner`` hold private keys in memory only (loading them from files or
secrets is the service's job) and never show them in their ``repr``.
"""

from __future__ import annotations

from typing import Any, Final

import coincurve
from eth_hash.auto import keccak
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey
from pydantic import BaseModel

from schemas.canonical import RESULT_DOMAIN, domain_digest
from schemas.results import ErrorReply, ResultEnvelope, StreamChunk

__all__ = [
    "CHUNK_DOMAIN",
    "ERROR_DOMAIN",
    "PAYER_DOMAIN",
    "RESULT_DOMAIN",
    "ChainSigner",
    "Signer",
    "chain_address_of",
    "chain_message_hash",
    "chunk_digest",
    "envelope_digest",
    "error_digest",
    "recover_chain_address",
    "unsigned",
    "verify_chain_signature",
    "verify_chunk_signature",
    "verify_digest",
    "verify_envelope_signature",
    "verify_error_signature",
    "verify_signature",
]

ERROR_DOMAIN: Final = b"og-inference-node/error-reply/v2"
CHUNK_DOMAIN: Final = b"og-inference-node/stream-chunk/v2"
PAYER_DOMAIN: Final = b"og-inference-node/payer-grant/v2"
SIGNATURE_BYTES: Final = 64
CHAIN_SIGNATURE_BYTES: Final = 65
_EIP191_PREFIX: Final = b"\x19Ethereum Signed Message:\n32"
_SECP256K1_HALF_ORDER: Final = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


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
    """The 32-byte message both of a node's keys sign for a result."""
    return domain_digest(RESULT_DOMAIN, envelope)


def verify_envelope_signature(envelope: ResultEnvelope, signature_hex: str) -> bool:
    """True when ``signature_hex`` is the envelope's own node key signature over its digest
    (who that node is, and whether it is admitted, is checked by ``schemas.verify``)."""
    return verify_signature(RESULT_DOMAIN, envelope.node_id, envelope, signature_hex)


def unsigned(message: BaseModel) -> dict[str, Any]:
    """A signed message's JSON form without its ``signature``: what that signature covers."""
    return message.model_dump(mode="json", exclude={"signature"})


def error_digest(fields: dict[str, Any]) -> bytes:
    """What a node signs for an error reply: ``domain_digest(ERROR_DOMAIN, fields)``, the
    reply's JSON form without ``signature``."""
    return domain_digest(ERROR_DOMAIN, fields)


def chunk_digest(fields: dict[str, Any]) -> bytes:
    """What a node signs for a stream chunk (its JSON form without ``signature``)."""
    return domain_digest(CHUNK_DOMAIN, fields)


def verify_error_signature(reply: ErrorReply) -> bool:
    """True when an error reply is signed by the node it names."""
    return verify_signature(ERROR_DOMAIN, reply.node_id, unsigned(reply), reply.signature)


def verify_chunk_signature(chunk: StreamChunk) -> bool:
    """True when a stream chunk is signed by the node it names."""
    return verify_signature(CHUNK_DOMAIN, chunk.node_id, unsigned(chunk), chunk.signature)


def chain_message_hash(digest: bytes) -> bytes:
    """What a chain signature signs: ``keccak256("\\x19Ethereum Signed Message:\\n32" ||
    digest)`` (EIP-191 version 0x45), the hash ``ecrecover`` takes."""
    if len(digest) != 32:
        raise ValueError("a chain signature signs a 32-byte digest")
    return bytes(keccak(_EIP191_PREFIX + digest))


def chain_address_of(public_key: coincurve.PublicKey) -> str:
    """The EVM address of a secp256k1 public key, lower-case hex with ``0x``."""
    return "0x" + bytes(keccak(public_key.format(compressed=False)[1:]))[-20:].hex()


def recover_chain_address(digest: bytes, signature_hex: str) -> str | None:
    """The address whose key made ``signature_hex`` over ``digest`` (as ``ecrecover`` does),
    or None for a malformed signature, ``v`` outside {27, 28} or a high ``s``."""
    try:
        raw = bytes.fromhex(signature_hex.removeprefix("0x"))
        if not signature_hex.startswith("0x") or len(raw) != CHAIN_SIGNATURE_BYTES:
            return None
        v = raw[64]
        if v not in (27, 28) or int.from_bytes(raw[32:64], "big") > _SECP256K1_HALF_ORDER:
            return None
        public = coincurve.PublicKey.from_signature_and_message(
            raw[:64] + bytes([v - 27]), chain_message_hash(digest), hasher=None
        )
    except (ValueError, TypeError):
        return None
    return chain_address_of(public)


def verify_chain_signature(digest: bytes, signature_hex: str, address: str) -> bool:
    """True when ``signature_hex`` over ``digest`` was made by the key of ``address``."""
    recovered = recover_chain_address(digest, signature_hex)
    return recovered is not None and recovered == address.lower()


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

    def sign_digest(self, digest: bytes) -> str:
        """Hex ed25519 signature over a digest computed already."""
        return self._key.sign(digest).signature.hex()

    def sign_envelope(self, envelope: ResultEnvelope) -> str:
        """Hex signature over a result envelope; refuses an envelope naming another node."""
        if envelope.node_id != self.node_id:
            raise ValueError("envelope names another node")
        return self._key.sign(envelope_digest(envelope)).signature.hex()


class ChainSigner:
    """A secp256k1 key (a node's chain account, or a payer's): EIP-191 signatures of digests."""

    def __init__(self, private_key: bytes) -> None:
        self._key = coincurve.PrivateKey(private_key)
        self.address: str = chain_address_of(self._key.public_key)

    def __repr__(self) -> str:
        return f"ChainSigner(address={self.address})"

    def sign_digest(self, digest: bytes) -> str:
        """``0x`` hex of ``r || s || v`` (``v`` = 27 + recovery id; libsecp256k1 gives low s)."""
        raw = self._key.sign_recoverable(chain_message_hash(digest), hasher=None)
        return "0x" + (raw[:64] + bytes([raw[64] + 27])).hex()
