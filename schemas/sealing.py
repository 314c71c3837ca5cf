"""Sealed requests, both halves: what a client seals and what a node opens (pure, no I/O).

See ``schemas.sealed`` for the wire format. A client turns a plain request into one only the
named nodes can read (``seal_request``), keeping the plaintext payload and a one-time reply key
in the returned ``SealedRequest``; ``SealedRequest.open`` turns the node's ``SealedResult`` back
into an ``InferenceResult`` that ``schemas.verify.verify_result`` checks exactly like a plain one.

A node opens a sealed request with its X25519 key (``NodeSealer.open``) and seals its output to
the client's reply key (``NodeSealer.seal_output``). Opening can fail in three expected ways,
returned as values (not raised) so each gets its own typed error: ``NotARecipient`` (no content
key for this node: another node must answer), ``BadCiphertext`` (tampered or malformed),
``BadPlaintext`` (opens, but is not a valid request for this id/model), ``Mismatch`` (opens,
but binds other routing fields than the request shows). Error messages never contain the
plaintext.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from pydantic import TypeAdapter, ValidationError

from schemas import limits
from schemas.canonical import canonical_bytes
from schemas.codec import loads, scan
from schemas.requests import ChatInput, InferenceRequest, MLInput
from schemas.results import (
    ChatOutput,
    ErrorReply,
    InferenceResult,
    MLOutput,
    Output,
    SealedReply,
    SealedResult,
    StreamChunk,
)
from schemas.sealed import SealedInput, SealedPlaintext, SealedRecipient

__all__ = [
    "BadCiphertext",
    "BadPlaintext",
    "Mismatch",
    "NodeSealer",
    "NotARecipient",
    "Opened",
    "SealedReplyError",
    "SealedRequest",
    "seal_request",
]

_OUTPUT: TypeAdapter[ChatOutput | MLOutput] = TypeAdapter(Output)
_INNER: TypeAdapter[ChatInput | MLInput] = TypeAdapter(ChatInput | MLInput)
_INNER_REPLY: TypeAdapter[ErrorReply | StreamChunk] = TypeAdapter(ErrorReply | StreamChunk)


# -- the client's half ---------------------------------------------------------------------


class SealedReplyError(ValueError):
    """A sealed reply that does not open with this request's key, or opens to garbage."""


@dataclass(frozen=True)
class SealedRequest:
    request: InferenceRequest
    """What to produce: its payload is the ``SealedInput``."""
    plaintext: ChatInput | MLInput
    """The payload as sealed: ``input_hash`` of the result is over it."""
    reply_key: PrivateKey

    def __repr__(self) -> str:
        return f"SealedRequest(request_id={self.request.request_id})"

    def open(self, reply: SealedResult) -> InferenceResult:
        """The result with its output opened; ``SealedReplyError`` if it does not open."""
        if reply.request_id != self.request.request_id:
            raise SealedReplyError("the reply answers another request")
        try:
            raw = SealedBox(self.reply_key).decrypt(base64.b64decode(reply.sealed_output))
            output = _OUTPUT.validate_json(raw)
        except (CryptoError, ValueError, ValidationError) as e:
            raise SealedReplyError("the sealed output does not open with this request's key") from e
        return InferenceResult(
            request_id=reply.request_id,
            envelope=reply.envelope,
            signature=reply.signature,
            chain_signature=reply.chain_signature,
            output=output,
        )

    def open_reply(self, reply: SealedReply) -> ErrorReply | StreamChunk:
        """The signed error or chunk inside a ``SealedReply``; ``SealedReplyError`` if it does
        not open, or answers another request."""
        if reply.request_id != self.request.request_id:
            raise SealedReplyError("the reply answers another request")
        try:
            raw = SealedBox(self.reply_key).decrypt(base64.b64decode(reply.sealed))
            inner = _INNER_REPLY.validate_json(raw)
        except (CryptoError, ValueError, ValidationError) as e:
            raise SealedReplyError("the sealed reply does not open with this request's key") from e
        if inner.request_id != reply.request_id or inner.node_id != reply.node_id:
            raise SealedReplyError("the sealed reply's content names another request or node")
        return inner


