"""Payer grants (``schemas.payer``): built from a request or an envelope, signed by a payer's
key, verified the same way by the worker (before it runs a request) and by settlement (before
it bills one). Pure; no I/O."""

from __future__ import annotations

from schemas.canonical import domain_digest
from schemas.payer import Payer, PayerGrant
from schemas.requests import ChatInput, InferenceRequest, MLInput, max_output_tokens
from schemas.results import ResultEnvelope
from schemas.signing import (
    PAYER_DOMAIN,
    ChainSigner,
    Signer,
    verify_chain_signature,
    verify_digest,
)

__all__ = ["envelope_grant", "request_grant", "sign_grant", "verify_payer"]


def request_grant(
    request: InferenceRequest, payload: ChatInput | MLInput, input_hash: str
) -> PayerGrant:
    """The grant a payer signs for ``request`` (``payload`` and ``input_hash``: the plaintext
    ones for a sealed request)."""
    return PayerGrant(
        request_id=request.request_id,
        model=request.model,
        input_hash=input_hash,
        max_output_tokens=max_output_tokens(payload),
        created_unix_ms=request.created_unix_ms,
        settlement=request.settlement,
    )


def envelope_grant(envelope: ResultEnvelope) -> PayerGrant:
    """The grant the payer of a result signed, rebuilt from its signed envelope."""
    return PayerGrant(
        request_id=envelope.request_id,
        model=envelope.model_id,
        input_hash=envelope.input_hash,
        max_output_tokens=envelope.max_output_tokens,
        created_unix_ms=envelope.request_created_unix_ms,
        settlement=envelope.settlement,
    )


def verify_payer(payer: Payer, grant: PayerGrant) -> bool:
    """True when ``payer.signature`` is ``payer.key``'s signature over ``grant``."""
    try:
        digest = domain_digest(PAYER_DOMAIN, grant)
    except ValueError:
        return False
    if payer.scheme == "ed25519":
        return verify_digest(payer.key, digest, payer.signature)
    return verify_chain_signature(digest, payer.signature, payer.key)


def sign_grant(grant: PayerGrant, key: Signer | ChainSigner) -> Payer:
    """A payer's side: sign ``grant`` with an ed25519 (``Signer``) or a chain key."""
    digest = domain_digest(PAYER_DOMAIN, grant)
    if isinstance(key, ChainSigner):
        return Payer(scheme="eip191", key=key.address, signature=key.sign_digest(digest))
    return Payer(scheme="ed25519", key=key.node_id, signature=key.sign_digest(digest))
