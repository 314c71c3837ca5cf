"""Replies to requests an earlier run of a batch job sent and never saw answered.

A client reads its reply topic from the end, so a reply that arrived while no client ran (the
earlier run was killed) is behind it; and the worker drops a request id it answered already,
so sending the line again would never bring it back. ``ReplyRecovery`` reads the reply topic
with a consumer of its own, from the earliest start offset recorded by the sessions that sent
those lines, and keeps reading, past the end, for as long as one of them is unanswered: a
reply arriving while the same request is being sent again is seen here even if the client
missed it. Each line's reply completes its future in ``futures`` (``request id -> future``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from client.batch.state import JobState, SentLine
from infra.kafka.ports import Consumer, TopicPartition
from schemas.results import ErrorReply, InferenceResult, Reply, SealedResult

__all__ = ["ReplyRecovery", "terminal_reply"]

log = logging.getLogger(__name__)
_REPLY: TypeAdapter[Any] = TypeAdapter(Reply)
_POLL_MS = 200


def terminal_reply(raw: bytes | None) -> InferenceResult | SealedResult | ErrorReply | None:
    """The terminal reply in ``raw`` (a result or an error), None for anything else."""
    try:
        reply = _REPLY.validate_json(raw or b"")
    except ValidationError:
        return None
    return reply if isinstance(reply, InferenceResult | SealedResult | ErrorReply) else None


class ReplyRecovery:
    """Lifecycle: ``start`` (seek, begin reading in the background) → ``caught_up`` →
    ``stop``. The consumer is assigned the reply topic's partitions already, and started."""

    def __init__(
        self,
        consumer: Consumer,
        partitions: Sequence[TopicPartition],
        open_lines: Sequence[SentLine],
        authentic: Callable[[InferenceResult | SealedResult | ErrorReply], bool],
    ) -> None:
        """``authentic(reply)``: whether a reply is signed by a node the client trusts (anyone
        can write the reply topic: a forged error must not finish a line)."""
        self._consumer = consumer
        self._authentic = authentic
        self._partitions = list(partitions)
        self._open = list(open_lines)
        loop = asyncio.get_running_loop()
        self.futures: dict[str, asyncio.Future[Any]] = {
            s.request_id: loop.create_future() for s in open_lines
        }
        self._ends: dict[TopicPartition, int] = {}
        self._caught_up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self, state: JobState) -> None:
        """Seek to where the sessions that sent the open lines started, note the current end
        (``caught_up`` waits for it) and start reading."""
        starts: dict[int, int] = {}
        from_beginning = False
        for session in {s.session for s in self._open}:
            positions = state.session_positions(session)
            if positions is None:
                from_beginning = True
                continue
            for partition, offset in positions.items():
                starts[partition] = min(starts.get(partition, offset), offset)
        for tp in self._partitions:
            if from_beginning or tp.partition not in starts:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, starts[tp.partition])
        self._ends = await self._consumer.end_offsets(self._partitions)
        self._task = asyncio.create_task(self._read(), name="batch-reply-recovery")

    async def caught_up(self, timeout_s: float) -> bool:
        """Wait until everything on the topic at ``start`` is read (False after the timeout:
        the lines not found are then simply sent again)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._caught_up.wait()
        return self._caught_up.is_set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    def _trusted(self, reply: InferenceResult | SealedResult | ErrorReply) -> bool:
        """``authentic``, where a reply our verification trips on (a bug) is just not trusted:
        one message on the reply topic must never stop recovery."""
        try:
            return self._authentic(reply)
        except Exception as e:
            log.warning("recovered reply not checked", extra={"error_type": type(e).__name__})
            return False

    async def _read(self) -> None:
        left = set(self._partitions)
        while any(not f.done() for f in self.futures.values()):
            batches = await self._consumer.getmany(timeout_ms=_POLL_MS)
            for records in batches.values():
                for record in records:
                    reply = terminal_reply(record.value)
                    future = None if reply is None else self.futures.get(reply.request_id)
                    if reply is None or future is None or future.done():
                        continue
                    if self._trusted(reply):
                        future.set_result(reply)
            if left:
                left = {tp for tp in left if await self._consumer.position(tp) < self._ends[tp]}
                if not left:
                    self._caught_up.set()
        self._caught_up.set()
