"""Producing requests and awaiting their replies over Kafka.

The client reads its reply topic without a consumer group (explicit assignment, starting at the
end), so any number of clients can share ``og.replies`` without rebalancing one another, and
routes each reply to the waiter of its request id. Duplicate replies (after a worker crash) are
dropped. Stream chunks go to the request's ``on_chunk`` callback; only a terminal reply (a
result, sealed result or error) completes the request.

Sealed requests (``request_sealed``) are sealed to every active node serving the model, as
seen in the registry (``discover``), and the sealed reply is opened before it is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from types import TracebackType

from pydantic import TypeAdapter

from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Kafka, TopicPartition
from infra.kafka.reader import TopicReader
from infra.kafka.settings import KafkaSettings
from schemas.codec import encode
from schemas.registry import NodeRegistration
from schemas.requests import InferenceRequest
from schemas.results import ErrorReply, InferenceResult, Reply, SealedResult, StreamChunk
from schemas.sealing import SealedRequest, seal_request
from schemas.topics import HEADER_SCHEMA_VERSION, Topics
from schemas.verify.registry import RegistryView
from schemas.version import SCHEMA_VERSION

__all__ = ["ChunkCallback", "InferenceClient", "NoActiveNodes", "ReplyTimeout"]

log = logging.getLogger(__name__)
Terminal = InferenceResult | SealedResult | ErrorReply
ChunkCallback = Callable[[StreamChunk], None]
_REPLY: TypeAdapter[Terminal | StreamChunk] = TypeAdapter(Reply)


class NoActiveNodes(LookupError):
    """No active node serves the model (so a sealed request has no one to be sealed to)."""


class ReplyTimeout(TimeoutError):
    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no reply to {request_id} within {timeout_s} s")
        self.request_id = request_id


class InferenceClient:
    def __init__(
        self,
        kafka: KafkaSettings | Kafka,
        topics: Topics | None = None,
        reply_to: str | None = None,
    ) -> None:
        self._kafka: Kafka = ClusterKafka(kafka) if isinstance(kafka, KafkaSettings) else kafka
        self.topics = topics or Topics()
        self.reply_to = reply_to or self.topics.replies
        self._producer = self._kafka.producer()
        self._consumer = self._kafka.consumer(None)
        self._waiters: dict[str, asyncio.Future[Terminal]] = {}
        self._chunk_callbacks: dict[str, ChunkCallback] = {}
        self._reader: asyncio.Task[None] | None = None
        self._registry: TopicReader | None = None
        self._view = RegistryView()

    async def __aenter__(self) -> InferenceClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._consumer.partitions_for(self.reply_to)
        if not partitions:
            raise RuntimeError(f"reply topic {self.reply_to} does not exist")
        tps = [TopicPartition(self.reply_to, p) for p in sorted(partitions)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve positions now: replies produced from here on are seen
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read())

    async def close(self) -> None:
        if self._registry is not None:
            await self._registry.stop()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._consumer.stop()
        await self._producer.stop()

    async def discover(self, model: str) -> list[NodeRegistration]:
        """Active nodes serving ``model``, from the registry (read on first use, then kept
        current in the background)."""
        if self._registry is None:
            self._registry = TopicReader(
                self._kafka.consumer(None), self.topics.registry, self._view.apply
            )
            await self._registry.start()
        return self._view.active_nodes(model)

    @property
    def registry_view(self) -> RegistryView:
        """The nodes this client knows from the registry (filled by ``discover``)."""
        return self._view

    def expect(self, request_id: str) -> asyncio.Future[Terminal]:
        """A future for the reply to ``request_id``, for a request produced some other way."""
        future = self._waiters.get(request_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._waiters[request_id] = future
        return future

    async def send(
        self, request: InferenceRequest, on_chunk: ChunkCallback | None = None
    ) -> asyncio.Future[Terminal]:
        """Produce a request (acknowledged by the broker); return a future for its reply."""
        if request.reply_to not in (None, self.reply_to):
            raise ValueError("request names a reply topic this client does not read")
        future = self.expect(request.request_id)
        if on_chunk is not None:
            self._chunk_callbacks[request.request_id] = on_chunk
        request_to_send = (
            request if request.reply_to else request.model_copy(update={"reply_to": self.reply_to})
        )
        await self._producer.send_and_wait(
            self.topics.infer(request.model),
            encode(request_to_send),
            key=request.request_id.encode(),
            headers=[(HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())],
        )
        return future

    async def request(
        self,
        request: InferenceRequest,
        timeout_s: float = 30.0,
        on_chunk: ChunkCallback | None = None,
    ) -> Terminal:
        future = await self.send(request, on_chunk)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError as e:
            raise ReplyTimeout(request.request_id, timeout_s) from e
        finally:
            self._waiters.pop(request.request_id, None)
            self._chunk_callbacks.pop(request.request_id, None)

    async def seal(self, request: InferenceRequest) -> SealedRequest:
        """Seal ``request`` to every active node serving its model."""
        nodes = await self.discover(request.model)
        if not nodes:
            raise NoActiveNodes(f"no active node serves {request.model}")
        return seal_request(request, [n.x25519_public_key for n in nodes])

    async def request_sealed(
        self, request: InferenceRequest, timeout_s: float = 30.0
    ) -> tuple[SealedRequest, InferenceResult | ErrorReply]:
        """Seal, send and await ``request``; a sealed result comes back opened (raises
        ``client.sealing.SealedReplyError`` if it does not open). Returns the sealed request
        too: its ``plaintext`` is what ``verify_result`` checks the input hash against."""
        sealed = await self.seal(request)
        reply = await self.request(sealed.request, timeout_s)
        if isinstance(reply, SealedResult):
            return sealed, sealed.open(reply)
        if isinstance(reply, InferenceResult):
            # A node must never answer a sealed request in clear.
            raise ValueError("a sealed request was answered with a plain result")
        return sealed, reply

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for msg in records:
                    self._dispatch(msg.value)

    def _dispatch(self, raw: bytes | None) -> None:
        try:
            reply = _REPLY.validate_json(raw or b"")
        except ValueError:
            log.warning("undecodable reply ignored")
            return
        if isinstance(reply, StreamChunk):
            callback = self._chunk_callbacks.get(reply.request_id)
            if callback is not None:
                callback(reply)
            return
        future = self._waiters.get(reply.request_id)
        if future is not None and not future.done():
            future.set_result(reply)
