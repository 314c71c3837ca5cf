"""Sending messages and reading back what the node did with them, by request id or offset.

Shared by the fault harness (``bench.chaos``) and the hostile-corpus test. ``TopicTap`` reads a
topic from the beginning in the background; ``send_corpus`` produces ``tests.harness.corpus``
cases and remembers where each landed; ``classify_requests`` / ``classify_settlement`` say, per
case, what came back (an error code, a result, a DLQ reason, a settlement rejection or a stored row)
and how often, or ``lost`` when nothing did.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, SealedBox

from infra.kafka import KafkaSettings
from schemas import topics as t
from schemas.topics import Topics
from tests.harness.corpus import CANARY, Case

__all__ = [
    "Observed",
    "Sent",
    "TopicTap",
    "classify_requests",
    "classify_settlement",
    "read_all",
    "send_corpus",
    "terminal_replies",
]

LOST = "lost"
_TERMINAL = {"result", "sealed_result", "error", "sealed_reply"}
"""A ``sealed_reply`` may hold a stream chunk; the corpus streams nothing sealed."""


class TopicTap:
    """Every message of ``topic`` from the beginning, collected by a background reader."""

    def __init__(self, kafka: KafkaSettings, topic: str, partitions: int | None = None) -> None:
        """``partitions``: the topic's partition count, where metadata cannot be trusted to
        list it (the mock cluster); None asks the broker."""
        self.topic = topic
        self.messages: list[Any] = []
        self._partitions = partitions
        self._consumer = AIOKafkaConsumer(**kafka.consumer_kwargs(None))
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> TopicTap:
        await self._consumer.start()
        try:
            if self._partitions is None:
                await self._consumer.topics()
                partitions = sorted(self._consumer.partitions_for_topic(self.topic) or ())
            else:
                partitions = list(range(self._partitions))
            if not partitions:
                raise RuntimeError(f"topic {self.topic} has no partitions")
            tps = [TopicPartition(self.topic, p) for p in partitions]
            self._consumer.assign(tps)
            await self._consumer.seek_to_beginning(*tps)
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(asyncio.CancelledError):
            await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100)
            for records in batches.values():
                self.messages.extend(records)


def terminal_replies(messages: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """request id → the terminal replies (results and errors; not stream chunks) seen for it."""
    replies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in messages:
        try:
            doc = json.loads(m.value)
        except (TypeError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("type") in _TERMINAL:
            replies[str(doc.get("request_id"))].append(doc)
    return replies


@dataclass(frozen=True)
class Sent:
    case: Case
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class Observed:
    name: str
    target: str
    expected: str
    observed: str
    answers: int
    """Terminal replies (request cases) or ledger rows + rejections (settlement cases)."""

    @property
    def ok(self) -> bool:
        return self.observed == self.expected and self.answers == 1

    @property
    def lost(self) -> bool:
        return self.observed == LOST


def expected_label(case: Case) -> str:
    e = case.expected
    return e.outcome if e.outcome in {"result", "stored"} else f"{e.outcome}:{e.detail}"


async def send_corpus(
    kafka: KafkaSettings, topics: Topics, model: str, cases: list[Case]
) -> list[Sent]:
    """Produce each case (in order, acknowledged) to its target topic, on partition 0: the
    request topic of ``model`` (the one the corpus was built for), or the settlement topic."""
    big = kafka.model_copy(update={"max_request_size_bytes": 4_000_000})
    producer = AIOKafkaProducer(**big.producer_kwargs())
    await producer.start()
    sent = []
    try:
        for case in cases:
            e = case.expected
            topic = topics.infer(model) if e.target == "request" else topics.settlement
            key = (e.request_id or case.name).encode()
            meta = await producer.send_and_wait(topic, case.raw, key=key, partition=0)
            sent.append(Sent(case, topic, meta.partition, meta.offset))
    finally:
        await producer.stop()
    return sent


def _opened(reply: dict[str, Any], key: bytes | None) -> dict[str, Any]:
    """A ``sealed_reply`` opened with the case's one-time key (as its requester would)."""
    if reply.get("type") != "sealed_reply" or key is None:
        return reply
    try:
        raw = SealedBox(PrivateKey(key)).decrypt(base64.b64decode(reply["sealed"]))
        inner: dict[str, Any] = json.loads(raw)
    except (CryptoError, ValueError, KeyError):
        return {"type": "error", "code": "sealed_reply_does_not_open"}
    return inner


