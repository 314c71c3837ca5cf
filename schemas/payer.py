"""Payers: who a request is billed to, proven by the payer's own signature.

A request may name a payer; then it carries the payer's signature over a ``PayerGrant``: the
request id, model, input hash (over the plaintext payload), the most output tokens it allows,
its creation time and settlement mode. The grant is rebuilt from the request (the worker) or
from the signed envelope (settlement), never taken from the message, so a signature cannot be
moved to another request, model, payload or budget. Two schemes:

- ``ed25519``: ``key`` is the 32-byte public key (hex), ``signature`` an ed25519 signature over
  ``domain_digest(PAYER_DOMAIN, grant)``;
- ``eip191``: ``key`` is an EVM address, ``signature`` an EIP-191 signature of the same digest
  (``schemas.signing``): what an Ethereum wallet's ``personal_sign`` makes.

A request without a payer is billed to nobody (settlement may refuse such records).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from schemas import limits
from schemas.base import Hex32, RequestId, SettlementMode, UnixMs, WireModel

__all__ = ["Payer", "PayerGrant", "PayerScheme"]

PayerScheme = Literal["ed25519", "eip191"]
_FORMS = {
    "ed25519": (re.compile(r"[0-9a-f]{64}"), re.compile(r"[0-9a-f]{128}")),
    "eip191": (re.compile(r"0x[0-9a-f]{40}"), re.compile(r"0x[0-9a-f]{130}")),
}


class Payer(WireModel):
    """A payer and its signature over the request's ``PayerGrant``."""

    scheme: PayerScheme
    key: Annotated[str, StringConstraints(max_length=66)]
    """ed25519: the public key, 64 lower-case hex; eip191: the address, ``0x`` + 40 hex."""
    signature: Annotated[str, StringConstraints(max_length=132)]
    """ed25519: 128 lower-case hex; eip191: ``0x`` + 130 lower-case hex."""

    @model_validator(mode="after")
    def _check(self) -> Payer:
        key, signature = _FORMS[self.scheme]
        if not key.fullmatch(self.key):
            raise ValueError("payer key is not in its scheme's form")
        if not signature.fullmatch(self.signature):
            raise ValueError("payer signature is not in its scheme's form")
        return self

    @property
    def account(self) -> str:
        """How the ledger names this payer: ``<scheme>:<key>``."""
        return f"{self.scheme}:{self.key}"


class PayerGrant(WireModel):
    """What a payer signs for one request."""

    request_id: RequestId
    model: str = Field(max_length=limits.MAX_ID_CHARS)
    input_hash: Hex32
    max_output_tokens: int | None = Field(ge=1, le=limits.MAX_NEW_TOKENS)
    """The request's ``params.max_tokens`` (chat); None for ML models."""
    created_unix_ms: UnixMs
    settlement: SettlementMode
