"""Regenerate the protocol test vectors: ``python docs/vectors/generate.py [OUT_DIR]``.

Writes ``results-v2.json`` (next to this file unless ``OUT_DIR`` is given): fixed inputs (key
seeds, requests, outputs, timestamps) and every value derived from them, for each signed message
of schema version 2. ``tests/unit/test_protocol_vectors.py`` recomputes each derived value with
nothing but hashlib, rfc8785, pynacl, coincurve and keccak256, checks that ``schemas.verify``
accepts every vector and rejects a one-field change, and that a rerun writes the same bytes.

Every value is deterministic: ed25519 and libsecp256k1's ECDSA (RFC 6979 nonces) are, and the
seeds and timestamps are fixed. Sealing is random by nature (a fresh content key, secretbox
nonce and ephemeral X25519 key per box); here they are fixed and listed in the file, so a box
can be recomputed as well as opened. A real client must draw them fresh every time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from eth_abi.abi import encode
from nacl.public import Box, PrivateKey, PublicKey
from nacl.secret import SecretBox

from schemas.admission import (
    ADMISSION_DOMAIN,
    AdmissionList,
    AdmittedNode,
    ApprovedMeasurement,
    sign_admission_list,
)
from schemas.base import SettlementMode, VerificationMode
from schemas.canonical import RESULT_DOMAIN, canonical_bytes, domain_digest
from schemas.inclusion import AnchoringTx, ChainRef, InclusionProof, LeafFields
from schemas.merkle import LEAF_TYPES, MerkleTree, envelope_leaf, leaf_values
from schemas.payer import PayerGrant
from schemas.registry import (
    REGISTRATION_DOMAIN,
    NodeRegistration,
    RegisteredModel,
    RegistrationRecord,
)
from schemas.requests import (
    ChatInput,
    ChatMessage,
    InferenceRequest,
    MLInput,
    SamplingParams,
    Tensor,
    input_hash,
    max_output_tokens,
)
from schemas.results import (
    ChatOutput,
    ErrorCode,
    InferenceResult,
    MLOutput,
    SealedReply,
    SealedResult,
    Usage,
)
from schemas.sealed import SealedInput, SealedPlaintext, SealedRecipient
from schemas.settlement import SettlementRecord
from schemas.signing import (
    CHUNK_DOMAIN,
    ERROR_DOMAIN,
    PAYER_DOMAIN,
    ChainSigner,
    Signer,
    chain_message_hash,
    recover_chain_address,
    unsigned,
)
from schemas.verify.payer import request_grant, sign_grant
from worker.answers import Answers

FILE_NAME = "results-v2.json"
NODE_ED25519 = bytes(range(0, 32))
NODE_X25519 = bytes(range(32, 64))
NODE_SECP256K1 = bytes(range(64, 96))
PAYER_ED25519 = bytes(range(96, 128))
PAYER_SECP256K1 = bytes(range(128, 160))
AUTHORITY_ED25519 = bytes(range(160, 192))
CLIENT_REPLY_X25519 = bytes(range(192, 224))
CONTENT_KEY = bytes(range(224, 256))
SECRETBOX_NONCE = bytes(range(24))
EPHEMERAL = {"recipient": b"\xe1" * 32, "output": b"\xe2" * 32, "chunk": b"\xe3" * 32}
"""Ephemeral X25519 seeds of the three sealed boxes (libsodium draws a fresh one per box)."""

CREATED_UNIX_MS = 1_795_000_000_000
SIGNED_UNIX_MS = CREATED_UNIX_MS + 1_500
RECEIVED_UNIX_MS = SIGNED_UNIX_MS + 1_000
"""When the verifier (settlement) read the records: every time rule is judged against it."""
HEARTBEAT_UNIX_MS = CREATED_UNIX_MS - 10_000
CHAT_DIGEST = "ab" * 32
ML_DIGEST = "cd" * 32


def _hex0x(value: bytes) -> str:
    return "0x" + value.hex()


def _json(model: Any) -> Any:
    return model.model_dump(mode="json")


def sealed_box(message: bytes, recipient_hex: str, ephemeral_seed: bytes) -> str:
    """Base64 ``crypto_box_seal(message, recipient)`` with a given ephemeral key:
    ``epk || crypto_box(message, nonce = blake2b-192(epk || pk), esk, pk)``. Any NaCl
    ``SealedBox`` opens it; libsodium itself draws the ephemeral key at random."""
    ephemeral = PrivateKey(ephemeral_seed)
    recipient = PublicKey(bytes.fromhex(recipient_hex))
    epk = ephemeral.public_key.encode()
    nonce = hashlib.blake2b(epk + recipient.encode(), digest_size=24).digest()
    box = Box(ephemeral, recipient).encrypt(message, nonce).ciphertext
    return base64.b64encode(epk + box).decode()


def _chain(digest: bytes, signature: str) -> dict[str, Any]:
    return {
        "eip191_message_hash_hex": chain_message_hash(digest).hex(),
        "signature": signature,
        "recovered_address": recover_chain_address(digest, signature),
    }


def _grant(grant: PayerGrant, payer: Any) -> dict[str, Any]:
    digest = domain_digest(PAYER_DOMAIN, grant)
    out = {
        "grant": _json(grant),
        "canonical_grant": canonical_bytes(grant).decode(),
        "digest_hex": digest.hex(),
        "payer": _json(payer),
    }
    if payer.scheme == "eip191":
        out["eip191"] = _chain(digest, payer.signature)
    return out


def _paid(request: InferenceRequest, key: Signer | ChainSigner) -> tuple[InferenceRequest, Any]:
    """``request`` with its payer's signature over its grant (the plaintext payload's hash)."""
    payload = request.payload
    assert isinstance(payload, ChatInput | MLInput)
    payer = sign_grant(request_grant(request, payload, input_hash(payload)), key)
    return request.model_copy(update={"payer": payer}), payer


def _answers() -> Answers:
    return Answers(Signer(NODE_ED25519), ChainSigner(NODE_SECP256K1), lambda: SIGNED_UNIX_MS)


def result_vector(
    name: str,
    request: InferenceRequest,
    payer_key: Signer | ChainSigner,
    output: ChatOutput | MLOutput,
    usage: Usage,
    model_digest: str,
) -> tuple[dict[str, Any], SettlementRecord]:
    request, payer = _paid(request, payer_key)
    payload = request.payload
    assert isinstance(payload, ChatInput | MLInput)
    result, record = _answers().result(
        request,
        model_digest=model_digest,
        input_hash=input_hash(payload),
        max_output_tokens=max_output_tokens(payload),
        output=output,
        usage=usage,
        reply_key=None,
    )
    assert isinstance(result, InferenceResult)
    env = result.envelope
    digest = domain_digest(RESULT_DOMAIN, env)
    vector = {
        "name": name,
        "request": _json(request),
        "canonical_payload": canonical_bytes(payload).decode(),
        "input_hash": env.input_hash,
        "payer_grant": _grant(request_grant(request, payload, env.input_hash), payer),
        "canonical_output": canonical_bytes(output).decode(),
        "output_hash": env.output_hash,
        "canonical_envelope": canonical_bytes(env).decode(),
        "envelope_digest_hex": digest.hex(),
        "signature": result.signature,
        "chain_signature": _chain(digest, result.chain_signature),
        "result": _json(result),
    }
    return vector, record


def _signed_parts(domain: bytes, message: Any) -> dict[str, Any]:
    fields = unsigned(message)
    return {
        "message": _json(message),
        "canonical_unsigned": canonical_bytes(fields).decode(),
        "digest_hex": domain_digest(domain, fields).hex(),
    }


def error_vector() -> dict[str, Any]:
    request = InferenceRequest(
        request_id="vector-error-1",
        model="demo-lm",
        created_unix_ms=CREATED_UNIX_MS,
        payload=ChatInput(messages=[ChatMessage(role="user", content="Too many at once?")]),
    )
    payload = request.payload
    assert isinstance(payload, ChatInput)
    reply = _answers().error(
        request.request_id,
        request.model,
        ErrorCode.RATE_LIMITED,
        "the provider is over its rate limit",
        retryable=True,
        input_hash=input_hash(payload),
    )
    return {"request": _json(request), **_signed_parts(ERROR_DOMAIN, reply)}


def chunk_vectors(request_id: str, text: str) -> dict[str, Any]:
    cut = len(text) // 2
    answers = _answers()
    chunks = [
        answers.chunk(request_id, i, part, []) for i, part in enumerate((text[:cut], text[cut:]))
    ]
    return {
        "request_id": request_id,
        "chunks": [_signed_parts(CHUNK_DOMAIN, c) for c in chunks],
        "reassembled_text": text,
    }


def registration_vector() -> dict[str, Any]:
    signer = Signer(NODE_ED25519)
    registration = NodeRegistration(
        node_id=signer.node_id,
        x25519_public_key=PrivateKey(NODE_X25519).public_key.encode().hex(),
        chain_address=ChainSigner(NODE_SECP256K1).address,
        models=[
            RegisteredModel(name="demo-lm", digest=CHAT_DIGEST, modes=[VerificationMode.VANILLA]),
            RegisteredModel(name="demo-mlp", digest=ML_DIGEST, modes=[VerificationMode.VANILLA]),
        ],
        software_version="0.2.0",
        started_unix_ms=HEARTBEAT_UNIX_MS - 60_000,
        heartbeat_unix_ms=HEARTBEAT_UNIX_MS,
        heartbeat_interval_s=10.0,
        sequence=HEARTBEAT_UNIX_MS,
    )
    record = RegistrationRecord(
        registration=registration, signature=signer.sign(REGISTRATION_DOMAIN, registration)
    )
    return {
        "record": _json(record),
        "canonical_registration": canonical_bytes(registration).decode(),
        "digest_hex": domain_digest(REGISTRATION_DOMAIN, registration).hex(),
        "received_unix_ms": HEARTBEAT_UNIX_MS + 200,
    }


def admission_vector() -> dict[str, Any]:
    authority = Signer(AUTHORITY_ED25519)
    admission_list = AdmissionList(
        authority_id=authority.node_id,
        sequence=7,
        issued_unix_ms=CREATED_UNIX_MS - 3_600_000,
        nodes=[
            AdmittedNode(
                node_id=Signer(NODE_ED25519).node_id,
                chain_address=ChainSigner(NODE_SECP256K1).address,
            )
        ],
        measurements=[ApprovedMeasurement(kind="tdx", measurement="9f" * 48)],
    )
    return {
        "signed": _json(sign_admission_list(authority, admission_list)),
        "canonical_list": canonical_bytes(admission_list).decode(),
        "digest_hex": domain_digest(ADMISSION_DOMAIN, admission_list).hex(),
    }


def settlement_vector(records: list[tuple[str, SettlementRecord]]) -> dict[str, Any]:
    """Records as settlement reads them, their Merkle leaves, the batch tree over them and an
    inclusion proof of the first (its chain fields are made up: nothing was anchored)."""
    entries = []
    for name, record in records:
        values = leaf_values(record.envelope)
        entries.append(
            {
                "name": name,
                "record": _json(record),
                "leaf_values": [_hex0x(v) for v in values],
                "abi_encoded_hex": _hex0x(encode(list(LEAF_TYPES), list(values))),
                "leaf_hash": _hex0x(envelope_leaf(record.envelope)),
            }
        )
    tree = MerkleTree(envelope_leaf(record.envelope) for _, record in records)
    first = records[0][1].envelope
    leaf = envelope_leaf(first)
    proof = InclusionProof(
        request_id=first.request_id,
        node_id=first.node_id,
        leaf=LeafFields(types=list(LEAF_TYPES), values=entries[0]["leaf_values"]),
        leaf_hash=_hex0x(leaf),
        proof=[_hex0x(p) for p in tree.proof(leaf)],
        root=_hex0x(tree.root),
        batch=AnchoringTx(
            count=len(tree),
            tx_hash="0x" + "77" * 32,
            block_number=12,
            batch_index=3,
            gas_used=69152,
        ),
        chain=ChainRef(chain_id=31337, contract_address="0x" + "5f" * 20),
    )
    return {
        "received_unix_ms": RECEIVED_UNIX_MS,
        "rules": {"max_clock_skew_s": 300, "max_record_age_s": 604800, "require_payer": True},
        "records": entries,
        "tree": {"sorted_leaves": [_hex0x(v) for v in tree.leaves], "root": _hex0x(tree.root)},
        "inclusion_proof": _json(proof),
    }


def sealed_vector() -> dict[str, Any]:
    """A sealed, streamed, privately settled chat request with a payer; its sealed result and
    a sealed reply carrying a signed chunk. Every box is made with the fixed randomness."""
    node_key = PrivateKey(NODE_X25519).public_key.encode().hex()
    reply_key = PrivateKey(CLIENT_REPLY_X25519).public_key.encode().hex()
    plain = InferenceRequest(
        request_id="vector-sealed-1",
        model="demo-lm",
        settlement=SettlementMode.PRIVATE,
        reply_to="og.replies.client-7",
        created_unix_ms=CREATED_UNIX_MS,
        deadline_unix_ms=CREATED_UNIX_MS + 60_000,
        stream=True,
        payload=ChatInput(
            messages=[ChatMessage(role="user", content="a secret question")],
            params=SamplingParams(max_tokens=32),
        ),
    )
    plain, payer = _paid(plain, Signer(PAYER_ED25519))
    payload = plain.payload
    assert isinstance(payload, ChatInput)
    inner = SealedPlaintext(
        request_id=plain.request_id,
        model=plain.model,
        mode=plain.mode,
        settlement=plain.settlement,
        reply_public_key=reply_key,
        reply_to=plain.reply_to,
        payer=plain.payer,
        created_unix_ms=plain.created_unix_ms,
        deadline_unix_ms=plain.deadline_unix_ms,
        stream=plain.stream,
        payload=_json(payload),
    )
    ciphertext = SecretBox(CONTENT_KEY).encrypt(canonical_bytes(inner), SECRETBOX_NONCE)
    sealed = SealedInput(
        recipients=[
            SealedRecipient(
                x25519_public_key=node_key,
                sealed_key=sealed_box(CONTENT_KEY, node_key, EPHEMERAL["recipient"]),
            )
        ],
        ciphertext=base64.b64encode(bytes(ciphertext)).decode(),
        reply_public_key=reply_key,
    )
    request = plain.model_copy(update={"payload": sealed})
    output = ChatOutput(text="a private answer", finish_reason="stop")
    answers = _answers()
    result, record = answers.result(
        request,
        model_digest=CHAT_DIGEST,
        input_hash=input_hash(payload),
        max_output_tokens=max_output_tokens(payload),
        output=output,
        usage=Usage(input_tokens=4, output_tokens=3),
        reply_key=None,
    )
    chunk = answers.chunk(request.request_id, 0, output.text, [])
    sealed_result = SealedResult(
        request_id=request.request_id,
        envelope=result.envelope,
        signature=result.signature,
        chain_signature=result.chain_signature,
        sealed_output=sealed_box(canonical_bytes(output), reply_key, EPHEMERAL["output"]),
    )
    reply = SealedReply(
        request_id=request.request_id,
        node_id=answers.node_id,
        sealed=sealed_box(canonical_bytes(chunk), reply_key, EPHEMERAL["chunk"]),
    )
    return {
        "fixed_randomness": {
            "content_key_hex": CONTENT_KEY.hex(),
            "secretbox_nonce_hex": SECRETBOX_NONCE.hex(),
            "ephemeral_x25519_seeds_hex": {k: v.hex() for k, v in EPHEMERAL.items()},
        },
        "plain_request": _json(plain),
        "payer_grant": _grant(request_grant(plain, payload, input_hash(payload)), payer),
        "sealed_plaintext": _json(inner),
        "canonical_sealed_plaintext": canonical_bytes(inner).decode(),
        "request": _json(request),
        "input_hash": result.envelope.input_hash,
        "output": _json(output),
        "output_hash": result.envelope.output_hash,
        "envelope_digest_hex": domain_digest(RESULT_DOMAIN, result.envelope).hex(),
        "result": _json(sealed_result),
        "chunk": _signed_parts(CHUNK_DOMAIN, chunk),
        "reply": _json(reply),
        "record": _json(record),
    }


def _keys() -> dict[str, Any]:
    return {
        "node": {
            "ed25519_seed_hex": NODE_ED25519.hex(),
            "node_id": Signer(NODE_ED25519).node_id,
            "x25519_seed_hex": NODE_X25519.hex(),
            "x25519_public_key": PrivateKey(NODE_X25519).public_key.encode().hex(),
            "secp256k1_private_key_hex": NODE_SECP256K1.hex(),
            "chain_address": ChainSigner(NODE_SECP256K1).address,
        },
        "payer_ed25519": {
            "ed25519_seed_hex": PAYER_ED25519.hex(),
            "key": Signer(PAYER_ED25519).node_id,
        },
        "payer_eip191": {
            "secp256k1_private_key_hex": PAYER_SECP256K1.hex(),
            "key": ChainSigner(PAYER_SECP256K1).address,
        },
        "authority": {
            "ed25519_seed_hex": AUTHORITY_ED25519.hex(),
            "authority_id": Signer(AUTHORITY_ED25519).node_id,
        },
        "client_reply": {
            "x25519_seed_hex": CLIENT_REPLY_X25519.hex(),
            "public_key": PrivateKey(CLIENT_REPLY_X25519).public_key.encode().hex(),
        },
    }


def build() -> dict[str, Any]:
    """Every vector, as the JSON document ``results-v2.json`` holds."""
    chat_request = InferenceRequest(
        request_id="vector-chat-1",
        model="demo-lm",
        created_unix_ms=CREATED_UNIX_MS,
        stream=True,
        payload=ChatInput(
            messages=[
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Grüße, 世界 😀"),
            ],
            params=SamplingParams(temperature=0.7, max_tokens=16, stop=["\n\n"], seed=7),
        ),
    )
    chat_output = ChatOutput(text='Hallo \u2028 "world"', finish_reason="stop")
    ml_request = InferenceRequest(
        request_id="vector-ml-1",
        model="demo-mlp",
        created_unix_ms=CREATED_UNIX_MS,
        payload=MLInput(
            tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[0.5, -1.0, 2.0, 0.25])}
        ),
    )
    ml_output = MLOutput(
        tensors={"probabilities": Tensor(dtype="float32", shape=[1, 3], data=[0.1, 0.2, 0.7])}
    )
    chat, chat_record = result_vector(
        "chat-ed25519-payer",
        chat_request,
        Signer(PAYER_ED25519),
        chat_output,
        Usage(input_tokens=31, output_tokens=9),
        CHAT_DIGEST,
    )
    ml, ml_record = result_vector(
        "ml-eip191-payer", ml_request, ChainSigner(PAYER_SECP256K1), ml_output, Usage(), ML_DIGEST
    )
    return {
        "schema_version": 2,
        "about": "Regenerate with python docs/vectors/generate.py; formulas in docs/PROTOCOL.md.",
        "domains": {
            "result": RESULT_DOMAIN.decode(),
            "error": ERROR_DOMAIN.decode(),
            "chunk": CHUNK_DOMAIN.decode(),
            "payer": PAYER_DOMAIN.decode(),
            "registration": REGISTRATION_DOMAIN.decode(),
            "admission": ADMISSION_DOMAIN.decode(),
        },
        "keys": _keys(),
        "results": [chat, ml],
        "error": error_vector(),
        "chunks": chunk_vectors(chat_request.request_id, chat_output.text),
        "registration": registration_vector(),
        "admission": admission_vector(),
        "settlement": settlement_vector([("chat", chat_record), ("ml", ml_record)]),
        "sealed": sealed_vector(),
    }


def main(out_dir: Path | None = None) -> Path:
    path = (out_dir or Path(__file__).parent) / FILE_NAME
    text = json.dumps(build(), indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
