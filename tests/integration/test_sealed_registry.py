"""Registration, admission, heartbeats and sealed requests on the real broker, tried as an
attacker who can write the registry, request and reply topics would.

- A sealed request reaches only admitted, attested nodes, and nothing of it (prompt, output)
  appears on any topic or log; a node that registered itself (valid keys, valid development
  evidence) is never sealed to.
- A sealed request copied off the topic and redirected to another reply topic is refused
  without running, and the refusal is sealed to the original requester.
- Errors for sealed requests are sealed; a node without the key says ``not_a_recipient``.
- A node that stops heartbeating drops out on the verifier's clock, and settlement then
  rejects what it signs; TEE records need evidence the verifier accepts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from nacl.public import PrivateKey

from client import InferenceClient, build_request, seal_request
from infra.dev.broker import BrokerProcess
from schemas.base import VerificationMode
from schemas.canonical import canonical_bytes
from schemas.codec import encode
from schemas.registry import registration_key
from schemas.requests import ChatInput, ChatMessage, MLInput, SamplingParams, Tensor
from schemas.results import ErrorCode, ErrorReply, InferenceResult
from schemas.sealed import SealedInput
from schemas.topics import Topics
from schemas.verify.attestation import AttestationPolicySettings
from settlement.app import SettlementService
from tests.harness.admission import AdmissionFile
from tests.harness.nodes import TestNode
from tests.harness.support import eventually, fast_kafka, read_topic
from worker.app import Worker
from worker.settings import WorkerSettings
from worker.trust.attestation import DevProvider, attest_node
from worker.trust.attestation.settings import AttestationSettings

pytestmark = pytest.mark.kafka

CANARY = "canary-c41f9 my bank PIN is 8841"
DEV_EVIDENCE = AttestationPolicySettings(allow_dev=True)
"""Clients here accept development evidence as attestation (the worker runs the dev provider:
there is no TEE on this machine); admission still decides who counts."""


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


def _attested(settings: WorkerSettings) -> WorkerSettings:
    return settings.model_copy(update={"attestation": AttestationSettings(provider="dev")})


def _client(
    broker: BrokerProcess, namespace: str, admission: AdmissionFile, **kw: Any
) -> InferenceClient:
    kw.setdefault("attestation", DEV_EVIDENCE)
    return InferenceClient(
        fast_kafka(broker.bootstrap), Topics(namespace), admission=admission.settings(), **kw
    )


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


async def _publish(broker: BrokerProcess, topic: str, value: bytes, key: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _self_register(broker: BrokerProcess, namespace: str) -> str:
    """An intruder registers itself, with valid development evidence bound to its keys, for
    every model; returns its X25519 key."""
    intruder = TestNode.seeded(66)
    x25519 = PrivateKey(bytes([66]) * 32).public_key.encode().hex()
    evidence = attest_node(
        DevProvider(bytes([66]) * 32),
        node_id=intruder.node_id,
        x25519_public_key=x25519,
        chain_address=intruder.chain_address,
    )
    registration = intruder.registration(
        models=("demo-lm", "demo-mlp"), x25519_public_key=x25519, attestation=evidence
    )
    await _publish(
        broker, Topics(namespace).registry, encode(registration), registration_key(intruder.node_id)
    )
    return x25519


async def test_sealed_requests_reach_only_admitted_attested_nodes_and_leak_nothing(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    topics = Topics(namespace)
    intruder_key = await _self_register(broker, namespace)
    async with (
        serving(_attested(worker_settings)) as worker,
        _client(broker, namespace, admission) as client,
    ):
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
        nodes = await client.discover("demo-lm")
        assert [n.node_id for n in nodes] == [worker.signer.node_id]
        assert nodes[0].x25519_public_key == worker.sealer.public_key_hex

        chat = build_request("demo-lm", _chat(CANARY))
        sealed, reply = await client.request_sealed(chat, timeout_s=30)
        payload = sealed.request.payload
        assert isinstance(payload, SealedInput)
        assert intruder_key not in {r.x25519_public_key for r in payload.recipients}
        assert isinstance(reply, InferenceResult), reply
        assert reply.envelope.node_id == worker.signer.node_id

        # An ML request too: its output values are known exactly, so we can look for them.
        x = Tensor(dtype="float32", shape=[1, 4], data=[0.125, -1.5, 2.25, 3.0])
        ml = build_request("demo-mlp", MLInput(tensors={"x": x}))
        _, ml_reply = await client.request_sealed(ml, timeout_s=30)
        assert isinstance(ml_reply, InferenceResult), ml_reply
        output_json = canonical_bytes(ml_reply.output)
        assert client.ignored == 0

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


async def test_without_attestation_a_client_seals_to_nobody_unless_told(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    async with serving(worker_settings) as worker:
        # No evidence at all: a prompt is sealed only where the node's TEE vouches for it.
        async with _client(broker, namespace, admission) as client:
            await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
            assert await client.discover("demo-lm") == []
        async with _client(broker, namespace, admission, seal_to_attested_only=False) as client:
            await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
            assert [n.node_id for n in await client.discover("demo-lm")] == [worker.signer.node_id]


async def test_a_redirected_sealed_request_is_refused_and_the_refusal_stays_sealed(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    topics = Topics(namespace)
    attacker_topic = topics.replies  # any topic the attacker reads; the node checks binding
    async with (
        serving(_attested(worker_settings)) as worker,
        _client(broker, namespace, admission) as client,
    ):
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
        request = build_request("demo-lm", _chat(CANARY)).model_copy(
            update={"reply_to": f"{namespace}.replies.alice"}
        )
        sealed = await client.seal(request)
        # The attacker copies it off the request topic, points it at a topic it reads, and
        # sends it again under the same id; the client waits on the real reply topic.
        redirected = sealed.request.model_copy(update={"reply_to": attacker_topic})
        victim = type(sealed)(redirected, sealed.plaintext, sealed.reply_key)
        _, reply = await client.request_sealed(victim, timeout_s=30)
        assert isinstance(reply, ErrorReply), reply
        assert reply.code is ErrorCode.SEALED_MISMATCH
        assert reply.node_id == worker.signer.node_id
        raw = await _raw_bytes(broker, topics.replies)
        assert b"sealed_mismatch" not in raw  # the refusal itself is sealed
        assert CANARY.encode() not in raw


async def test_not_a_recipient_and_tampered_ciphertext_get_sealed_typed_errors(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    async with (
        serving(_attested(worker_settings)) as worker,
        _client(broker, namespace, admission) as client,
    ):
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
        stranger = "5a" * 32  # a node key nobody holds the private half of
        request = build_request("demo-lm", _chat(CANARY)).model_copy(
            update={"reply_to": client.reply_to}
        )
        not_mine = seal_request(request, [stranger])
        _, reply = await client.request_sealed(not_mine, timeout_s=30)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.NOT_A_RECIPIENT
        assert reply.retryable

        sealed = await client.seal(build_request("demo-lm", _chat(CANARY)))
        payload = sealed.request.payload
        assert isinstance(payload, SealedInput)
        raw = bytearray(base64.b64decode(payload.ciphertext))
        raw[-3] ^= 0x40
        tampered_payload = payload.model_copy(
            update={"ciphertext": base64.b64encode(bytes(raw)).decode()}
        )
        tampered = type(sealed)(
            sealed.request.model_copy(update={"payload": tampered_payload}),
            sealed.plaintext,
            sealed.reply_key,
        )
        _, reply = await client.request_sealed(tampered, timeout_s=30)
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BAD_CIPHERTEXT
        assert CANARY not in reply.message


async def test_private_model_accepts_sealed_requests_only(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    settings = _attested(worker_settings).model_copy(update={"private_models": ["demo-lm"]})
    async with serving(settings) as worker, _client(broker, namespace, admission) as client:
        assert worker.registrar is not None
        models = worker.registrar.registration.models
        assert [m.private for m in models if m.name == "demo-lm"] == [True]
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
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
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
) -> None:
    settings = _attested(worker_settings).model_copy(update={"heartbeat_interval_s": 0.3})
    async with serving(settings) as worker, _client(broker, namespace, admission) as client:
        node_id = worker.signer.node_id
        view = client.registry_view
        await eventually(lambda: view.registration(node_id))
        assert [n.node_id for n in await client.discover("demo-mlp")] == [node_id]
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
        await eventually(lambda: not view.active_nodes("demo-mlp", _now_ms()), timeout_s=5)
        assert view.node_problem(node_id, _now_ms()) == "stale_node"
    # Shutting down published "draining": the node is not offered to clients any more.
    async with _client(broker, namespace, admission) as client:
        await eventually(lambda: client.registry_view.registration(node_id))
        assert await client.discover("demo-mlp") == []
        reg = client.registry_view.registration(node_id)
        assert reg is not None and reg.status == "draining"


def _now_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


async def test_registration_is_published_and_admission_awaited_before_the_worker_consumes(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
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
    node = worker_settings.model_copy()
    admission.revoke(next(iter(admission.nodes)))  # not admitted yet
    worker = Worker(node)
    setup = asyncio.create_task(worker.setup())
    try:
        await asyncio.sleep(1.5)
        assert not setup.done() and seen_at_consumer_start == []  # registered, waiting
        assert not worker.admitted
        admission.admit_worker(node)
        await asyncio.wait_for(setup, 30)
        assert seen_at_consumer_start == [worker.signer.node_id.encode()]
        assert worker.admitted
        assert worker.registrar is not None and worker.registrar.published_recently()
    finally:
        if not setup.done():
            setup.cancel()
        await worker.close()


async def test_settlement_rejects_records_a_stale_node_signs(
    broker: BrokerProcess,
    namespace: str,
    worker_settings: WorkerSettings,
    admission: AdmissionFile,
    running_settlement: SettlementService,
) -> None:
    settings = worker_settings.model_copy(update={"heartbeat_interval_s": 0.5})
    ledger = running_settlement.ledger
    assert ledger is not None
    x = Tensor(dtype="float32", shape=[1, 4], data=[0.5, 0.5, 0.5, 0.5])
    async with serving(settings) as worker, _client(broker, namespace, admission) as client:
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
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
    admission: AdmissionFile,
    running_settlement: SettlementService,
) -> None:
    settings = worker_settings.model_copy(
        update={"attestation": AttestationSettings(provider="dev", allow_dev_tee=True)}
    )
    ledger = running_settlement.ledger
    assert ledger is not None
    x = Tensor(dtype="float32", shape=[1, 4], data=[0.5, 0.5, 0.5, 0.5])
    async with serving(settings) as worker, _client(broker, namespace, admission) as client:
        assert worker.registrar is not None
        registration = worker.registrar.registration
        assert registration.attestation is not None and registration.attestation.kind == "dev"
        assert VerificationMode.TEE in registration.models[0].modes
        await eventually(lambda: client.registry_view.registration(worker.signer.node_id))
        tee = build_request("demo-mlp", MLInput(tensors={"x": x}), mode=VerificationMode.TEE)
        reply = await client.request(tee, 30)  # this client allows development evidence
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
    # A client with the default policy does not accept the TEE answer either.
    async with (
        serving(settings) as worker,
        _client(broker, namespace, admission, attestation=AttestationPolicySettings()) as strict,
    ):
        await eventually(lambda: strict.registry_view.registration(worker.signer.node_id))
        tee = build_request("demo-mlp", MLInput(tensors={"x": x}), mode=VerificationMode.TEE)
        with pytest.raises(TimeoutError):
            await strict.request(tee, 5)
        assert strict.ignored >= 1
