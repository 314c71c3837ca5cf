"""The client on the real broker, against someone who writes the reply topic: forged errors,
results and stream chunks for a pending request — validly signed by a node nobody admitted,
or by the admitted node's id with another key — are ignored and counted; the request resolves
with the worker's verified answer."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiokafka import AIOKafkaProducer

from client import InferenceClient, build_request
from infra.dev.broker import BrokerProcess
from schemas.codec import encode
from schemas.requests import ChatInput, ChatMessage, SamplingParams
from schemas.results import ChatOutput, ErrorCode, InferenceResult, StreamChunk
from schemas.signing import Signer
from schemas.topics import Topics
from tests.harness.admission import AdmissionFile
from tests.harness.nodes import TestNode
from tests.harness.support import fast_kafka
from worker.answers import Answers
from worker.app import Worker

pytestmark = pytest.mark.kafka

INTRUDER = TestNode.seeded(77)


async def test_forged_replies_are_ignored_and_the_real_answer_resolves(
    broker: BrokerProcess, namespace: str, running_worker: Worker, admission: AdmissionFile
) -> None:
    topics = Topics(namespace)
    chat = ChatInput(
        messages=[ChatMessage(role="user", content="hello")],
        params=SamplingParams(max_tokens=12, seed=3),
    )
    request = build_request("demo-lm", chat, reply_to=topics.replies, stream=True)
    now = time.time_ns() // 1_000_000
    intruder = Answers(INTRUDER.signer, INTRUDER.chain, lambda: now)
    # The admitted node's id, signed with another key: the signature check fails.
    impostor_signer = Signer(b"\x55" * 32)
    impostor = Answers(impostor_signer, INTRUDER.chain, lambda: now)
    rid, model = request.request_id, request.model
    forged = [
        intruder.error(rid, model, ErrorCode.DEADLINE_EXCEEDED, "forged"),
        intruder.chunk(rid, 0, "forged text", []),
        impostor.error(rid, model, ErrorCode.BAD_REQUEST, "forged"),
    ]
    async with InferenceClient(
        fast_kafka(broker.bootstrap), topics, admission=admission.settings()
    ) as client:
        chunks: list[StreamChunk] = []
        pending = client.expect(request, on_chunk=chunks.append)
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for reply in forged:  # on the reply topic before the worker has even seen it
                await producer.send_and_wait(topics.replies, encode(reply), key=rid.encode())
            forged_doc = impostor_result_doc(running_worker, request.request_id)
            await producer.send_and_wait(topics.replies, forged_doc, key=rid.encode())
            await producer.send_and_wait(topics.infer(model), encode(request), key=rid.encode())
        finally:
            await producer.stop()
        reply = await asyncio.wait_for(pending, 60)
        assert isinstance(reply, InferenceResult)
        assert reply.envelope.node_id == running_worker.signer.node_id
        assert chunks and {c.node_id for c in chunks} == {running_worker.signer.node_id}
        assert "".join(c.text for c in chunks) == reply.output.text  # type: ignore[union-attr]
        assert client.ignored >= len(forged) + 1


def impostor_result_doc(worker: Worker, request_id: str) -> bytes:
    """A result claiming to come from the admitted worker, signed by nobody's key."""
    record = INTRUDER.record(request_id, model_id="demo-lm", node_id=worker.signer.node_id)
    return encode(
        InferenceResult(
            request_id=request_id,
            envelope=record.envelope,
            signature=record.signature,
            chain_signature=record.chain_signature,
            output=ChatOutput(text="forged", finish_reason="stop"),
        )
    )
