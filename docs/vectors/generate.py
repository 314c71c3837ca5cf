"""Regenerate the protocol test vectors: ``python docs/vectors/generate.py``.

The vectors are fixed inputs (a key seed, a request, an output, a timestamp) and every value
derived from them; `tests/unit/test_protocol_vectors.py` recomputes each derived value with
nothing but hashlib, rfc8785 and pynacl, so the document and the code cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from schemas import (
    ChatInput,
    ChatMessage,
    ChatOutput,
    InferenceRequest,
    InferenceResult,
    MLInput,
    MLOutput,
    ResultEnvelope,
    SamplingParams,
    Tensor,
    Usage,
    canonical_bytes,
    envelope_digest,
    input_hash,
    output_hash,
)
from schemas.base import VerificationMode
from schemas.canonical import domain_digest
from schemas.registry import (
    REGISTRATION_DOMAIN,
    NodeRegistration,
    RegisteredModel,
    RegistrationRecord,
)
from schemas.requests import FunctionCall, FunctionSpec, Tool, ToolCall
from schemas.results import SealedResult
from schemas.sealing import NodeSealer, seal_request
from schemas.signing import Signer

SEED = bytes(range(32))
DIGEST = "ab" * 32


def vector(
    name: str, request: InferenceRequest, output: ChatOutput | MLOutput, usage: Usage
) -> dict[str, object]:
    signer = Signer(SEED)
    envelope = ResultEnvelope(
        request_id=request.request_id,
        model_id=request.model,
        model_digest=DIGEST,
        mode=request.mode,
        input_hash=input_hash(request.payload),
        output_hash=output_hash(output),
        usage=usage,
        payer=request.payer,
        node_id=signer.node_id,
        signed_unix_ms=1_795_000_000_000,
    )
    signature = signer.sign_envelope(envelope)
    result = InferenceResult(
        request_id=request.request_id, envelope=envelope, signature=signature, output=output
    )
    return {
        "name": name,
        "ed25519_seed_hex": SEED.hex(),
        "node_id": signer.node_id,
        "request": request.model_dump(mode="json"),
        "result": result.model_dump(mode="json"),
        "canonical_payload": canonical_bytes(request.payload).decode(),
        "input_hash": envelope.input_hash,
        "canonical_output": canonical_bytes(output).decode(),
        "output_hash": envelope.output_hash,
        "canonical_envelope": canonical_bytes(envelope).decode(),
        "signing_digest_hex": envelope_digest(envelope).hex(),
        "signature": signature,
    }


def registry_and_sealed() -> dict[str, object]:
    """A signed registration, and a sealed request/result pair with every key needed to open
    them. Sealing is randomised (fresh content key, nonce and ephemeral keys), so these are
    fixed samples to open and check, not outputs to reproduce byte for byte."""
    signer = Signer(SEED)
    node_x25519 = bytes(range(32, 64))
    sealer = NodeSealer(node_x25519)
    registration = NodeRegistration(
        node_id=signer.node_id,
        x25519_public_key=sealer.public_key_hex,
        chain_address="0x" + "12" * 20,
        models=[RegisteredModel(name="demo-lm", digest=DIGEST, modes=[VerificationMode.VANILLA])],
        software_version="0.1.0",
        started_unix_ms=1_795_000_000_000,
        heartbeat_unix_ms=1_795_000_010_000,
        heartbeat_interval_s=10.0,
    )
    reg_signature = signer.sign(REGISTRATION_DOMAIN, registration)
    plain = InferenceRequest(
        request_id="vector-sealed-1",
        model="demo-lm",
        created_unix_ms=1_795_000_000_000,
        payload=ChatInput(messages=[ChatMessage(role="user", content="a secret question")]),
    )
    sealed = seal_request(plain, [sealer.public_key_hex])
    output = ChatOutput(text="a private answer", finish_reason="stop")
    envelope = ResultEnvelope(
        request_id=plain.request_id,
        model_id=plain.model,
        model_digest=DIGEST,
        mode=plain.mode,
        input_hash=input_hash(sealed.plaintext),
        output_hash=output_hash(output),
        usage=Usage(input_tokens=5, output_tokens=3),
        node_id=signer.node_id,
        signed_unix_ms=1_795_000_000_500,
    )
    result = SealedResult(
        request_id=plain.request_id,
        envelope=envelope,
        signature=signer.sign_envelope(envelope),
        sealed_output=NodeSealer.seal_output(output, sealed.reply_key.public_key),
    )
    return {
        "schema_version": 1,
        "registration": {
            "ed25519_seed_hex": SEED.hex(),
            "x25519_seed_hex": node_x25519.hex(),
            "record": RegistrationRecord(
                registration=registration, signature=reg_signature
            ).model_dump(mode="json"),
            "canonical_registration": canonical_bytes(registration).decode(),
            "signing_digest_hex": domain_digest(REGISTRATION_DOMAIN, registration).hex(),
        },
        "sealed": {
            "node_x25519_seed_hex": node_x25519.hex(),
            "reply_x25519_seed_hex": bytes(sealed.reply_key).hex(),
            "request": sealed.request.model_dump(mode="json"),
            "plaintext_payload": sealed.plaintext.model_dump(mode="json"),
            "input_hash": envelope.input_hash,
            "result": result.model_dump(mode="json"),
            "output": output.model_dump(mode="json"),
        },
    }


def main() -> None:
    ml = InferenceRequest(
        request_id="vector-ml-1",
        model="demo-mlp",
        created_unix_ms=1_795_000_000_000,
        payload=MLInput(
            tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[0.5, -1.0, 2.0, 0.25])}
        ),
    )
    ml_out = MLOutput(
        tensors={"probabilities": Tensor(dtype="float32", shape=[1, 3], data=[0.1, 0.2, 0.7])}
    )
    chat = InferenceRequest(
        request_id="vector-chat-1",
        model="demo-lm",
        created_unix_ms=1_795_000_000_000,
        payer="acct-42",
        payload=ChatInput(
            messages=[
                ChatMessage(role="system", content="Be brief."),
                ChatMessage(role="user", content="Grüße, 世界 😀"),
            ],
            params=SamplingParams(temperature=0.7, max_tokens=16, stop=["\n\n"], seed=7),
        ),
    )
    chat_out = ChatOutput(text='Hallo \u2028 "world"', finish_reason="stop")
    tools = InferenceRequest(
        request_id="vector-tools-1",
        model="gpt-proxy",
        created_unix_ms=1_795_000_000_000,
        payload=ChatInput(
            messages=[ChatMessage(role="user", content="Weather in Paris?")],
            tools=[
                Tool(
                    function=FunctionSpec(
                        name="get_weather",
                        parameters={"type": "object", "properties": {"city": {"type": "string"}}},
                    )
                )
            ],
            tool_choice="auto",
        ),
    )
    tools_out = ChatOutput(
        text="",
        tool_calls=[
            ToolCall(
                id="call_1",
                function=FunctionCall(name="get_weather", arguments='{"city":"Paris"}'),
            )
        ],
        finish_reason="tool_calls",
    )
    vectors = [
        vector("ml-vanilla", ml, ml_out, Usage()),
        vector("chat-tool-calls", tools, tools_out, Usage(input_tokens=40, output_tokens=12)),
        vector("chat-vanilla", chat, chat_out, Usage(input_tokens=31, output_tokens=9)),
    ]
    Path(__file__).with_name("registry-sealed-v1.json").write_text(
        json.dumps(registry_and_sealed(), indent=2, ensure_ascii=False) + "\n"
    )
    path = Path(__file__).with_name("results-v1.json")
    path.write_text(
        json.dumps({"schema_version": 1, "vectors": vectors}, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
