"""The node's side of sealed requests: open the payload, seal the output.

See ``schemas.sealed`` for the envelope. Opening can fail in three expected ways, returned as
values (not raised) so the pipeline answers each with its own typed error:
``NotARecipient`` (no content key for this node: another node must answer), ``BadCiphertext``
(tampered or malformed), ``BadPlaintext`` (opens, but is not a valid request for this id/model).
Error messages never contain the plaintext.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from pydantic import TypeAdapter, ValidationError

from schemas.canonical import canonical_bytes
from schemas.codec import too_deep
from schemas.requests import ChatInput, InferenceRequest, MLInput
from schemas.results import ChatOutput, MLOutput
from schemas.sealed import SealedInput, SealedPlaintext

__all__ = ["BadCiphertext", "BadPlaintext", "NodeSealer", "NotARecipient", "Opened"]

_INNER: TypeAdapter[ChatInput | MLInput] = TypeAdapter(ChatInput | MLInput)


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
    ) -> Opened | NotARecipient | BadCiphertext | BadPlaintext:
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
        if too_deep(plaintext):
            return BadPlaintext("sealed payload nests too deeply")
        try:
            inner = SealedPlaintext.model_validate(json.loads(plaintext))
        except (ValueError, ValidationError):
            return BadPlaintext("sealed plaintext is not a valid sealed payload")
        if inner.request_id != request.request_id or inner.model != request.model:
            return BadPlaintext("sealed payload was made for another request or model")
        try:
            payload = _INNER.validate_python(inner.payload)
        except ValidationError as e:
            fields = sorted({str(err["loc"][0]) for err in e.errors() if err["loc"]})
            return BadPlaintext(f"sealed payload is invalid (fields: {', '.join(fields)[:200]})")
        return Opened(payload, inner.payload, PublicKey(bytes.fromhex(sealed.reply_public_key)))

    @staticmethod
    def seal_output(output: ChatOutput | MLOutput, reply_key: PublicKey) -> str:
        """Base64 ``SealedBox(reply_key).encrypt(canonical(output))``."""
        return base64.b64encode(SealedBox(reply_key).encrypt(canonical_bytes(output))).decode()
