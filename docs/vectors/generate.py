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
from worker.trust.signer import Signer

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
    vectors = [
        vector("ml-vanilla", ml, ml_out, Usage()),
        vector("chat-vanilla", chat, chat_out, Usage(input_tokens=31, output_tokens=9)),
    ]
    path = Path(__file__).with_name("results-v1.json")
    path.write_text(
        json.dumps({"schema_version": 1, "vectors": vectors}, indent=2, ensure_ascii=False) + "\n"
    )


if __name__ == "__main__":
    main()
