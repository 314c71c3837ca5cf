"""The hostile corpus (``tests.harness.corpus``) against a real worker on the real broker.

Every request-shaped message must end in exactly one terminal answer of the kind the corpus
names: a typed error reply with that code, or a DLQ entry with that reason (whose sealed
payload is the original message, byte for byte, and never the canary in clear). Nothing may be
lost, and the worker must keep serving: a good request sent after the corpus, on the same
partition, is answered with a result.

The corpus includes the three messages that used to stop the worker for good (an integer of
5,000 digits, and originals too large to copy into a DLQ entry): they must be answered too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable

import pytest

from client import build_request
from infra.dev.broker import BrokerProcess
from schemas import MLInput, Tensor, Topics, encode
from tests.harness.corpus import CANARY, Case, CorpusContext, Expected, hostile_corpus
from tests.harness.outcomes import Observed, Sent, TopicTap, classify_requests, send_corpus
from tests.harness.support import fast_kafka
from worker.app import Worker
from worker.publish import MAX_DLQ_COPY_BYTES

pytestmark = pytest.mark.kafka

MODEL = "demo-mlp"


def _cases(worker: Worker, topics: Topics) -> list[Case]:
    ctx = CorpusContext(topics, worker.sealer.public_key_hex, model=MODEL)
    cases = [c for c in hostile_corpus(ctx) if c.expected.target == "request"]
    good = build_request(
        MODEL,
        MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[1.0, 2.0, 3.0, 4.0])}),
        reply_to=topics.replies,
    )
    expected = Expected("request", "result", "", good.request_id)
    return [*cases, Case("good_request_after_the_corpus", encode(good), expected)]


async def _run_corpus(
    broker: BrokerProcess, topics: Topics, cases: list[Case], stopped: Callable[[], bool]
) -> tuple[list[Observed], list[str], list[Sent], list[dict[str, object]]]:
    """Send ``cases`` to partition 0 of the model's topic; wait until each is answered (or the
    worker stops, or 20 s pass); what came back, canary leaks (DLQ entries, replies), what was
    sent, the DLQ entries."""
    kafka = fast_kafka(broker.bootstrap)
    async with TopicTap(kafka, topics.replies) as replies, TopicTap(kafka, topics.dlq) as dlq:
        sent = await send_corpus(kafka, topics, MODEL, cases)
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            observed, leaks = classify_requests(sent, replies.messages, dlq.messages)
            settled = all(not o.lost for o in observed)
            if settled or stopped() or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # a late duplicate would show up now
        observed, leaks = classify_requests(sent, replies.messages, dlq.messages)
        entries = [json.loads(m.value) for m in dlq.messages]
    return observed, leaks, sent, entries


def _assert_dlq_holds_the_originals(sent: list[Sent], entries: list[dict[str, object]]) -> None:
    by_offset = {e["original_offset"]: e for e in entries}
    for s in sent:
        if s.case.expected.outcome == "dlq":
            entry = by_offset[s.offset]
            assert entry["sha256"] == hashlib.sha256(s.case.raw or b"").hexdigest(), s.case.name
            assert entry["original_topic"] == s.topic
            copied = len(s.case.raw or b"") <= MAX_DLQ_COPY_BYTES
            assert (entry["sealed_payload_hex"] is not None) == copied, s.case.name


async def test_hostile_requests_get_their_typed_error_or_dlq_reason_and_serving_continues(
    broker: BrokerProcess,
    namespace: str,
    running_worker: Worker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    topics = Topics(namespace)
    cases = _cases(running_worker, topics)
    assert len(cases) >= 50
    observed, leaks, sent, entries = await _run_corpus(broker, topics, cases, lambda: False)

    lost = [o.name for o in observed if o.lost]
    assert not lost, f"no answer at all for {lost}"
    wrong = [(o.name, o.expected, o.observed, o.answers) for o in observed if not o.ok]
    assert not wrong, wrong
    assert observed[-1].name == "good_request_after_the_corpus"  # answered: still serving
    assert not leaks, f"user data in clear in a DLQ entry or a reply: {leaks}"
    _assert_dlq_holds_the_originals(sent, entries)
    assert CANARY not in caplog.text, "user data reached the logs"
    kinds = {o.observed.split(":")[0] for o in observed}
    assert kinds == {"error", "dlq", "result"}
