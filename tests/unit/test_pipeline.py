"""The pipeline (execute → hash → sign) without a broker: in-test engines for the failure paths,
the real demo ONNX model where a real model matters."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.base import SettlementMode, VerificationMode
from schemas.requests import (
    ChatInput,
    ChatMessage,
    InferenceRequest,
    MLInput,
    SamplingParams,
    Tensor,
    input_hash,
)
from schemas.results import (
    ErrorCode,
    ErrorReply,
    InferenceResult,
    MLOutput,
    output_hash,
)
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest, verify_chain_signature, verify_envelope_signature
from tests.harness.pipeline import (
    CHAIN_SIGNER,
    DIGEST,
    NOW_MS,
    OUTPUT,
    PAYER,
    SECRET,
    SIGNER,
    USAGE,
    ScriptedEngine,
    chat_request,
)
from worker.engines import Engine, load_engine
from worker.errors import PermanentError, RetryableError
from worker.modelstore.local_hub import LocalHub
from worker.pipeline import Outcome, Pipeline


def _pipeline(engine: Engine, *, retries: int = 2) -> Pipeline:
    return Pipeline(
        {"demo-lm": engine},
        SIGNER,
        CHAIN_SIGNER,
        retries=retries,
        retry_backoff_s=0,
        clock_ms=lambda: NOW_MS,
    )


def _error(outcome: Outcome) -> ErrorReply:
    assert isinstance(outcome.reply, ErrorReply), outcome.reply
    assert outcome.record is None
    assert outcome.reply.request_id == "req-p-1"
    assert outcome.reply.node_id == SIGNER.node_id
    assert outcome.reply.created_unix_ms == NOW_MS
    return outcome.reply


def test_scripted_engine_satisfies_protocol() -> None:
    assert isinstance(ScriptedEngine(), Engine)


async def test_unknown_model() -> None:
    engine = ScriptedEngine()
    reply = _error(await _pipeline(engine).handle(chat_request(model="other-model")))
    assert reply.code is ErrorCode.UNKNOWN_MODEL
    assert reply.model == "other-model"
    assert reply.retryable is False
    assert engine.calls == []


@pytest.mark.parametrize("mode", [VerificationMode.TEE, VerificationMode.ZKML])
async def test_unsupported_mode(mode: VerificationMode) -> None:
    engine = ScriptedEngine()
    reply = _error(await _pipeline(engine).handle(chat_request(mode=mode)))
    assert reply.code is ErrorCode.UNSUPPORTED_MODE
    assert mode.value in reply.message
    assert engine.calls == []


@pytest.mark.parametrize("deadline", [NOW_MS - 1, NOW_MS, 0])
async def test_deadline_passed_is_not_executed(deadline: int) -> None:
    engine = ScriptedEngine()
    reply = _error(await _pipeline(engine).handle(chat_request(deadline_unix_ms=deadline)))
    assert reply.code is ErrorCode.DEADLINE_EXCEEDED
    assert reply.retryable is False
    assert engine.calls == []


async def test_deadline_in_future_is_executed() -> None:
    engine = ScriptedEngine()
    outcome = await _pipeline(engine).handle(chat_request(deadline_unix_ms=NOW_MS + 1))
    assert isinstance(outcome.reply, InferenceResult)
    assert len(engine.calls) == 1


async def test_retryable_error_is_retried_until_success() -> None:
    engine = ScriptedEngine([RetryableError("busy"), RetryableError("busy")])
    outcome = await _pipeline(engine, retries=2).handle(chat_request())
    assert isinstance(outcome.reply, InferenceResult)
    assert outcome.record is not None
    assert len(engine.calls) == 3


@pytest.mark.parametrize("retries", [0, 1, 2, 4])
async def test_retryable_error_gives_up_after_retries(retries: int) -> None:
    engine = ScriptedEngine(lambda: RetryableError("engine busy"))
    reply = _error(await _pipeline(engine, retries=retries).handle(chat_request()))
    assert reply.code is ErrorCode.INTERNAL
    assert reply.retryable is True
    assert reply.message == "engine busy"
    assert len(engine.calls) == retries + 1


async def test_permanent_error_is_answered_at_once() -> None:
    engine = ScriptedEngine(
        lambda: PermanentError("input x: expected dtype float32", code=ErrorCode.BAD_REQUEST)
    )
    reply = _error(await _pipeline(engine).handle(chat_request()))
    assert reply.code is ErrorCode.BAD_REQUEST
    assert reply.message == "input x: expected dtype float32"
    assert reply.retryable is False
    assert len(engine.calls) == 1


async def test_permanent_error_keeps_its_code() -> None:
    engine = ScriptedEngine(
        lambda: PermanentError("upstream said no", code=ErrorCode.PROVIDER_ERROR)
    )
    reply = _error(await _pipeline(engine).handle(chat_request()))
    assert reply.code is ErrorCode.PROVIDER_ERROR
    assert len(engine.calls) == 1


async def test_long_error_message_is_truncated_to_wire_limit() -> None:
    engine = ScriptedEngine(lambda: PermanentError("m" * 2000))
    reply = _error(await _pipeline(engine).handle(chat_request()))
    assert reply.message == "m" * 512


async def test_unexpected_exception_leaks_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    engine = ScriptedEngine(lambda: RuntimeError(f"tokenizer choked on: {SECRET}"))
    reply = _error(await _pipeline(engine).handle(chat_request()))
    assert reply.code is ErrorCode.INTERNAL
    assert reply.retryable is True
    assert SECRET not in reply.message
    assert SECRET not in reply.model_dump_json()

    failures = [r for r in caplog.records if r.name == "worker.pipeline"]
    assert failures, "the failure must be logged (by type), or operators see nothing"
    assert any(getattr(r, "error_type", None) == "RuntimeError" for r in failures)
    for record in caplog.records:
        assert SECRET not in record.getMessage()
        for key, value in record.__dict__.items():
            assert SECRET not in str(value), key
    assert SECRET not in caplog.text


async def test_success_with_scripted_engine() -> None:
    request = chat_request()
    outcome = await _pipeline(ScriptedEngine()).handle(request)
    reply = outcome.reply
    assert isinstance(reply, InferenceResult)
    assert reply.request_id == request.request_id
    assert reply.output == OUTPUT

    assert isinstance(outcome.record, SettlementRecord)
    assert outcome.record.envelope == reply.envelope
    assert outcome.record.signature == reply.signature

    env = reply.envelope
    assert env.request_id == request.request_id
    assert env.model_id == "demo-lm"
    assert env.model_digest == DIGEST
    assert env.mode is VerificationMode.VANILLA
    assert env.input_hash == input_hash(request.payload)
    assert env.output_hash == output_hash(OUTPUT)
    assert env.usage == USAGE
    assert env.payer == request.payer
    assert env.payer is not None and env.payer.account == f"ed25519:{PAYER.node_id}"
    assert env.node_id == SIGNER.node_id
    assert env.signed_unix_ms == NOW_MS
    assert env.request_created_unix_ms == request.created_unix_ms
    assert verify_envelope_signature(env, reply.signature)
    digest = envelope_digest(env)
    assert verify_chain_signature(digest, reply.chain_signature, CHAIN_SIGNER.address)
    assert outcome.record.chain_signature == reply.chain_signature


async def test_success_without_payer() -> None:
    outcome = await _pipeline(ScriptedEngine()).handle(chat_request(payer=None))
    assert isinstance(outcome.reply, InferenceResult)
    assert outcome.reply.envelope.payer is None


async def test_pipeline_node_id_is_signer_node_id() -> None:
    assert _pipeline(ScriptedEngine()).node_id == SIGNER.node_id


# --- the real ONNX demo model ------------------------------------------------------------------


def _ml_request(data: list[bool | int | float | str]) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-p-1",
        model="demo-mlp",
        created_unix_ms=NOW_MS - 100,
        payload=MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=data)}),
    )


@pytest.fixture
async def onnx_pipeline(demo_hub: Path, tmp_path: Path) -> tuple[Pipeline, Engine]:
    hub = LocalHub(demo_hub)
    ref = hub.resolve("demo-mlp")
    engine = await load_engine(ref, hub.materialize(ref, tmp_path))
    return Pipeline({"demo-mlp": engine}, SIGNER, CHAIN_SIGNER, clock_ms=lambda: NOW_MS), engine


async def test_onnx_success_commits_to_real_output(
    onnx_pipeline: tuple[Pipeline, Engine],
) -> None:
    pipeline, engine = onnx_pipeline
    request = _ml_request([0.5, -1.0, 2.0, 0.25])
    outcome = await pipeline.handle(request)
    reply = outcome.reply
    assert isinstance(reply, InferenceResult), reply
    assert isinstance(reply.output, MLOutput)
    env = reply.envelope
    assert env.model_digest == engine.model_digest
    assert env.input_hash == input_hash(request.payload)
    assert env.output_hash == output_hash(reply.output)
    assert env.payer is None
    assert env.node_id == SIGNER.node_id
    assert outcome.record == SettlementRecord(
        envelope=env, signature=reply.signature, chain_signature=reply.chain_signature
    )
    assert verify_envelope_signature(env, reply.signature)

    # Same input, same model: same output hash (the signed commitment is reproducible).
    again = await pipeline.handle(request)
    assert isinstance(again.reply, InferenceResult)
    assert again.reply.envelope.output_hash == env.output_hash


async def test_onnx_bad_input_is_bad_request(onnx_pipeline: tuple[Pipeline, Engine]) -> None:
    pipeline, _ = onnx_pipeline
    request = InferenceRequest(
        request_id="req-p-1",
        model="demo-mlp",
        created_unix_ms=NOW_MS,
        payload=MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 3], data=[1.0] * 3)}),
    )
    reply = _error(await pipeline.handle(request))
    assert reply.code is ErrorCode.BAD_REQUEST
    assert reply.retryable is False


async def test_onnx_chat_payload_is_bad_request(onnx_pipeline: tuple[Pipeline, Engine]) -> None:
    pipeline, _ = onnx_pipeline
    reply = _error(await pipeline.handle(chat_request(model="demo-mlp")))
    assert reply.code is ErrorCode.BAD_REQUEST
    assert SECRET not in reply.message


async def test_integer_beyond_ijson_range_is_answered_not_raised(
    onnx_pipeline: tuple[Pipeline, Engine],
) -> None:
    pipeline, _ = onnx_pipeline
    # The schema refuses it at the door...
    with pytest.raises(ValidationError):
        _ml_request([2**60, 0.0, 0.0, 0.0])
    # ...and should one get past (a payload document hashed as received), the pipeline still
    # answers instead of raising into the intake.
    outcome = await pipeline.handle(_ml_request([1.0, 0.0, 0.0, 0.0]), {"kind": "ml", "big": 2**60})
    assert isinstance(outcome.reply, ErrorReply)
    assert outcome.reply.code is ErrorCode.BAD_REQUEST


class _Hanging:
    """An engine stuck for ever (until cancelled, which it records)."""

    model_name = "demo-lm"
    model_digest = DIGEST

    def __init__(self) -> None:
        self.cancelled = False

    async def run(self, payload: object, ctx: object = None) -> object:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def test_a_stuck_engine_is_aborted_and_answered_timeout_at_the_node_limit() -> None:
    engine = _Hanging()
    pipeline = Pipeline(
        {"demo-lm": engine},  # type: ignore[dict-item]
        SIGNER,
        CHAIN_SIGNER,
        clock_ms=lambda: NOW_MS,
        max_execution_s=0.05,
    )
    reply = _error(await pipeline.handle(chat_request()))
    assert reply.code is ErrorCode.TIMEOUT and reply.retryable
    assert engine.cancelled  # aborted, not left running


async def test_a_stuck_engine_is_answered_deadline_exceeded_at_the_request_deadline() -> None:
    engine = _Hanging()
    clock = [NOW_MS]
    pipeline = Pipeline(
        {"demo-lm": engine},  # type: ignore[dict-item]
        SIGNER,
        CHAIN_SIGNER,
        clock_ms=lambda: clock[0],
        max_execution_s=60,
    )
    reply = _error(await pipeline.handle(chat_request(deadline_unix_ms=NOW_MS + 50)))
    assert reply.code is ErrorCode.DEADLINE_EXCEEDED and engine.cancelled


# --- who pays, and when ---------------------------------------------------------------------

_OTHER_TERMS: dict[str, object] = {
    "request_id": "req-p-2",
    "model": "demo-mlp",
    "created_unix_ms": NOW_MS - 99,
    "settlement": SettlementMode.PRIVATE,
    "params": 65,
    "payload": "other prompt",
}


@given(term=st.sampled_from(sorted(_OTHER_TERMS)))
@settings(max_examples=20, deadline=None)
async def test_a_payer_grant_moved_to_other_terms_is_refused_before_running(term: str) -> None:
    # The attacker copies a paying request and changes one term (or pastes its payer onto its
    # own request): the grant is rebuilt from what the node would run, so it does not verify.
    engine = ScriptedEngine(name=str(_OTHER_TERMS["model"]) if term == "model" else "demo-lm")
    pipeline = Pipeline({engine.model_name: engine}, SIGNER, CHAIN_SIGNER, clock_ms=lambda: NOW_MS)
    paid = chat_request()
    value = _OTHER_TERMS[term]
    if term == "params":
        changed = paid.payload.model_copy(update={"params": SamplingParams(max_tokens=65)})  # type: ignore[union-attr]
        moved = paid.model_copy(update={"payload": changed})
    elif term == "payload":
        other = chat_request(
            payer=None, payload=ChatInput(messages=[ChatMessage(role="user", content=str(value))])
        )
        moved = other.model_copy(update={"payer": paid.payer})
    else:
        moved = paid.model_copy(update={term: value})
    outcome = await pipeline.handle(moved)
    assert outcome.error_code is ErrorCode.BAD_PAYER
    assert engine.calls == [] and outcome.record is None


@pytest.mark.parametrize("age_ms", [3_600_001, 10**11], ids=["an-hour-old", "years-old"])
async def test_a_replayed_old_request_is_refused_stale(age_ms: int) -> None:
    engine = ScriptedEngine()
    outcome = await _pipeline(engine).handle(chat_request(created_unix_ms=NOW_MS - age_ms))
    assert outcome.error_code is ErrorCode.STALE_REQUEST and engine.calls == []
    future = await _pipeline(engine).handle(chat_request(created_unix_ms=NOW_MS + 300_001))
    assert future.error_code is ErrorCode.STALE_REQUEST


async def test_a_node_that_is_not_admitted_runs_nothing() -> None:
    engine = ScriptedEngine()
    pipeline = Pipeline(
        {"demo-lm": engine}, SIGNER, CHAIN_SIGNER, clock_ms=lambda: NOW_MS, admitted=lambda: False
    )
    outcome = await pipeline.handle(chat_request())
    assert outcome.error_code is ErrorCode.NOT_ADMITTED and engine.calls == []
    assert isinstance(outcome.reply, ErrorReply) and outcome.reply.retryable
