"""Sealed requests without a broker: sealing, opening, tampering, and the pipeline's typed
answers (not a recipient, bad ciphertext, sealing required, stream refused)."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from schemas.base import SettlementMode, VerificationMode
from schemas.requests import ChatInput, ChatMessage, InferenceRequest
from schemas.results import ErrorCode, ErrorReply, InferenceResult, SealedReply, SealedResult
from schemas.sealed import SealedInput
from schemas.sealing import (
    BadCiphertext,
    BadPlaintext,
    NodeSealer,
    NotARecipient,
    Opened,
    SealedReplyError,
    SealedRequest,
    seal_request,
)
from schemas.signing import verify_error_signature
from schemas.verify.result import verify_result
from tests.harness.admission import trust_in
from tests.harness.pipeline import CHAIN_SIGNER, NOW_MS, OUTPUT, SIGNER, ScriptedEngine
from worker.pipeline import Outcome, Pipeline

CANARY = "canary-7f3a the launch code is 0000"
NODE = NodeSealer(bytes([7]) * 32)
OTHER = NodeSealer(bytes([9]) * 32)


def _request(request_id: str = "req-s-1", **overrides: object) -> InferenceRequest:
    fields: dict[str, object] = {
        "request_id": request_id,
        "model": "demo-lm",
        "created_unix_ms": NOW_MS - 100,
        "payload": ChatInput(messages=[ChatMessage(role="user", content=CANARY)]),
    }
    fields.update(overrides)
    return InferenceRequest.model_validate(fields)


def _pipeline(engine: ScriptedEngine, **kwargs: object) -> Pipeline:
    return Pipeline(
        {"demo-lm": engine},
        SIGNER,
        CHAIN_SIGNER,
        retry_backoff_s=0,
        clock_ms=lambda: NOW_MS,
        sealer=NODE,
        **kwargs,  # type: ignore[arg-type]
    )


def _with_payload(request: InferenceRequest, payload: SealedInput) -> InferenceRequest:
    return InferenceRequest.model_validate({**request.model_dump(), "payload": payload})


def test_sealed_request_carries_no_plaintext() -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex, OTHER.public_key_hex])
    wire = sealed.request.model_dump_json()
    assert CANARY not in wire
    assert isinstance(sealed.request.payload, SealedInput)
    assert len(sealed.request.payload.recipients) == 2
    assert "SealedRequest(request_id=req-s-1)" == repr(sealed)


def test_every_recipient_opens_the_same_payload() -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex, OTHER.public_key_hex])
    assert isinstance(sealed.request.payload, SealedInput)
    for node in (NODE, OTHER):
        opened = node.open(sealed.request, sealed.request.payload)
        assert isinstance(opened, Opened)
        assert opened.payload == sealed.plaintext
        assert opened.document == sealed.plaintext.model_dump(mode="json")


def test_a_node_not_among_the_recipients_cannot_open() -> None:
    sealed = seal_request(_request(), [OTHER.public_key_hex])
    assert isinstance(sealed.request.payload, SealedInput)
    assert isinstance(NODE.open(sealed.request, sealed.request.payload), NotARecipient)


def _flip(b64: str, index: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("index", [0, 23, 24, 40, -1])
def test_tampered_ciphertext_is_rejected(index: int) -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    tampered = payload.model_copy(update={"ciphertext": _flip(payload.ciphertext, index)})
    assert isinstance(NODE.open(sealed.request, tampered), BadCiphertext)


def test_tampered_content_key_is_rejected() -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    recipient = payload.recipients[0]
    bad = recipient.model_copy(update={"sealed_key": _flip(recipient.sealed_key, 50)})
    tampered = payload.model_copy(update={"recipients": [bad]})
    assert isinstance(NODE.open(sealed.request, tampered), BadCiphertext)


def test_ciphertext_cannot_be_replayed_under_another_request() -> None:
    sealed = seal_request(_request("req-s-1"), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    other = _with_payload(_request("req-s-2"), payload)
    opened = NODE.open(other, payload)
    assert isinstance(opened, BadPlaintext)
    assert CANARY not in opened.reason


async def test_pipeline_answers_a_sealed_request_with_a_sealed_result() -> None:
    engine = ScriptedEngine()
    sealed = seal_request(_request(), [NODE.public_key_hex])
    outcome = await _pipeline(engine).handle(
        sealed.request, sealed.request.model_dump(mode="json")["payload"]
    )
    assert isinstance(outcome.reply, SealedResult)
    assert engine.calls == [sealed.plaintext]
    assert outcome.record is not None and outcome.record.envelope == outcome.reply.envelope
    assert OUTPUT.text not in outcome.reply.model_dump_json()
    opened = sealed.open(outcome.reply)
    assert opened.output == OUTPUT
    trust = trust_in([(SIGNER.node_id, CHAIN_SIGNER.address)], NOW_MS)
    report = verify_result(opened, sealed.request, trust=trust, plaintext=sealed.plaintext)
    assert report.ok, report.as_dict()
    # Without the plaintext the input hash (over the sealed envelope) does not match.
    assert not verify_result(opened, sealed.request, trust=trust).ok


async def test_a_sealed_result_opens_only_with_its_own_key() -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex])
    outcome = await _pipeline(ScriptedEngine()).handle(sealed.request)
    assert isinstance(outcome.reply, SealedResult)
    other = seal_request(_request(), [NODE.public_key_hex])
    with pytest.raises(SealedReplyError):
        other.open(outcome.reply)
    forged = outcome.reply.model_copy(
        update={"sealed_output": _flip(outcome.reply.sealed_output, 60)}
    )
    with pytest.raises(SealedReplyError):
        sealed.open(forged)


def _code(outcome: Outcome, sealed: SealedRequest | None = None) -> ErrorCode:
    """The error's code; a sealed request's error is sealed to its key and opened here."""
    assert outcome.record is None
    reply = outcome.reply
    if sealed is not None:
        assert isinstance(reply, SealedReply), reply
        assert CANARY not in reply.model_dump_json()
        opened = sealed.open_reply(reply)
        assert isinstance(opened, ErrorReply)
        assert verify_error_signature(opened)
        reply = opened
    assert isinstance(reply, ErrorReply), reply
    assert CANARY not in reply.message
    return reply.code


async def test_pipeline_typed_errors_for_sealed_requests() -> None:
    engine = ScriptedEngine()
    pipeline = _pipeline(engine)
    not_mine = seal_request(_request(), [OTHER.public_key_hex])
    outcome = await pipeline.handle(not_mine.request)
    assert _code(outcome, not_mine) is ErrorCode.NOT_A_RECIPIENT
    opened = not_mine.open_reply(outcome.reply)  # type: ignore[arg-type]
    assert isinstance(opened, ErrorReply) and opened.retryable

    sealed = seal_request(_request(), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    tampered = payload.model_copy(update={"ciphertext": _flip(payload.ciphertext, 30)})
    assert _code(await pipeline.handle(_with_payload(sealed.request, tampered)), sealed) is (
        ErrorCode.BAD_CIPHERTEXT
    )

    zkml = seal_request(_request(mode=VerificationMode.ZKML), [NODE.public_key_hex])
    assert _code(await pipeline.handle(zkml.request), zkml) is ErrorCode.UNSUPPORTED_MODE
    assert engine.calls == []


_REDIRECTS: dict[str, object] = {
    "reply_to": "attacker.replies",
    "mode": VerificationMode.TEE,
    "settlement": SettlementMode.PRIVATE,
    "created_unix_ms": NOW_MS - 50,
    "deadline_unix_ms": NOW_MS + 60_000,
    "stream": True,
}


@given(field=st.sampled_from(sorted(_REDIRECTS)))
@settings(max_examples=20, deadline=None)
async def test_a_sealed_request_whose_clear_fields_were_rewritten_is_refused(field: str) -> None:
    # The attacker copies a sealed request off the topic and changes where (or how) it is
    # answered: the node refuses without running it, and says so only to the sealed key.
    engine = ScriptedEngine()
    pipeline = _pipeline(engine, modes={VerificationMode.TEE: _AcceptAll()})
    sealed = seal_request(_request(reply_to="alice.replies"), [NODE.public_key_hex])
    rewritten = sealed.request.model_copy(update={field: _REDIRECTS[field]})
    outcome = await pipeline.handle(rewritten)
    assert _code(outcome, sealed) is ErrorCode.SEALED_MISMATCH
    assert engine.calls == []


async def test_a_sealed_reply_key_swapped_for_the_attackers_is_refused() -> None:
    sealed = seal_request(_request(), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    attacker = PrivateKey.generate().public_key.encode().hex()
    swapped = _with_payload(
        sealed.request, payload.model_copy(update={"reply_public_key": attacker})
    )
    engine = ScriptedEngine()
    outcome = await _pipeline(engine).handle(swapped)
    assert engine.calls == []
    assert outcome.error_code is ErrorCode.SEALED_MISMATCH
    assert isinstance(outcome.reply, SealedReply)  # sealed to the attacker's key: says only
    assert OUTPUT.text not in outcome.reply.model_dump_json()  # that it was refused


class _AcceptAll:
    def accepts(self, model: str) -> bool:
        return True

    def signed(self, *args: object) -> object:
        raise AssertionError("never reached: the request is refused before it runs")


async def test_private_model_refuses_unsealed_requests() -> None:
    engine = ScriptedEngine()
    pipeline = _pipeline(engine, private_models=frozenset({"demo-lm"}))
    assert _code(await pipeline.handle(_request())) is ErrorCode.SEALING_REQUIRED
    assert engine.calls == []
    sealed = seal_request(_request(), [NODE.public_key_hex])
    assert isinstance((await pipeline.handle(sealed.request)).reply, SealedResult)


async def test_node_without_a_sealing_key_refuses_sealed_requests() -> None:
    pipeline = Pipeline(
        {"demo-lm": ScriptedEngine()}, SIGNER, CHAIN_SIGNER, clock_ms=lambda: NOW_MS
    )
    sealed = seal_request(_request(), [NODE.public_key_hex])
    assert _code(await pipeline.handle(sealed.request), sealed) is ErrorCode.NOT_A_RECIPIENT
    plain = await pipeline.handle(_request())
    assert isinstance(plain.reply, InferenceResult)


def test_sealer_repr_hides_the_key() -> None:
    key = PrivateKey(bytes([7]) * 32)
    assert bytes(key).hex() not in repr(NODE)
    assert NODE.public_key_hex == key.public_key.encode().hex()


def test_stream_chunks_reassemble_out_of_order_and_detect_gaps() -> None:
    from client.streaming import check_stream, reassemble
    from schemas.requests import FunctionCall, ToolCall, ToolCallDelta
    from schemas.results import ChatOutput, StreamChunk

    def chunk(index: int, **fields: object) -> StreamChunk:
        return StreamChunk(
            request_id="r", index=index, node_id=SIGNER.node_id, signature="00" * 64, **fields
        )

    chunks = [
        chunk(1, text="lo, "),
        chunk(0, text="Hel"),
        chunk(
            2,
            text="world",
            tool_calls=[ToolCallDelta(index=0, id="c1", name="f", arguments='{"a":')],
        ),
        chunk(3, tool_calls=[ToolCallDelta(index=0, arguments="1}")]),
    ]
    final = ChatOutput(
        text="Hello, world",
        tool_calls=[ToolCall(id="c1", function=FunctionCall(name="f", arguments='{"a":1}'))],
        finish_reason="tool_calls",
    )
    assert reassemble(chunks).complete
    assert check_stream(chunks, final)
    assert not check_stream(chunks[:3], final)
    assert not reassemble([chunks[0], chunks[2]]).complete
    assert not check_stream(chunks, final.model_copy(update={"text": "Hello world"}))
