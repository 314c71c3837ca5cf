"""The LLM proxy end to end on the real broker: a worker serving proxied OpenAI and Anthropic
models (real SDKs, local provider servers) answers signed results clients can verify, and
streams chunks that reassemble to the signed output."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import pytest
import rfc8785

from client import InferenceClient, build_request, verify_result
from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from schemas import ChatInput, ChatMessage, Topics
from schemas.requests import FunctionSpec, InferenceRequest, Tool
from schemas.results import ChatOutput, InferenceResult, StreamChunk
from schemas.signing import verify_envelope_signature
from schemas.topics import TopicSpec
from tests.harness.admission import AdmissionFile, trust_workers
from tests.harness.providers import anthropic_wire as awire
from tests.harness.providers import openai_wire as owire
from tests.harness.providers.server import ProviderServer, Received, Reply
from tests.harness.support import fast_kafka
from worker.app import Worker
from worker.proxy.settings import ProxySettings
from worker.settings import WorkerSettings

pytestmark = pytest.mark.kafka

GPT, CLAUDE = "gpt-proxy", "claude-proxy"
WEATHER = Tool(function=FunctionSpec(name="get_weather", parameters={"type": "object"}))


def _openai(request: Received) -> Reply:
    if request.json.get("stream"):
        return owire.chat_stream(
            ["Bonjour", ", ", "Ada"],
            tool_pieces=[(0, "call_1", "get_weather", '{"city":'), (0, None, None, '"Lyon"}')],
            finish_reason="tool_calls",
        )
    return owire.chat_completion("Bonjour, Ada", usage=(9, 3))


def _anthropic(request: Received) -> Reply:
    if request.json.get("stream"):
        return awire.message_stream(
            [
                ("text", ["Hello", " there"]),
                ("tool_use", ("toolu_1", "get_weather", ['{"a"', ":1}"])),
            ],
            stop_reason="tool_use",
        )
    return awire.message([awire.text_block("Hello there")], usage=(8, 2))


@pytest.fixture
async def providers() -> AsyncIterator[dict[str, ProviderServer]]:
    async with ProviderServer(_openai) as openai_server, ProviderServer(_anthropic) as anth:
        yield {GPT: openai_server, CLAUDE: anth}


@pytest.fixture
async def worker_settings(
    worker_settings: WorkerSettings,
    providers: dict[str, ProviderServer],
    broker: BrokerProcess,
    namespace: str,
) -> WorkerSettings:
    topics = Topics(namespace)
    await ensure_topics(broker.bootstrap, [TopicSpec(topics.infer(m), 2) for m in (GPT, CLAUDE)])
    proxy = ProxySettings.model_validate(
        {
            "endpoints": {
                "oa": {"provider": "openai", "base_url": providers[GPT].url, "api_key": "sk-it"},
                "an": {
                    "provider": "anthropic",
                    "base_url": providers[CLAUDE].url,
                    "api_key": "ak-it",
                },
            },
            "models": [
                {"name": GPT, "provider": "openai", "api_model": "gpt-test", "endpoints": ["oa"]},
                {
                    "name": CLAUDE,
                    "provider": "anthropic",
                    "api_model": "claude-test",
                    "endpoints": ["an"],
                },
            ],
        }
    )
    return worker_settings.model_copy(update={"proxy": proxy})


def _request(model: str, *, stream: bool = False) -> InferenceRequest:
    payload = ChatInput(
        messages=[ChatMessage(role="user", content="Greet Ada")],
        tools=[WEATHER],
        user="end-user-77",
    )
    return build_request(model, payload).model_copy(update={"stream": stream})


def _canonical_hash(output: ChatOutput) -> str:
    """Recomputed here without our own canonicaliser: the reference RFC 8785 package."""
    return hashlib.sha256(rfc8785.dumps(output.model_dump(mode="json"))).hexdigest()


async def test_proxied_models_answer_signed_verifiable_results(
    broker: BrokerProcess,
    namespace: str,
    providers: dict[str, ProviderServer],
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    requests = {m: _request(m) for m in (GPT, CLAUDE)}
    async with InferenceClient(
        fast_kafka(broker.bootstrap), Topics(namespace), admission=admission.settings()
    ) as client:
        replies = await asyncio.gather(*(client.request(r, 30) for r in requests.values()))

    expected_text = {GPT: "Bonjour, Ada", CLAUDE: "Hello there"}
    expected_digest = {GPT: b"openai:gpt-test", CLAUDE: b"anthropic:claude-test"}
    for (model, request), reply in zip(requests.items(), replies, strict=True):
        assert isinstance(reply, InferenceResult), reply
        report = verify_result(reply, request, trust=trust_workers(running_worker))
        assert report.ok, report.as_dict()
        assert verify_envelope_signature(reply.envelope, reply.signature)
        assert isinstance(reply.output, ChatOutput) and reply.output.text == expected_text[model]
        assert reply.envelope.output_hash == _canonical_hash(reply.output)
        assert reply.envelope.model_digest == hashlib.sha256(expected_digest[model]).hexdigest()
    assert replies[0].envelope.usage.input_tokens == 9  # type: ignore[union-attr]
    for server in providers.values():
        (received,) = server.requests
        assert b"end-user-77" not in received.body


async def test_streamed_chunks_reassemble_to_the_signed_output(
    broker: BrokerProcess,
    namespace: str,
    providers: dict[str, ProviderServer],
    running_worker: Worker,
    admission: AdmissionFile,
) -> None:
    chunks: dict[str, list[StreamChunk]] = {GPT: [], CLAUDE: []}
    requests = {m: _request(m, stream=True) for m in (GPT, CLAUDE)}
    async with InferenceClient(
        fast_kafka(broker.bootstrap), Topics(namespace), admission=admission.settings()
    ) as client:
        replies = await asyncio.gather(
            *(client.request(r, 30, on_chunk=chunks[m].append) for m, r in requests.items())
        )

    for (model, request), reply in zip(requests.items(), replies, strict=True):
        assert isinstance(reply, InferenceResult), reply
        assert verify_result(reply, request, trust=trust_workers(running_worker)).ok
        received = chunks[model]
        assert [c.index for c in received] == list(range(len(received))) and len(received) > 3
        output = reply.output
        assert isinstance(output, ChatOutput)
        assert "".join(c.text for c in received) == output.text
        arguments: dict[int, str] = {}
        for chunk in received:
            for delta in chunk.tool_calls:
                arguments[delta.index] = arguments.get(delta.index, "") + delta.arguments
        assert arguments == {i: c.function.arguments for i, c in enumerate(output.tool_calls)}
        assert output.finish_reason == "tool_calls"
        assert reply.envelope.output_hash == _canonical_hash(output)
    assert replies[0].output.text == "Bonjour, Ada"  # type: ignore[union-attr]
