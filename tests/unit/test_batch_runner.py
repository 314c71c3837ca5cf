"""A batch run on in-memory Kafka with the real worker: the resume path in milliseconds.

The run is interrupted while no worker runs (its requests are produced and unanswered); the
worker then answers them with no client listening; the resumed run must find those answers on
the reply topic instead of waiting for a worker that drops the copies it is sent again, and
every request id must be answered exactly once. Errors an attacker wrote to the reply topic
for those requests meanwhile (signed by a node nobody admitted) must not finish them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from client import InferenceClient
from client.batch import BatchOptions, batch_status, run_job
from client.batch.jobs import ClientFactory
from client.batch.state import JobState
from infra.kafka.memory import MemoryKafka
from infra.kafka.ports import Kafka
from schemas.codec import encode
from schemas.results import ErrorCode
from schemas.topics import Topics, standard_topics
from tests.harness.admission import AdmissionFile
from tests.harness.batch import write_batch_file
from tests.harness.nodes import TestNode
from worker.answers import Answers
from worker.app import Worker
from worker.settings import WorkerSettings

MODELS = ["demo-mlp"]


@pytest.fixture
def kafka() -> MemoryKafka:
    kafka = MemoryKafka()
    for spec in standard_topics("og", MODELS):
        kafka.create_topic(spec.name, spec.partitions, compacted="cleanup.policy" in spec.config)
    return kafka


@pytest.fixture
def admission(tmp_path: Path) -> AdmissionFile:
    return AdmissionFile(tmp_path / "admission.json")


def _client(admission: AdmissionFile) -> ClientFactory:
    def build(kafka: Kafka, topics: Topics, reply_to: str) -> InferenceClient:
        return InferenceClient(kafka, topics, reply_to, admission=admission.settings())

    return build


@contextlib.asynccontextmanager
async def _worker(
    kafka: MemoryKafka, demo_hub: Path, tmp_path: Path, admission: AdmissionFile
) -> AsyncIterator[Worker]:
    settings = WorkerSettings(
        models=MODELS,
        hub_dir=demo_hub,
        cache_dir=tmp_path / "cache",
        key_dir=tmp_path / "k",
        admission=admission.settings(),
    )
    admission.admit_worker(settings)
    worker = Worker(settings, kafka=kafka)
    await worker.setup()
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)
        await worker.close()


async def test_a_resumed_run_finds_answers_given_while_no_client_ran(
    kafka: MemoryKafka, demo_hub: Path, tmp_path: Path, admission: AdmissionFile
) -> None:
    batch = write_batch_file(tmp_path / "in.jsonl", ml=300, chat=0, invalid=20, bad_shape=5)
    job, topics = tmp_path / "job", Topics("og")
    options = BatchOptions(max_in_flight=50, sent_chunk=16, timeout_s=30)

    # First run, no worker: it sends up to its bound, then waits; interrupt it there.
    client = _client(admission)
    first = asyncio.create_task(
        run_job(batch.path, job, kafka, topics, options=options, client_factory=client)
    )
    async with asyncio.timeout(30):
        while not (JobState.exists(job) and batch_status(job)["in_flight"] >= 50):
            if first.done():
                first.result()  # raises what stopped it
                raise AssertionError("the run ended before it was interrupted")
            await asyncio.sleep(0.01)
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    interrupted = batch_status(job)
    assert interrupted["in_flight"] >= 50 and not interrupted["running"]

    produced = len(kafka.records(topics.infer("demo-mlp")))
    assert 0 < produced <= interrupted["in_flight"]
    forged = await _forge_errors(kafka, topics, 10)
    async with _worker(kafka, demo_hub, tmp_path, admission):
        # The worker answers what was produced, with no client listening; then the resume.
        while len(kafka.records(topics.replies)) < produced + forged:
            await asyncio.sleep(0.01)
        summary = await run_job(
            batch.path, job, kafka, topics, options=options, client_factory=client
        )

    assert summary["status"] == "completed"
    # Answered while no client ran: recovered, not sent again; marked but never produced: sent.
    assert summary["run"]["recovered"] == produced
    assert summary["run"]["resent"] == interrupted["in_flight"] - produced
    assert summary["outcomes"]["result"] == 300 - 5
    assert summary["errors"] == {"bad_request": 5}
    assert summary["outcomes"]["invalid_line"] == 20
    assert summary["verified"] == 300 - 5
    out = [json.loads(x) for x in (job / "output.jsonl").read_text().splitlines()]
    assert [o["line"] for o in out] == list(range(1, 321))

    docs = [json.loads(r.value or b"{}") for r in kafka.records(topics.replies)]
    genuine = [d for d in docs if d.get("node_id") != INTRUDER.node_id]
    assert len(docs) - len(genuine) == forged
    replies = Counter(d["request_id"] for d in genuine)
    assert len(replies) == 300 and set(replies.values()) == {1}  # no request answered twice


INTRUDER = TestNode.seeded(9)


async def _forge_errors(kafka: MemoryKafka, topics: Topics, n: int) -> int:
    """Write ``n`` signed but unadmitted ``deadline_exceeded`` errors for produced requests."""
    answers = Answers(INTRUDER.signer, INTRUDER.chain, lambda: 1_800_000_000_000)
    producer = kafka.producer()
    await producer.start()
    try:
        for record in kafka.records(topics.infer("demo-mlp"))[:n]:
            rid = json.loads(record.value or b"{}")["request_id"]
            error = answers.error(rid, "demo-mlp", ErrorCode.DEADLINE_EXCEEDED, "forged")
            await producer.send_and_wait(topics.replies, encode(error), key=rid.encode())
    finally:
        await producer.stop()
    return n