def seal_request(request: InferenceRequest, recipients: Sequence[str]) -> SealedRequest:
    """Seal ``request``'s payload to each X25519 key (hex) in ``recipients``. Every field the
    node acts on is bound into the plaintext as the request has it now: set ``reply_to``,
    ``payer`` and the rest before sealing (changing them afterwards makes nodes refuse it)."""
    payload = request.payload
    if isinstance(payload, SealedInput):
        raise ValueError("request is sealed already")
    if not recipients:
        raise ValueError("no recipients: no active node serves the model")
    content_key = nacl.utils.random(SecretBox.KEY_SIZE)
    reply_key = PrivateKey.generate()
    plaintext = SealedPlaintext(
        request_id=request.request_id,
        model=request.model,
        mode=request.mode,
        settlement=request.settlement,
        reply_public_key=reply_key.public_key.encode().hex(),
        reply_to=request.reply_to,
        payer=request.payer,
        created_unix_ms=request.created_unix_ms,
        deadline_unix_ms=request.deadline_unix_ms,
        stream=request.stream,
        payload=payload.model_dump(mode="json"),
    )
    ciphertext = SecretBox(content_key).encrypt(canonical_bytes(plaintext))
    sealed = SealedInput(
        recipients=[
            SealedRecipient(
                x25519_public_key=key,
                sealed_key=base64.b64encode(
                    SealedBox(PublicKey(bytes.fromhex(key))).encrypt(content_key)
                ).decode(),
            )
            for key in dict.fromkeys(recipients)
        ],
        ciphertext=base64.b64encode(bytes(ciphertext)).decode(),
        reply_public_key=reply_key.public_key.encode().hex(),
    )
    return SealedRequest(request.model_copy(update={"payload": sealed}), payload, reply_key)


# -- the node's half -------------------------------------------------------------------------


@dataclass(frozen=True)
class Opened:
    payload: ChatInput | MLInput
    document: dict[str, Any]
    """The payload object as the client sealed it: ``input_hash`` is computed over it."""
    reply_key: PublicKey


@dataclass(frozen=True)
class NotARecipient:
    pass


@dataclass(frozen=True)
class BadCiphertext:
    pass


@dataclass(frozen=True)
class BadPlaintext:
    reason: str


@dataclass(frozen=True)
class Mismatch:
    """Opens, but binds other routing fields than the request carries in clear (someone
    changed the request after it was sealed)."""


class NodeSealer:
    """Holds the node's X25519 private key; never part of ``repr``."""

    def __init__(self, seed: bytes) -> None:
        self._key = PrivateKey(seed)
        self._box = SealedBox(self._key)
        self.public_key_hex: str = self._key.public_key.encode().hex()

    def __repr__(self) -> str:
        return f"NodeSealer(x25519={self.public_key_hex[:16]}...)"

    def open(
        self, request: InferenceRequest, sealed: SealedInput
    ) -> Opened | NotARecipient | BadCiphertext | BadPlaintext | Mismatch:
        mine = [r for r in sealed.recipients if r.x25519_public_key == self.public_key_hex]
        if not mine:
            return NotARecipient()
        try:
            content_key = self._box.decrypt(base64.b64decode(mine[0].sealed_key, validate=True))
            plaintext = SecretBox(content_key).decrypt(
                base64.b64decode(sealed.ciphertext, validate=True)
            )
        except (CryptoError, binascii.Error, ValueError, TypeError):
            return BadCiphertext()
        if len(plaintext) > limits.MAX_MESSAGE_BYTES or scan(plaintext) is not None:
            return BadPlaintext("the sealed payload is not well-formed JSON")
        try:
            inner = SealedPlaintext.model_validate(loads(plaintext))
        except (ValueError, ValidationError):
            return BadPlaintext("the sealed plaintext is not a valid sealed payload")
        if inner.request_id != request.request_id or inner.model != request.model:
            return BadPlaintext("sealed payload was made for another request or model")
        if _clear_fields(inner) != _clear_fields(request, sealed.reply_public_key):
            return Mismatch()
        try:
            payload = _INNER.validate_python(inner.payload)
        except ValidationError:
            return BadPlaintext("the sealed payload is not a valid payload")
        return Opened(payload, inner.payload, PublicKey(bytes.fromhex(sealed.reply_public_key)))

    @staticmethod
    def seal_output(output: ChatOutput | MLOutput, reply_key: PublicKey) -> str:
        """Base64 ``SealedBox(reply_key).encrypt(canonical(output))``."""
        return base64.b64encode(SealedBox(reply_key).encrypt(canonical_bytes(output))).decode()

    @staticmethod
    def seal_reply(reply: ErrorReply | StreamChunk, reply_key: PublicKey) -> SealedReply:
        """A signed error or chunk sealed whole to the client's one-time key."""
        sealed = SealedBox(reply_key).encrypt(canonical_bytes(reply))
        return SealedReply(
            request_id=reply.request_id,
            node_id=reply.node_id,
            sealed=base64.b64encode(sealed).decode(),
        )


def _clear_fields(source: Any, reply_public_key: str | None = None) -> tuple[Any, ...]:
    """The fields a sealed plaintext must repeat, from it or from the request in clear."""
    key = source.reply_public_key if reply_public_key is None else reply_public_key
    return (
        source.mode,
        source.settlement,
        key,
        source.reply_to,
        source.payer,
        source.created_unix_ms,
        source.deadline_unix_ms,
        source.stream,
    )
