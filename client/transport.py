"""Producing requests and awaiting their replies over Kafka, trusting only what verifies.

The client reads its reply topic without a consumer group (explicit assignment, starting at
the end), so any number of clients can share ``og.replies`` without rebalancing one another,
and routes each reply to the waiter of its request id. Anyone who can write the reply topic
can put anything on it, so a reply resolves a request only when it verifies
(``schemas.verify.result``): signed by a node the admission authority counts, naming this
request (and its payload's input hash), committing to what was asked. Anything else is ignored
and logged by kind: a forged error cannot cancel a request, a forged result cannot answer it,
and a copy after the first verified answer is dropped. Stream chunks are verified the same
way before they reach ``on_chunk``.

Sealed requests (``request_sealed``) are sealed only to nodes that are admitted and (by
default) attested, as seen in the registry (``discover``); every reply to them is opened with
the request's one-time key before it is verified.

No message on the reply topic can stop the reader: what does not decode, open or verify is
ignored, and a reply that makes our own verification fail unexpectedly is ignored too. An
``on_chunk`` callback that raises fails its own request (the caller's error is its answer), not
the reader. If the reader stops anyway (the broker failing past a retry budget), the client
says so loudly: every pending request fails with ``ReplyReaderStopped``, so does every later
send, and ``healthy`` turns False — never requests that silently wait for their timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from pydantic import TypeAdapter, ValidationError

from client.trust import ClientTrust
from infra.admission import AdmissionSettings
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Kafka, KafkaPortError, TopicPartition
from infra.kafka.settings import KafkaSettings
from schemas.codec import encode
from schemas.registry import NodeRegistration
from schemas.requests import InferenceRequest
from schemas.results import (
    ErrorReply,
    InferenceResult,
    Reply,
    SealedReply,
    SealedResult,
    StreamChunk,
)
from schemas.sealing import SealedReplyError, SealedRequest, seal_request
from schemas.topics import HEADER_SCHEMA_VERSION, Topics
from schemas.verify.attestation import AttestationPolicySettings
from schemas.verify.registry import RegistryView
from schemas.verify.result import verify_chunk, verify_error, verify_result
from schemas.version import SCHEMA_VERSION

__all__ = [
    "ChunkCallback",
    "InferenceClient",
    "NoActiveNodes",
    "ReplyReaderStopped",
    "ReplyTimeout",
    "Terminal",
]

log = logging.getLogger(__name__)
Terminal = InferenceResult | ErrorReply
ChunkCallback = Callable[[StreamChunk], None]
_REPLY: TypeAdapter[InferenceResult | SealedResult | ErrorReply | StreamChunk | SealedReply] = (
    TypeAdapter(Reply)
)


_READ_FAILURES_FATAL = 20
"""Consecutive failed fetches of the reply topic before the reader gives up (backing off up to
2 s between them: about half a minute of a broker that does not answer)."""


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class NoActiveNodes(LookupError):
    """No admitted (and attested, when required) node serves the model."""


class ReplyReaderStopped(RuntimeError):
    """The client's reader of the reply topic stopped: no reply can reach it any more."""


class ReplyTimeout(TimeoutError):
    def __init__(self, request_id: str, timeout_s: float) -> None:
        super().__init__(f"no verified reply to {request_id} within {timeout_s} s")
        self.request_id = request_id


@dataclass
class _Pending:
    request_id: str
    request: InferenceRequest | None
    """What was sent; None when only its id is known (a reply then verifies as signed by an
    admitted node for that id, without the checks against the request)."""
    future: asyncio.Future[Terminal]
    sealed: SealedRequest | None = None
    on_chunk: ChunkCallback | None = None
    stream_node: str | None = None
    """The node whose chunks this stream takes (the first verified chunk's)."""


