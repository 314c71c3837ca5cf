"""The client's reply reader against whoever writes the reply topic, in memory and on Tansu.

Nothing on the reply topic may stop the reader: bytes that are not JSON, JSON that is no reply,
a reply for nobody, a stream chunk whose ``on_chunk`` callback raises (that request fails with
the callback's error) and a reply our own checks trip on (ignored alone) all leave it serving,
so a later verified reply still resolves its request. A reader that stops anyway (here: an
error no port promises) is loud: pending requests fail with ``ReplyReaderStopped`` at once,
later sends refuse, ``healthy`` turns False.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from client import InferenceClient, ReplyReaderStopped, build_request, transport
from infra.admission import AdmissionSettings
from infra.kafka.ports import BrokerUnavailable, Producer
from schemas.codec import encode
from schemas.requests import ChatInput, ChatMessage, InferenceRequest
from schemas.results import ErrorCode, ErrorReply
from schemas.topics import Topics
from tests.harness.kafka_env import KafkaEnv
from tests.harness.nodes import TestNode
from worker.answers import Answers

MODEL = "demo-lm"
NODE = TestNode.seeded(41)


class CallbackBroke(Exception):
    """What the caller's ``on_chunk`` raises."""


def _request(topics: Topics) -> InferenceRequest:
    chat = ChatInput(messages=[ChatMessage(role="user", content="hello")])
    return build_request(MODEL, chat, reply_to=topics.replies, stream=True)


def _answers() -> Answers:
    return Answers(NODE.signer, NODE.chain, lambda: time.time_ns() // 1_000_000)


@pytest.fixture
async def topics(kafka: KafkaEnv) -> Topics:
    return await kafka.new_namespace([MODEL])


@pytest.fixture
async def client(kafka: KafkaEnv, topics: Topics) -> AsyncIterator[InferenceClient]:
    """A client that counts every registered node (``open``), with ``NODE`` registered."""
    async with kafka.producer() as producer:
        key, value = NODE.registration_message(models=(MODEL,))
        await producer.send_and_wait(topics.registry, value, key=key)
    async with InferenceClient(
        kafka.kafka, topics, admission=AdmissionSettings(source="open")
    ) as client:
        await kafka.wait_until(
            lambda: bool(client.registry_view.active_nodes(MODEL, time.time_ns() // 1_000_000)),
            "the client sees the registered node",
        )
        yield client


async def _put(producer: Producer, topics: Topics, value: bytes, key: str) -> None:
    await producer.send_and_wait(topics.replies, value, key=key.encode())


async def test_no_reply_message_stops_the_reader(
    kafka: KafkaEnv, topics: Topics, client: InferenceClient
) -> None:
    streamed, answered = _request(topics), _request(topics)

    def broken_callback(_chunk: object) -> None:
        raise CallbackBroke

    failing = client.expect(streamed, on_chunk=broken_callback)
    pending = client.expect(answered)
    answers = _answers()
    async with kafka.producer() as producer:
        for hostile in (b"\xff\xfe not json", b"[" * 10_000, b'{"type": "nothing"}', b""):
            await _put(producer, topics, hostile, answered.request_id)
        stray = answers.error("someone-else", MODEL, ErrorCode.BAD_REQUEST, "not yours")
        await _put(producer, topics, encode(stray), "someone-else")
        chunk = answers.chunk(streamed.request_id, 0, "hi", [], None)
        await _put(producer, topics, encode(chunk), streamed.request_id)
        error = answers.error(answered.request_id, MODEL, ErrorCode.BAD_REQUEST, "refused")
        await _put(producer, topics, encode(error), answered.request_id)
        with pytest.raises(CallbackBroke):
            await asyncio.wait_for(failing, kafka.timeout_s)
        reply = await asyncio.wait_for(pending, kafka.timeout_s)
    assert isinstance(reply, ErrorReply) and reply.node_id == NODE.node_id
    assert client.ignored >= 4  # the undecodable ones, counted
    assert client.healthy


async def test_a_reader_that_stops_fails_pending_and_later_requests_loudly(
    topics: Topics, client: InferenceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = client.expect(_request(topics))

    async def dies(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("a bug in the reader")

    monkeypatch.setattr(client._consumer, "getmany", dies)
    with pytest.raises(ReplyReaderStopped):
        await asyncio.wait_for(waiting, 10)
    assert not client.healthy
    with pytest.raises(ReplyReaderStopped):
        await client.send(_request(topics))
    with pytest.raises(ReplyReaderStopped):
        client.expect(_request(topics))


async def test_a_broker_hiccup_does_not_stop_the_reader(
    kafka: KafkaEnv, topics: Topics, client: InferenceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetch = client._consumer.getmany
    failures = iter(range(3))

    async def flaky(*args: object, **kwargs: object) -> object:
        if next(failures, None) is not None:
            raise BrokerUnavailable("down for a moment")
        return await fetch(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(client._consumer, "getmany", flaky)
    request = _request(topics)
    pending = client.expect(request)
    async with kafka.producer() as producer:
        error = _answers().error(request.request_id, MODEL, ErrorCode.BAD_REQUEST, "refused")
        await _put(producer, topics, encode(error), request.request_id)
    assert isinstance(await asyncio.wait_for(pending, kafka.timeout_s), ErrorReply)
    assert client.healthy


async def test_a_reply_the_checks_trip_on_is_ignored_and_the_reader_goes_on(
    kafka: KafkaEnv, topics: Topics, client: InferenceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifier bug on one reply (here: the first check raises) ignores that reply only."""
    checks = iter([True])
    real = transport.verify_error

    def trips_once(*args: Any, **kwargs: Any) -> Any:
        if next(checks, False):
            raise KeyError("a bug in a check")
        return real(*args, **kwargs)

    monkeypatch.setattr(transport, "verify_error", trips_once)
    request = _request(topics)
    pending = client.expect(request)
    error = _answers().error(request.request_id, MODEL, ErrorCode.BAD_REQUEST, "refused")
    async with kafka.producer() as producer:
        for _ in range(2):  # the same reply twice: the first trips the check, the second counts
            await _put(producer, topics, encode(error), request.request_id)
    assert isinstance(await asyncio.wait_for(pending, kafka.timeout_s), ErrorReply)
    assert client.ignored == 1 and client.healthy
