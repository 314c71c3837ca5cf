"""Sealed requests without a broker: sealing, opening, tampering, and the pipeline's typed
answers (not a recipient, bad ciphertext, sealing required, stream refused)."""

from __future__ import annotations

import base64

import pytest
from nacl.public import PrivateKey

from schemas.base import VerificationMode
from schemas.requests import ChatInput, ChatMessage, InferenceRequest
from schemas.results import ErrorCode, ErrorReply, InferenceResult, SealedResult
from schemas.sealed import SealedInput
from schemas.sealing import (
    BadCiphertext,
    BadPlaintext,
    NodeSealer,
    NotARecipient,
    Opened,
    SealedReplyError,
    seal_request,
)
from schemas.verify.result import verify_result
from tests.harness.pipeline import NOW_MS, OUTPUT, SIGNER, ScriptedEngine
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
    report = verify_result(opened, sealed.request, plaintext=sealed.plaintext)
    assert report.ok, report.as_dict()
    # Without the plaintext the input hash (over the sealed envelope) does not match.
    assert not verify_result(opened, sealed.request).ok


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


def _code(outcome: Outcome) -> ErrorCode:
    assert isinstance(outcome.reply, ErrorReply), outcome.reply
    assert outcome.record is None
    assert CANARY not in outcome.reply.message
    return outcome.reply.code


async def test_pipeline_typed_errors_for_sealed_requests() -> None:
    engine = ScriptedEngine()
    pipeline = _pipeline(engine)
    not_mine = seal_request(_request(), [OTHER.public_key_hex])
    outcome = await pipeline.handle(not_mine.request)
    assert _code(outcome) is ErrorCode.NOT_A_RECIPIENT
    assert isinstance(outcome.reply, ErrorReply) and outcome.reply.retryable

    sealed = seal_request(_request(), [NODE.public_key_hex])
    payload = sealed.request.payload
    assert isinstance(payload, SealedInput)
    tampered = payload.model_copy(update={"ciphertext": _flip(payload.ciphertext, 30)})
    assert _code(await pipeline.handle(_with_payload(sealed.request, tampered))) is (
        ErrorCode.BAD_CIPHERTEXT
    )

    streamed = seal_request(_request(stream=True), [NODE.public_key_hex])
    assert _code(await pipeline.handle(streamed.request)) is ErrorCode.INVALID_REQUEST

    zkml = seal_request(_request(mode=VerificationMode.ZKML), [NODE.public_key_hex])
    assert _code(await pipeline.handle(zkml.request)) is ErrorCode.UNSUPPORTED_MODE
    assert engine.calls == []


async def test_private_model_refuses_unsealed_requests() -> None:
    engine = ScriptedEngine()
    pipeline = _pipeline(engine, private_models=frozenset({"demo-lm"}))
    assert _code(await pipeline.handle(_request())) is ErrorCode.SEALING_REQUIRED
    assert engine.calls == []
    sealed = seal_request(_request(), [NODE.public_key_hex])
    assert isinstance((await pipeline.handle(sealed.request)).reply, SealedResult)


async def test_node_without_a_sealing_key_refuses_sealed_requests() -> None:
    pipeline = Pipeline({"demo-lm": ScriptedEngine()}, SIGNER, clock_ms=lambda: NOW_MS)
    sealed = seal_request(_request(), [NODE.public_key_hex])
    assert _code(await pipeline.handle(sealed.request)) is ErrorCode.NOT_A_RECIPIENT
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

    chunks = [
        StreamChunk(request_id="r", index=1, text="lo, "),
        StreamChunk(request_id="r", index=0, text="Hel"),
        StreamChunk(
            request_id="r",
            index=2,
            text="world",
            tool_calls=[ToolCallDelta(index=0, id="c1", name="f", arguments='{"a":')],
        ),
        StreamChunk(request_id="r", index=3, tool_calls=[ToolCallDelta(index=0, arguments="1}")]),
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