class InferenceClient:
    def __init__(
        self,
        kafka: KafkaSettings | Kafka,
        topics: Topics | None = None,
        reply_to: str | None = None,
        *,
        admission: AdmissionSettings | None = None,
        attestation: AttestationPolicySettings | None = None,
        seal_to_attested_only: bool = True,
    ) -> None:
        """``admission`` names who admits nodes (default: the chain's NodeRegistry, which then
        needs ``registry_address``; ``AdmissionSettings(source="open")`` only for a closed
        development network); ``attestation`` which TEE evidence counts."""
        self._kafka: Kafka = ClusterKafka(kafka) if isinstance(kafka, KafkaSettings) else kafka
        self.topics = topics or Topics()
        self.reply_to = reply_to or self.topics.replies
        self._producer = self._kafka.producer()
        self._consumer = self._kafka.consumer(None)
        self._pending: dict[str, _Pending] = {}
        self._reader: asyncio.Task[None] | None = None
        self._reader_error: BaseException | None = None
        self.trust = ClientTrust(
            self._kafka,
            self.topics.registry,
            admission or AdmissionSettings(),
            attestation or AttestationPolicySettings(),
        )
        self._seal_to_attested_only = seal_to_attested_only
        self.ignored = 0
        """Replies ignored because they did not verify (or answered nothing pending)."""

    async def __aenter__(self) -> InferenceClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        await self.trust.start()
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
        self._reader.add_done_callback(self._reader_done)

    @property
    def healthy(self) -> bool:
        """False once the reply reader stopped or the trust facts stopped updating."""
        return self._reader_error is None and self.trust.healthy

    def _reader_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._reader_error = task.exception()
        log.error("reply reader stopped", extra={"error_type": type(self._reader_error).__name__})
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(self._stopped())

    def _stopped(self) -> ReplyReaderStopped:
        kind = type(self._reader_error).__name__
        return ReplyReaderStopped(f"the reply reader stopped ({kind}): no reply can arrive")

    def _require_reader(self) -> None:
        if self._reader_error is not None:
            raise self._stopped() from self._reader_error

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader])  # a reader that died was reported already
        await self._consumer.stop()
        await self._producer.stop()
        await self.trust.close()

    @property
    def registry_view(self) -> RegistryView:
        """The nodes this client knows from the registry (``schemas.verify.registry``)."""
        return self.trust.view

    async def discover(self, model: str) -> list[NodeRegistration]:
        """Nodes a request for ``model`` may be sealed to now: active, admitted, fresh and
        (unless the client was told otherwise) attested."""
        self.trust.require_healthy()
        return self.trust.view.active_nodes(
            model, _now_ms(), require_attestation=self._seal_to_attested_only
        )

    def expect(
        self, request: InferenceRequest | str, on_chunk: ChunkCallback | None = None
    ) -> asyncio.Future[Terminal]:
        """A future for the verified reply to ``request``, produced some other way (or
        earlier: a resumed batch job). Given only a request id (a message that may not even be
        a valid request), the reply is checked for its signer and id alone."""
        self._require_reader()
        rid = request if isinstance(request, str) else request.request_id
        sent = None if isinstance(request, str) else request
        pending = self._pending.get(rid)
        if pending is None:
            future: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()
            pending = self._pending[rid] = _Pending(rid, sent, future, None, on_chunk)
        return pending.future

    def forget(self, request_id: str) -> None:
        """Stop waiting for ``request_id`` (its future stays as it is)."""
        self._pending.pop(request_id, None)

    async def send(
        self, request: InferenceRequest, on_chunk: ChunkCallback | None = None
    ) -> asyncio.Future[Terminal]:
        """Produce a request (acknowledged by the broker); return a future for its verified
        reply."""
        return await self._send(request, None, on_chunk)

    async def _send(
        self,
        request: InferenceRequest,
        sealed: SealedRequest | None,
        on_chunk: ChunkCallback | None,
    ) -> asyncio.Future[Terminal]:
        if request.reply_to not in (None, self.reply_to):
            raise ValueError("request names a reply topic this client does not read")
        self._require_reader()
        if request.reply_to is None and sealed is None:
            request = request.model_copy(update={"reply_to": self.reply_to})
        future: asyncio.Future[Terminal] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = _Pending(
            request.request_id, request, future, sealed, on_chunk
        )
        await self._producer.send_and_wait(
            self.topics.infer(request.model),
            encode(request),
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
        return await self._await(await self.send(request, on_chunk), request, timeout_s)

    async def _await(
        self, future: asyncio.Future[Terminal], request: InferenceRequest, timeout_s: float
    ) -> Terminal:
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError as e:
            raise ReplyTimeout(request.request_id, timeout_s) from e
        finally:
            self._pending.pop(request.request_id, None)

    async def seal(self, request: InferenceRequest) -> SealedRequest:
        """Seal ``request`` to every node it may be sealed to (``discover``). Set its
        ``reply_to`` before: the sealed plaintext binds it."""
        nodes = await self.discover(request.model)
        if not nodes:
            raise NoActiveNodes("no admitted, attested node serves the model")
        if request.reply_to is None:
            request = request.model_copy(update={"reply_to": self.reply_to})
        return seal_request(request, [n.x25519_public_key for n in nodes])

    async def request_sealed(
        self,
        request: InferenceRequest | SealedRequest,
        timeout_s: float = 30.0,
        on_chunk: ChunkCallback | None = None,
    ) -> tuple[SealedRequest, Terminal]:
        """Seal (unless sealed already: ``seal``, or ``schemas.sealing.seal_request``), send
        and await ``request``; the reply comes back opened and verified. Returns the sealed
        request too: its ``plaintext`` is what the input hash is over."""
        sealed = request if isinstance(request, SealedRequest) else await self.seal(request)
        future = await self._send(sealed.request, sealed, on_chunk)
        return sealed, await self._await(future, sealed.request, timeout_s)

    async def _read(self) -> None:
        failures = 0
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200)
            except KafkaPortError as e:
                failures += 1
                kind = type(e).__name__
                log.warning("reply fetch failed", extra={"error_type": kind, "attempt": failures})
                if failures >= _READ_FAILURES_FATAL:
                    raise
                await asyncio.sleep(min(0.1 * failures, 2.0))
                continue
            failures = 0
            for records in batches.values():
                for msg in records:
                    self._dispatch(msg.value)

    def _dispatch(self, raw: bytes | None) -> None:
        try:
            reply = _REPLY.validate_json(raw or b"")
        except (ValueError, ValidationError):
            self._ignore("undecodable")
            return
        pending = self._pending.get(reply.request_id)
        if pending is None or pending.future.done():
            return  # another client's reply, or a copy after the verified answer
        if isinstance(reply, SealedReply | SealedResult) != (pending.sealed is not None):
            self._ignore("sealing does not match the request")
            return
        try:
            self._route(pending, reply)
        except SealedReplyError:
            self._ignore("sealed reply does not open")
        except Exception as e:  # our verification tripped on it (a bug): ignored, never fatal
            self._ignore(f"unverifiable reply ({type(e).__name__})")

    def _route(
        self,
        pending: _Pending,
        reply: InferenceResult | SealedResult | ErrorReply | StreamChunk | SealedReply,
    ) -> None:
        sealed = pending.sealed
        if isinstance(reply, SealedReply):
            assert sealed is not None
            reply = sealed.open_reply(reply)
        elif isinstance(reply, SealedResult):
            assert sealed is not None
            reply = sealed.open(reply)
        trust = self.trust.snapshot()
        plaintext = sealed.plaintext if sealed is not None else None
        if isinstance(reply, StreamChunk):
            report = verify_chunk(
                reply, pending.request_id, trust=trust, node_id=pending.stream_node
            )
            if not report.ok:
                self._ignore("chunk does not verify")
                return
            pending.stream_node = reply.node_id
            if pending.on_chunk is not None:
                try:
                    pending.on_chunk(reply)
                except Exception as e:  # the caller's callback: its error answers its request
                    pending.future.set_exception(e)
            return
        if isinstance(reply, ErrorReply):
            report = verify_error(reply, pending.request, trust=trust, plaintext=plaintext)
        else:
            report = verify_result(reply, pending.request, trust=trust, plaintext=plaintext)
        if report.ok:
            pending.future.set_result(reply)
        else:
            self._ignore(f"{type(reply).__name__} does not verify: {report.failed()}")

    def _ignore(self, why: str) -> None:
        self.ignored += 1
        log.warning("reply ignored", extra={"why": why})
