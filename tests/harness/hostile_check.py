"""What a worker owes each hostile record (``tests.harness.hostile``), and the check of what it
did, from the topics alone (so the same check reads an in-memory cluster, Tansu, or the topics
real worker processes wrote).

What is owed (``owed``): a record the node cannot read, or whose request id cannot be read, is
dead-lettered (exactly one DLQ entry naming its topic, partition and offset). Any other record
is answered on a reply topic, under its request id, by at most one terminal reply (a result
or a typed error): each malformed record with a readable id gets its own error; of the copies
of a *whole* request, the first is answered and a later one either dropped as a duplicate of
it or (when the first was refused without running: wrong topic, refused reply topic) refused
again; one node never answers a request id with two results (it would have run it twice;
copies on partitions that different nodes own may each run once, and settlement books one).
The only dead letters allowed for a record with a readable id are the documented delivery
failures (its reply topic does not exist, its error reply is too large).

The request id is read with the worker's own decoder (``schemas.codec.decode``): the check is
about what the intake does with a record, not a second opinion on the schema.

Also checked: each result has exactly one settlement record and errors have none; no reply is
an ``internal`` error (our own bug); ``CANARY`` appears in no reply, settlement record, DLQ
entry or log line (a DLQ payload is sealed hex, which cannot hold it).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from infra.kafka.ports import Record
from schemas import topics as t
from schemas.codec import Decoded, decode
from schemas.dlq import DlqEntry
from schemas.requests import InferenceRequest
from schemas.topics import Topics
from tests.harness.hostile import CANARY, HostileRecord

__all__ = ["Owed", "Sent", "Verdict", "check", "owed", "reply_topics"]

TERMINAL = {"result", "sealed_result", "error", "sealed_reply"}
"""Reply types that end a request. A ``sealed_reply`` is a sealed error or a sealed stream chunk;
only the client's key tells which. The fuzzer seals ML requests only, which never stream, so
each ``sealed_reply`` it sees is an error."""
RESULTS = {"result", "sealed_result"}
DELIVERY_DEAD_LETTERS = ("the reply topic does not exist", "the error reply is larger")
"""Dead-letter reasons a record with a readable request id may get (``worker.intake``)."""


@dataclass(frozen=True)
class Owed:
    request_id: str | None
    """None: the record is owed a dead letter."""
    whole: bool = False
    """A whole request (copies of its id are duplicates); False: malformed, answered each time."""
    reply_to: str | None = None


def owed(record: HostileRecord) -> Owed:
    if record.unreadable:
        return Owed(None)
    decoded = decode(record.value, InferenceRequest)
    if isinstance(decoded, Decoded):
        return Owed(decoded.message.request_id, True, decoded.message.reply_to)
    return Owed(decoded.request_id, False, decoded.reply_to)


@dataclass(frozen=True)
class Sent:
    record: HostileRecord
    topic: str
    partition: int
    offset: int


def reply_topics(topics: Topics, sent: Iterable[Sent]) -> list[str]:
    """Every topic a reply to ``sent`` may be on: the shared one and each readable
    ``reply_to`` that is not internal."""
    names = {topics.replies}
    for s in sent:
        reply_to = owed(s.record).reply_to
        if reply_to is not None and not topics.is_internal(reply_to):
            names.add(reply_to)
    return sorted(names)


@dataclass
class Verdict:
    records: int = 0
    answered: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    """Copies of a whole request whose id another record carried (dropped by design)."""
    lost: int = 0
    answered_twice: int = 0
    """Request ids with more than one terminal reply (several records carried them)."""
    problems: list[str] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    """Reply types and error codes seen, and ``dlq`` (for reports)."""

    @property
    def ok(self) -> bool:
        return not self.problems and self.lost == 0

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "answered": self.answered,
            "dead_lettered": self.dead_lettered,
            "duplicates": self.duplicates,
            "lost": self.lost,
            "answered_twice": self.answered_twice,
            "problems": self.problems[:20],
            "outcomes": dict(sorted(self.outcomes.items())),
        }


def _doc(value: bytes | None) -> dict[str, Any]:
    try:
        doc = json.loads(value or b"")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _node(reply: dict[str, Any]) -> str:
    envelope = reply.get("envelope")
    node = envelope.get("node_id") if isinstance(envelope, dict) else reply.get("node_id")
    return str(node)


def _leaks(where: str, messages: Iterable[Record]) -> list[str]:
    canary = CANARY.encode()
    found = []
    for m in messages:
        parts = [m.value or b"", m.key or b""]
        parts += [k.encode("utf-8", "replace") + (v or b"") for k, v in m.headers or ()]
        if any(canary in part for part in parts):
            found.append(f"canary in clear on {where} at {m.partition}/{m.offset}")
    return found


def check(
    sent: Sequence[Sent],
    replies: Sequence[Record],
    dlq: Sequence[Record],
    settlement: Sequence[Record],
    logs: Sequence[str] = (),
) -> Verdict:
    """The verdict on ``sent`` given every message on the reply topics, the DLQ and the
    settlement topic, and the log lines written meanwhile (see the module docstring)."""
    v = Verdict(records=len(sent))
    owes = [owed(s.record) for s in sent]
    coords = {(s.topic, s.partition, s.offset): i for i, s in enumerate(sent)}

    # Dead letters: at most one per record, each for a record that was sent.
    dead: dict[int, list[DlqEntry]] = defaultdict(list)
    for m in dlq:
        try:
            entry = DlqEntry.model_validate_json(m.value or b"")
        except ValidationError:
            v.problems.append(f"DLQ entry at {m.partition}/{m.offset} is not a DlqEntry")
            continue
        i = coords.get((entry.original_topic, entry.original_partition, entry.original_offset))
        if i is None:
            v.problems.append(f"dead letter for nothing sent: {entry.original_offset}")
            continue
        headers = dict(m.headers or ())
        if headers.get(t.HEADER_ATTEMPTS) != str(entry.attempts).encode():
            v.problems.append(f"DLQ og-attempts header disagrees with its entry ({i})")
        dead[i].append(entry)
        v.outcomes["dlq"] += 1
    for i, entries in dead.items():
        if len(entries) > 1:
            v.problems.append(f"record {i} dead-lettered {len(entries)} times")
        reason = entries[0].reason
        if owes[i].request_id is not None and not reason.startswith(DELIVERY_DEAD_LETTERS):
            v.problems.append(f"record {i} has a request id but was dead-lettered: {reason}")

    # Terminal replies, by request id.
    answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for m in replies:
        doc = _doc(m.value)
        if doc.get("type") not in TERMINAL:
            continue
        rid = str(doc.get("request_id"))
        answers[rid].append(doc)
        v.outcomes[doc.get("code") or doc["type"]] += 1
        if doc.get("code") == "internal":
            v.problems.append(f"an internal error answered {rid}: a bug of ours")
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, o in enumerate(owes):
        if o.request_id is None:
            if i in dead:
                v.dead_lettered += 1
            else:
                v.lost += 1
                v.problems.append(f"record {i} ({sent[i].record.kind}) owed a dead letter: none")
        else:
            by_id[o.request_id].append(i)
    for rid in answers.keys() - by_id.keys():
        v.problems.append(f"a reply to {rid!r}, which no record carried")
    for rid, indexes in by_id.items():
        live = [i for i in indexes if i not in dead]
        v.dead_lettered += len(indexes) - len(live)
        malformed = sum(not owes[i].whole for i in live)
        whole = sum(owes[i].whole for i in live)
        # One reply for the whole copies together, unless one of them was dead-lettered
        # while another copy was in flight (that copy was dropped as its duplicate).
        copy_dead = any(owes[i].whole for i in indexes if i in dead)
        low = malformed + (1 if whole and not copy_dead else 0)
        high = malformed + whole
        got = len(answers.get(rid, []))
        v.answered_twice += got > 1
        ran = Counter(_node(d) for d in answers.get(rid, []) if d.get("type") in RESULTS)
        if any(n > 1 for n in ran.values()):
            v.problems.append(f"{rid!r}: run more than once by one node {dict(ran)}")
        lost = max(0, low - got)
        if lost:
            v.problems.append(f"{rid!r}: {got} replies for {low} owed")
        elif got > high:
            v.problems.append(f"{rid!r}: {got} replies, at most {high} owed")
        v.lost += lost
        v.answered += min(got, high)
        v.duplicates += len(live) - min(got, high) - lost

    # Settlement: one record per result, none for an error.
    results = Counter(
        rid for rid, docs in answers.items() for d in docs if d.get("type") in RESULTS
    )
    booked = Counter(str(_doc(m.value).get("envelope", {}).get("request_id")) for m in settlement)
    if booked != results:
        v.problems.append(f"settlement records {dict(booked)} != results {dict(results)}")

    v.problems += _leaks("a reply topic", replies)
    v.problems += _leaks("the DLQ", dlq)
    v.problems += _leaks("the settlement topic", settlement)
    v.problems += [f"canary in a log line: {line[:200]}" for line in logs if CANARY in line]
    return v
