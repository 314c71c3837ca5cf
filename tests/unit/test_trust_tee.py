"""TEE mode: served only by a node with evidence; the envelope says TEE."""

from __future__ import annotations

from schemas.attestation import binding_report_data
from schemas.base import VerificationMode
from schemas.results import ErrorCode, ErrorReply, InferenceResult
from tests.harness.pipeline import CHAIN_SIGNER, NOW_MS, SIGNER, ScriptedEngine, chat_request
from worker.pipeline import Pipeline
from worker.trust.attestation.dev import DevProvider
from worker.trust.tee import TeeMode


def _pipeline(mode: TeeMode) -> Pipeline:
    return Pipeline(
        {"demo-lm": ScriptedEngine()},
        SIGNER,
        CHAIN_SIGNER,
        clock_ms=lambda: NOW_MS,
        modes={VerificationMode.TEE: mode},
    )


async def test_a_node_without_evidence_refuses_tee_requests() -> None:
    outcome = await _pipeline(TeeMode(None)).handle(chat_request(mode=VerificationMode.TEE))
    assert isinstance(outcome.reply, ErrorReply)
    assert outcome.reply.code is ErrorCode.UNSUPPORTED_MODE


async def test_an_attested_node_signs_tee_results() -> None:
    report_data = binding_report_data(
        node_id=SIGNER.node_id, x25519_public_key="11" * 32, chain_address="0x" + "ab" * 20
    )
    attestation = DevProvider(bytes(32)).attest(report_data)
    assert attestation.kind == "dev"
    # Development evidence proves nothing: it serves TEE requests only where allowed.
    refused = await _pipeline(TeeMode(attestation)).handle(chat_request(mode=VerificationMode.TEE))
    assert refused.error_code is ErrorCode.UNSUPPORTED_MODE
    allowed = TeeMode(attestation, allow_dev=True)
    outcome = await _pipeline(allowed).handle(chat_request(mode=VerificationMode.TEE))
    assert isinstance(outcome.reply, InferenceResult)
    assert outcome.reply.envelope.mode is VerificationMode.TEE
    assert outcome.record is not None and outcome.record.envelope.mode is VerificationMode.TEE