def classify_requests(
    sent: list[Sent], replies: list[Any], dlq: list[Any]
) -> tuple[list[Observed], list[str]]:
    """Per request case: what came back. Also where the canary showed up: DLQ entries holding
    it in clear, and replies (opened, when sealed) that repeat it (there must be none)."""
    by_id = terminal_replies(replies)
    dead: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    leaks = []
    for m in dlq:
        headers = {k: v.decode(errors="replace") for k, v in m.headers or ()}
        origin = (
            headers.get(t.HEADER_ORIGINAL_TOPIC, ""),
            int(headers.get(t.HEADER_ORIGINAL_PARTITION, "-1")),
            int(headers.get(t.HEADER_ORIGINAL_OFFSET, "-1")),
        )
        dead[origin].append(headers.get(t.HEADER_REASON, ""))
        if CANARY.encode() in (m.value or b""):
            leaks.append(str(origin))
    observed = []
    for s in sent:
        e = s.case.expected
        if e.target != "request":
            continue
        answers = by_id.get(e.request_id or "", [])
        if any(CANARY in json.dumps(_opened(a, e.reply_key)) for a in answers):
            leaks.append(f"reply to {s.case.name}")
        reasons = dead.get((s.topic, s.partition, s.offset), [])
        if answers:
            first = _opened(answers[0], e.reply_key)
            label = "result" if first["type"] != "error" else f"error:{first.get('code')}"
        elif reasons:
            # A DLQ expectation names a reason prefix: report the prefix when it matches.
            reason = reasons[0]
            matches = e.outcome == "dlq" and e.detail and reason.startswith(e.detail)
            label = f"dlq:{e.detail}" if matches else f"dlq:{reason}"
        else:
            label = LOST
        observed.append(
            Observed(
                s.case.name, "request", expected_label(s.case), label, len(answers) + len(reasons)
            )
        )
    return observed, leaks


def classify_settlement(ledger_path: Path, sent: list[Sent]) -> list[Observed]:
    """Per settlement case: stored (a ledger row from that offset) or its rejection reason."""
    stored: set[str] = set()
    rejected: dict[str, list[str]] = defaultdict(list)
    uri = f"file:{ledger_path}?mode=ro"
    with contextlib.suppress(sqlite3.OperationalError):  # no ledger (yet): all lost
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            stored = {row[0] for row in db.execute("SELECT origin FROM records")}
            for reason, topic, partition, offset in db.execute(
                'SELECT reason, topic, partition, "offset" FROM rejections'
            ):
                rejected[f"{topic}/{partition}/{offset}"].append(reason)
    observed = []
    for s in sent:
        if s.case.expected.target != "settlement":
            continue
        origin = f"{s.topic}/{s.partition}/{s.offset}"
        reasons = rejected.get(origin, [])
        in_ledger = origin in stored
        label = "stored" if in_ledger else f"rejected:{reasons[0]}" if reasons else LOST
        observed.append(
            Observed(
                s.case.name,
                "settlement",
                expected_label(s.case),
                label,
                int(in_ledger) + len(reasons),
            )
        )
    return observed


async def read_all(kafka: KafkaSettings, topic: str, idle_s: float = 1.0) -> list[Any]:
    """Every message on ``topic`` so far: read until nothing new arrives for ``idle_s``."""
    async with TopicTap(kafka, topic) as tap:
        seen = -1
        while seen != len(tap.messages):
            seen = len(tap.messages)
            await asyncio.sleep(idle_s)
        return list(tap.messages)
