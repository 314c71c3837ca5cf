"""Registration, heartbeats and sealed requests on the real broker."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer

from client import (
    InferenceClient,
    RegistryPolicy,
    RegistryView,
    build_request,
    seal_request,
)
from infra.dev.broker import BrokerProcess
from infra.kafka.client import ClusterKafka
from infra.kafka.reader import TopicReader
from schemas.base import VerificationMode
from schemas.canonical import canonical_bytes
from schemas.requests import ChatInput, ChatMessage, MLInput, SamplingParams, Tensor
from schemas.results import ErrorCode, ErrorReply, InferenceResult
from schemas.sealed import SealedInput
from schemas.topics import Topics
from schemas.verify.attestation import AttestationPolicySettings, registration_check
from schemas.verify.result import verify_result
from settlement.app import SettlementService
from tests.harness.support import eventually, fast_kafka, read_topic
from worker.app import Worker
from worker.settings import WorkerSettings
from worker.trust.attestation.settings import AttestationSettings

pytestmark = pytest.mark.kafka

CANARY = "canary-c41f9 my bank PIN is 8841"


@asynccontextmanager
async def serving(settings: WorkerSettings) -> AsyncIterator[Worker]:
    worker = Worker(settings)
    await worker.setup()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()


def _client(broker: BrokerProcess, namespace: str) -> InferenceClient:
    return InferenceClient(fast_kafka(broker.bootstrap), Topics(namespace))


def _chat(text: str) -> ChatInput:
    return ChatInput(
        messages=[ChatMessage(role="user", content=text)],
        params=SamplingParams(max_tokens=16, seed=1),
    )


async def _raw_bytes(broker: BrokerProcess, *topics: str) -> bytes:
    messages = []
    for topic in topics:
        messages += await read_topic(broker.bootstrap, topic, idle_s=0.5)
    return b"\n".join((m.value or b"") + b"|" + (m.key or b"") for m in messages)


async def test_sealed_request_end_to_end_leaks_nothing(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    topics = Topics(namespace)
    async with serving(worker_settings) as worker, _client(broker, namespace) as client:
        nodes = await client.discover("demo-lm")
        assert [n.node_id for n in nodes] == [worker.signer.node_id]
        assert nodes[0].x25519_public_key == worker.sealer.public_key_hex

        chat = build_request("demo-lm", _chat(CANARY))
        sealed, reply = await client.request_sealed(chat, timeout_s=30)
        assert isinstance(reply, InferenceResult), reply
        report = verify_result(reply, sealed.request, plaintext=sealed.plaintext)
        assert report.ok, report.as_dict()
        assert reply.envelope.node_id == worker.signer.node_id

        # An ML request too: its output values are known exactly, so we can look for them.
        x = Tensor(dtype="float32", shape=[1, 4], data=[0.125, -1.5, 2.25, 3.0])
        ml = build_request("demo-mlp", MLInput(tensors={"x": x}))
        ml_sealed, ml_reply = await client.request_sealed(ml, timeout_s=30)
        assert isinstance(ml_reply, InferenceResult), ml_reply
        assert verify_result(ml_reply, ml_sealed.request, plaintext=ml_sealed.plaintext).ok
        output_json = canonical_bytes(ml_reply.output)

    raw = await _raw_bytes(
        broker, topics.infer("demo-lm"), topics.infer("demo-mlp"), topics.replies, topics.dlq
    )
    assert raw.count(b"sealed_result") == 2
    assert CANARY.encode() not in raw
    assert reply.output.model_dump_json().encode() not in raw
    values = output_json.split(b'"data":[')[1].split(b"]")[0]
    assert len(values) > 8 and values not in raw
    assert CANARY not in caplog.text
    assert values.decode() not in caplog.text


async def test_not_a_recipient_and_tampered_ciphertext_get_typed_errors(
    broker: BrokerProcess, namespace: str, worker_settings: WorkerSettings
) -> None:
    async with serving(worker_settings), _client(broker, namespace) as client:
        stranger = "5a" * 32  # a node key nobody holds the private half of
        not_mine = seal_request(build_request("demo-lm", _chat(CANARY)), [stranger])
        reply = await client.request(not_mine.request, timeout_s=30)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_A_RECIPIENT
        assert reply.retryable

        sealed = await client.seal(build_request("demo-lm", _chat(CANARY)))
        payload = sealed.request.payload
        assert isinstance(payload, SealedInput)
        raw = bytearray(base64.b64decode(payload.ciphertext))
        raw[-3] ^= 0x40
        tampered = sealed.request.model_copy(
            update={
                "payload": payload.model_copy(
                    update={"ciphertext": base64.b64encode(bytes(raw)).decode()}
                )
            }
        )
        reply = await client.request(tampered, timeout_s=30)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_CIPHERTEXT
        assert CANARY not in reply.message


async def test_private_model_accepts_sealed_requests_only(
    broker: BrokerProcess, namespace: str, worker_settings: WorkerSettings
) -> None:
    settings = worker_settings.model_copy(update={"private_models": ["demo-lm"]})
    async with serving(settings) as worker, _client(broker, namespace) as client:
        assert [m.private for m in worker.registrar.registration.models if m.name == "demo-lm"] == [
            True
        ]
        plain = await client.request(build_request("demo-lm", _chat("hello")), timeout_s=30)
        assert isinstance(plain, ErrorReply) and plain.code is ErrorCode.SEALING_REQUIRED
        _, opened = await client.request_sealed(
            build_request("demo-lm", _chat("hello")), timeout_s=30
        )
        assert isinstance(opened, InferenceResult)
        # Other models of the same node stay public.
        x = Tensor(dtype="float32", shape=[1, 4], data=[0.0, 0.0, 0.0, 0.0])
        ml = await client.request(build_request("demo-mlp", MLInput(tensors={"x": x})), 30)
        assert isinstance(ml, InferenceResult)


async def test_a_node_that_stops_heartbeating_drops_out(
    broker: BrokerProcess, namespace: str, worker_settings: WorkerSettings
) -> None:
    settings = worker_settings.model_copy(update={"heartbeat_interval_s": 0.3})
    topics = Topics(namespace)
    view = RegistryView()
    watcher = TopicReader(
        ClusterKafka(fast_kafka(broker.bootstrap)).consumer(None), topics.registry, view.apply
    )
    async with serving(settings) as worker:
        node_id = worker.signer.node_id
        await watcher.start()
        try:
            assert [n.node_id for n in view.active_nodes("demo-mlp")] == [node_id]
            first = view.registration(node_id)
            assert first is not None
            await eventually(
                lambda: (
                    (reg := view.registration(node_id)) is not None
                    and reg.heartbeat_unix_ms > first.heartbeat_unix_ms
                ),
                timeout_s=5,
            )
            assert worker.registrar is not None
            worker.registrar.stop()  # the node keeps serving but stops heart-beating
            await eventually(lambda: view.active_nodes("demo-mlp") == [], timeout_s=5)
            last = view.registration(node_id)
            assert last is not None
            assert view.check_record(node_id, last.heartbeat_unix_ms + 100) is None
            assert view.check_record(node_id, last.heartbeat_unix_ms + 1000) == "stale_node"
        finally:
            await watcher.stop()
    # Shutting down published "draining": the node is not offered to clients any more.
    async with _client(broker, namespace) as client:
        assert await client.discover("demo-mlp") == []
        reg = client.registry_view.registration(node_id)
        assert reg is not None and reg.status == "draining"


async def test_registration_is_published_before_the_worker_consumes(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topics = Topics(namespace)
    seen_at_consumer_start: list[bytes | None] = []
    original_start = AIOKafkaConsumer.start

    async def start(self: Any) -> None:
        # What the registry holds at the moment the request consumer starts (read_topic's
        # own consumer is started unpatched).
        monkeypatch.setattr(AIOKafkaConsumer, "start", original_start)
        records = await read_topic(broker.bootstrap, topics.registry, idle_s=0.3)
        seen_at_consumer_start.extend(r.key for r in records)
        await original_start(self)

    monkeypatch.setattr(AIOKafkaConsumer, "start", start)
    worker = Worker(worker_settings)
    await worker.setup()
    try:
        assert seen_at_consumer_start == [worker.signer.node_id.encode()]
        assert worker.registrar is not None and worker.registrar.published_recently()
    finally:
        await worker.close()


async def test_settlement_rejects_records_a_stale_node_signs(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    running_settlement: SettlementService,
) -> None:
    settings = worker_settings.model_copy(update={"heartbeat_interval_s": 0.5})
    ledger = running_settlement.ledger
    assert ledger is not None
    x = Tensor(dtype="float32", shape=[1, 4], data=[0.5, 0.5, 0.5, 0.5])
    async with serving(settings) as worker, _client(broker, namespace) as client:
        fresh = await client.request(build_request("demo-mlp", MLInput(tensors={"x": x})), 30)
        assert isinstance(fresh, InferenceResult)
        await eventually(lambda: ledger.count() == 1, timeout_s=20)
        assert worker.registrar is not None
        worker.registrar.stop()  # alive and serving, but no longer heart-beating
        await asyncio.sleep(0.5 * 3 + 1.0)
        late = await client.request(build_request("demo-mlp", MLInput(tensors={"x": x})), 30)
        assert isinstance(late, InferenceResult)  # the client still gets its answer
        await eventually(lambda: ledger.rejection_counts() == {"stale_node": 1}, timeout_s=20)
    assert ledger.count() == 1
    assert ledger.get(fresh.request_id) and not ledger.get(late.request_id)


async def test_tee_records_need_an_attestation_the_verifier_accepts(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    running_settlement: SettlementService,
) -> None:
    settings = worker_settings.model_copy(
        update={"attestation": AttestationSettings(provider="dev")}
    )
    ledger = running_settlement.ledger
    assert ledger is not None
    x = Tensor(dtype="float32", shape=[1, 4], data=[0.5, 0.5, 0.5, 0.5])
    async with serving(settings) as worker, _client(broker, namespace) as client:
        assert worker.registrar is not None
        registration = worker.registrar.registration
        assert registration.attestation is not None and registration.attestation.kind == "dev"
        assert VerificationMode.TEE in registration.models[0].modes
        tee = build_request("demo-mlp", MLInput(tensors={"x": x}), mode=VerificationMode.TEE)
        reply = await client.request(tee, 30)
        assert isinstance(reply, InferenceResult) and reply.envelope.mode is VerificationMode.TEE
        plain = await client.request(build_request("demo-mlp", MLInput(tensors={"x": x})), 30)
        assert isinstance(plain, InferenceResult)
        # Settlement's default policy refuses development evidence: the TEE record is
        # rejected, the VANILLA one from the same node is booked.
        await eventually(
            lambda: ledger.rejection_counts() == {"unattested_node": 1} and ledger.count() == 1,
            timeout_s=20,
        )
        assert ledger.get(plain.request_id)
        # A verifier that allows development evidence accepts the same node for TEE.
        lax = AttestationPolicySettings(allow_dev=True).policy()
        view = RegistryView(RegistryPolicy(attestation_check=registration_check(lax)))
        watcher = TopicReader(
            ClusterKafka(fast_kafka(broker.bootstrap)).consumer(None),
            Topics(namespace).registry,
            view.apply,
        )
        await watcher.start()
        try:
            node_id = worker.signer.node_id
            assert (
                view.check_record(node_id, reply.envelope.signed_unix_ms, VerificationMode.TEE)
                is None
            )
        finally:
            await watcher.stop()
