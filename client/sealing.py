"""The client's side of sealed requests (see ``schemas.sealed`` for the format).

``seal_request`` turns a plain request into one only the named nodes can read, keeping the
plaintext payload and a one-time reply key in the returned ``SealedRequest``;
``SealedRequest.open`` turns the node's ``SealedResult`` back into an ``InferenceResult`` that
``client.verify_result`` checks exactly like a plain one.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass

import nacl.utils
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox
from pydantic import TypeAdapter, ValidationError

from schemas.canonical import canonical_bytes
from schemas.requests import ChatInput, InferenceRequest, MLInput
from schemas.results import ChatOutput, InferenceResult, MLOutput, Output, SealedResult
from schemas.sealed import SealedInput, SealedPlaintext, SealedRecipient

__all__ = ["SealedReplyError", "SealedRequest", "seal_request"]

_OUTPUT: TypeAdapter[ChatOutput | MLOutput] = TypeAdapter(Output)


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
            output=output,
        )


def seal_request(request: InferenceRequest, recipients: Sequence[str]) -> SealedRequest:
    """Seal ``request``'s payload to each X25519 key (hex) in ``recipients``."""
    payload = request.payload
    if isinstance(payload, SealedInput):
        raise ValueError("request is sealed already")
    if not recipients:
        raise ValueError("no recipients: no active node serves the model")
    content_key = nacl.utils.random(SecretBox.KEY_SIZE)
    plaintext = SealedPlaintext(
        request_id=request.request_id,
        model=request.model,
        payload=payload.model_dump(mode="json"),
    )
    ciphertext = SecretBox(content_key).encrypt(canonical_bytes(plaintext))
    reply_key = PrivateKey.generate()
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
