"""The protocol test vectors, recomputed from first principles (sha256, RFC 8785, ed25519) and
checked against our implementation, so PROTOCOL.md, the vectors and the code agree."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey, SealedBox
from nacl.secret import SecretBox
from nacl.signing import SigningKey, VerifyKey

from schemas import InferenceRequest, InferenceResult
from schemas.verify.result import verify_result

VECTORS = json.loads(
    (Path(__file__).parents[2] / "docs" / "vectors" / "results-v1.json").read_text()
)["vectors"]
DOMAIN = b"og-inference-node/result-envelope/v1"


def _h(value: Any) -> str:
    return hashlib.sha256(rfc8785.dumps(value)).hexdigest()


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_from_first_principles(v: dict[str, Any]) -> None:
    request, result = v["request"], v["result"]
    envelope = result["envelope"]
    assert rfc8785.dumps(request["payload"]).decode() == v["canonical_payload"]
    assert _h(request["payload"]) == v["input_hash"] == envelope["input_hash"]
    assert rfc8785.dumps(result["output"]).decode() == v["canonical_output"]
    assert _h(result["output"]) == v["output_hash"] == envelope["output_hash"]
    assert rfc8785.dumps(envelope).decode() == v["canonical_envelope"]
    digest = hashlib.sha256(DOMAIN + b"\x00" + rfc8785.dumps(envelope)).digest()
    assert digest.hex() == v["signing_digest_hex"]
    key = SigningKey(bytes.fromhex(v["ed25519_seed_hex"]))
    assert key.verify_key.encode().hex() == v["node_id"] == envelope["node_id"]
    assert key.sign(digest).signature.hex() == v["signature"] == result["signature"]
    VerifyKey(bytes.fromhex(envelope["node_id"])).verify(digest, bytes.fromhex(v["signature"]))


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_verifies_with_our_code(v: dict[str, Any]) -> None:
    result = InferenceResult.model_validate(v["result"])
    request = InferenceRequest.model_validate(v["request"])
    assert verify_result(result, request).ok


def test_input_hash_is_over_the_payload_as_sent() -> None:
    """A producer omitting optional fields must be able to recompute input_hash."""
    from schemas.requests import input_hash

    sent = {"kind": "chat", "messages": [{"role": "user", "content": "hi"}]}
    parsed = InferenceRequest.model_validate(
        {"request_id": "r", "model": "demo-lm", "created_unix_ms": 0, "payload": sent}
    ).payload
    assert input_hash(sent) == _h(sent)
    assert input_hash(parsed) != input_hash(sent)  # defaults change the canonical form


REGISTRY_SEALED = json.loads(
    (Path(__file__).parents[2] / "docs" / "vectors" / "registry-sealed-v1.json").read_text()
)


def test_registration_vector_from_first_principles() -> None:
    v = REGISTRY_SEALED["registration"]
    record = v["record"]
    registration = record["registration"]
    assert rfc8785.dumps(registration).decode() == v["canonical_registration"]
    digest = hashlib.sha256(
        b"og-inference-node/node-registration/v1" + b"\x00" + rfc8785.dumps(registration)
    ).digest()
    assert digest.hex() == v["signing_digest_hex"]
    VerifyKey(bytes.fromhex(registration["node_id"])).verify(
        digest, bytes.fromhex(record["signature"])
    )
    x25519 = PrivateKey(bytes.fromhex(v["x25519_seed_hex"]))
    assert x25519.public_key.encode().hex() == registration["x25519_public_key"]
    flipped = {**registration, "heartbeat_interval_s": 11.0}
    other = hashlib.sha256(
        b"og-inference-node/node-registration/v1" + b"\x00" + rfc8785.dumps(flipped)
    ).digest()
    with pytest.raises(BadSignatureError):
        VerifyKey(bytes.fromhex(registration["node_id"])).verify(
            other, bytes.fromhex(record["signature"])
        )


def test_sealed_vector_from_first_principles() -> None:
    v = REGISTRY_SEALED["sealed"]
    request, result = v["request"], v["result"]
    node = PrivateKey(bytes.fromhex(v["node_x25519_seed_hex"]))
    [recipient] = request["payload"]["recipients"]
    assert recipient["x25519_public_key"] == node.public_key.encode().hex()
    content_key = SealedBox(node).decrypt(base64.b64decode(recipient["sealed_key"]))
    plaintext = SecretBox(content_key).decrypt(base64.b64decode(request["payload"]["ciphertext"]))
    inner = json.loads(plaintext)
    assert plaintext == rfc8785.dumps(inner)
    assert inner == {
        "request_id": request["request_id"],
        "model": request["model"],
        "payload": v["plaintext_payload"],
    }
    envelope = result["envelope"]
    assert _h(inner["payload"]) == v["input_hash"] == envelope["input_hash"]
    reply_key = PrivateKey(bytes.fromhex(v["reply_x25519_seed_hex"]))
    assert reply_key.public_key.encode().hex() == request["payload"]["reply_public_key"]
    output_bytes = SealedBox(reply_key).decrypt(base64.b64decode(result["sealed_output"]))
    assert output_bytes == rfc8785.dumps(v["output"])
    assert _h(v["output"]) == envelope["output_hash"]
    digest = hashlib.sha256(DOMAIN + b"\x00" + rfc8785.dumps(envelope)).digest()
    VerifyKey(bytes.fromhex(envelope["node_id"])).verify(digest, bytes.fromhex(result["signature"]))
