"""Settlement's contract: consumption scenarios in memory and on Tansu, batching and resumed
anchoring with ``MemoryChain`` and on anvil.

``SettlementContract`` runs the service as the CLI does (``tests.harness.settlement_service``)
on the ``kafka`` environment: records stored once, a redelivery a no-op, a copy in another
message a ``replay``, bad records rejected with their reason while valid ones flow, and offsets
committed only after the ledger write (every commit is checked against the ledger as it
happens, ``tests.harness.kafka_audit``). ``BatcherContract`` drives ``settlement.batcher`` step
by step on a fake clock against the ``chain`` environment: batches close by size and by age,
and a batch built but not anchored (chain down, or receipt lost) is anchored exactly once after
a restart, with ledger and chain agreeing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from infra.kafka.ports import BrokerUnavailable, Record, TopicPartition
from schemas.codec import encode
from schemas.merkle import MerkleTree
from schemas.settlement import SettlementRecord
from schemas.topics import Topics
from settlement.app import SettlementFatal
from settlement.batcher import Batcher, BatcherConfig
from settlement.chain import ChainError
from settlement.ledger import Accepted, BatchNotFoundError, Ledger, Origin, open_ledger
from settlement.nodes import RegistrySettings
from tests.harness.chain_env import ChainEnv
from tests.harness.kafka_audit import AuditedKafka, request_id_of
from tests.harness.kafka_env import KafkaEnv, end_offsets
from tests.harness.nodes import TestNode
from tests.harness.settlement_records import (
    MODEL,
    now_ms,
    registration,
    signed_record,
    with_bad_signature,
)
from tests.harness.settlement_service import SettlementRun
from tests.harness.support import settlement_counts

NODE_A = TestNode.seeded(1)
NODE_B = TestNode.seeded(2)
SELF_REGISTERED = TestNode.seeded(3)
"""Registers itself on the registry topic like any node, but no authority admitted it."""


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]


async def publish(
    kafka: KafkaEnv, topics: Topics, messages: Sequence[bytes | SettlementRecord]
) -> None:
    """Produce to the settlement topic as workers do (keyed by request id), in order."""
    async with kafka.producer() as producer:
        for message in messages:
            if isinstance(message, SettlementRecord):
                value, key = encode(message), message.envelope.request_id.encode()
            else:
                value, key = message, b"garbage"
            await producer.send_and_wait(topics.settlement, value, key=key)


async def register(kafka: KafkaEnv, topics: Topics, node: TestNode) -> None:
    key, value = registration(node)
    async with kafka.producer() as producer:
        await producer.send_and_wait(topics.registry, value, key=key)


class LedgerAudit:
    """Checks at every commit of settlement's consumer that each valid record below the
    committed offset is already in the ledger (``violations`` must stay empty)."""

    def __init__(self, valid: set[str]) -> None:
        self.valid = valid
        self.ledger: Ledger | None = None
        self.fetched: dict[TopicPartition, dict[int, str | None]] = defaultdict(dict)
        self.commits = 0
        self.violations: list[str] = []

    def on_fetch(self, batches: Mapping[TopicPartition, Sequence[Record]]) -> None:
        for tp, records in batches.items():
            for record in records:
                self.fetched[tp][record.offset] = request_id_of(record.value)

    def on_commit(self, offsets: Mapping[TopicPartition, int]) -> None:
        assert self.ledger is not None
        self.commits += 1
        for tp, committed in offsets.items():
            for offset, rid in self.fetched[tp].items():
                if offset < committed and rid in self.valid and not self.ledger.get(rid):
                    self.violations.append(f"{tp}: committed {committed} before storing {offset}")

    def kafka(self, env: KafkaEnv) -> AuditedKafka:
        return AuditedKafka(env.kafka, on_fetch=self.on_fetch, on_commit=self.on_commit)


async def settlement_ends(kafka: KafkaEnv, topics: Topics, count: int) -> dict[int, int | None]:
    return end_offsets(await kafka.read(topics.settlement, at_least=count), 4)


class SettlementContract:
    """Settlement consumption scenarios; the ``kafka`` fixture picks the backend."""

    async def test_valid_records_are_stored_once_and_bad_ones_rejected_with_their_reason(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        topics = await kafka.new_namespace([MODEL])
        await register(kafka, topics, NODE_A)
        await register(kafka, topics, SELF_REGISTERED)
        valid = [signed_record(NODE_A, rid) for rid in ids("ok", 10)]
        bad_signature = with_bad_signature(signed_record(NODE_A, "bad-sig"))
        unknown_node = signed_record(NODE_B, "unknown-node")
        not_admitted = signed_record(SELF_REGISTERED, "not-admitted")
        future = signed_record(NODE_A, "future", signed_unix_ms=now_ms() + 3_600_000)
        run = SettlementRun(
            kafka,
            topics,
            tmp_path / "ledger.sqlite3",
            admitted=[NODE_A],
            registry=RegistrySettings(unknown_node_wait_s=0.1),
        )
        service = await run.start()
        try:
            messages: list[bytes | SettlementRecord] = [
                *valid[:4],
                bad_signature,
                b'{"type": "settlement_record", ',
                *valid[4:7],
                unknown_node,
                not_admitted,
                future,
                *valid[7:],
            ]
            await publish(kafka, topics, messages)
            ledger = service.ledger
            assert ledger is not None
            group = service.settings.group_id
            ends = await settlement_ends(kafka, topics, len(messages))

            async def settled() -> bool:
                return await kafka.committed(group, topics.settlement) == ends

            await kafka.wait_until(settled, "every message settled and committed")
            counts = settlement_counts(service)
        finally:
            await run.stop()

        ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
        try:
            assert ledger.count() == len(valid)
            for record in valid:
                (row,) = ledger.get(record.envelope.request_id)
                assert row["node_id"] == NODE_A.node_id
                assert row["output_hash"] == record.envelope.output_hash
            for rid in ("bad-sig", "unknown-node", "not-admitted", "future"):
                assert ledger.get(rid) == []
            assert ledger.rejection_counts() == {
                "bad_signature": 1,
                "not_decodable": 1,
                "unknown_node": 1,
                "not_admitted": 1,
                "future_timestamp": 1,
            }
        finally:
            ledger.close()
        assert counts == {"verified": 10.0, "stored": 10.0, "rejected": 5.0}

    async def test_a_copy_of_a_stored_record_in_another_message_is_a_replay(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        topics = await kafka.new_namespace([MODEL])
        first, *rest = [signed_record(NODE_A, rid) for rid in ids("r", 3)]
        same_request_other_node = signed_record(NODE_B, first.envelope.request_id)
        await register(kafka, topics, NODE_A)
        await register(kafka, topics, NODE_B)
        run = SettlementRun(kafka, topics, tmp_path / "ledger.sqlite3", admitted=[NODE_A, NODE_B])
        service = await run.start()
        try:
            ledger = service.ledger
            assert ledger is not None
            # Nodes publish on their own partitions: the second answer follows the first.
            await publish(kafka, topics, [first, *rest])
            await kafka.wait_until(lambda: ledger.count() == 3, "the first answers stored")
            await publish(kafka, topics, [same_request_other_node])
            await kafka.wait_until(
                lambda: ledger.rejection_counts() == {"already_booked": 1},
                "the second node's answer to a booked request refused",
            )
            assert ledger.count() == 3
            (original,) = ledger.get(first.envelope.request_id)
            await publish(kafka, topics, [first])
            await kafka.wait_until(
                lambda: ledger.rejection_counts() == {"already_booked": 1, "replay": 1},
                "the copy rejected",
            )
            await asyncio.sleep(kafka.quiet_s)
            assert ledger.count() == 3
            assert ledger.get(first.envelope.request_id) == [original]
            assert original["node_id"] == NODE_A.node_id
            counts = settlement_counts(service)
        finally:
            await run.stop()
        # The ledger stores the copy as a ``replay`` rejection (docs/PROTOCOL.md), so
        # og_settlement_rejections{reason="replay"} counts it, not the redelivery counter.
        assert counts == {"verified": 5.0, "stored": 3.0, "rejected": 2.0}, (
            "a replay must be counted as a rejection, as the ledger stores it"
        )

    async def test_once_admission_facts_stop_refreshing_settlement_stops_and_commits_nothing(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        # An attacker who can make the authority's list unreadable (or an RPC that stops
        # answering) must not leave settlement judging on facts a revocation has overtaken.
        topics = await kafka.new_namespace([MODEL])
        await register(kafka, topics, NODE_A)
        run = SettlementRun(
            kafka, topics, tmp_path / "ledger.sqlite3", admitted=[NODE_A], admission_max_stale_s=1
        )
        service = await run.start()
        first = [signed_record(NODE_A, rid) for rid in ids("fresh", 3)]
        await publish(kafka, topics, first)
        ledger = service.ledger
        assert ledger is not None
        group = service.settings.group_id
        ends = await settlement_ends(kafka, topics, len(first))

        async def settled() -> bool:
            return await kafka.committed(group, topics.settlement) == ends

        await kafka.wait_until(settled, "the first records settled and committed")
        assert service.ready
        run.admission.path.write_bytes(b"not a signed list")
        await kafka.wait_until(lambda: not service.ready, "readiness fails on stale facts")
        await publish(kafka, topics, [signed_record(NODE_A, rid) for rid in ids("late", 3)])
        await kafka.wait_until(lambda: run.task.done(), "settlement stopped")
        with pytest.raises(SettlementFatal):
            await run.stop()
        reopened = open_ledger(str(tmp_path / "ledger.sqlite3"))
        try:
            assert reopened.count() == 3
        finally:
            reopened.close()
        assert await kafka.committed(group, topics.settlement) == ends

    async def test_a_registry_reader_that_dies_stops_settlement_before_it_commits_anything(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        # Rejections judged on a registry view that stopped moving may be wrong (a node's
        # fresh heartbeat never seen): settlement must not commit them, nor anything after.
        topics = await kafka.new_namespace([MODEL])
        await register(kafka, topics, NODE_A)
        audited = AuditedKafka(kafka.kafka)
        run = SettlementRun(
            kafka, topics, tmp_path / "ledger.sqlite3", admitted=[NODE_A], kafka=audited
        )
        service = await run.start()
        first = [signed_record(NODE_A, rid) for rid in ids("before", 3)]
        await publish(kafka, topics, first)
        group = service.settings.group_id
        ends = await settlement_ends(kafka, topics, len(first))

        async def settled() -> bool:
            return await kafka.committed(group, topics.settlement) == ends

        await kafka.wait_until(settled, "the first records settled and committed")
        (registry_reader,) = audited.readers
        registry_reader.fail_fetches()
        await kafka.wait_until(lambda: not service.ready, "readiness fails with the reader")
        await publish(kafka, topics, [signed_record(NODE_A, rid) for rid in ids("after", 3)])
        await kafka.wait_until(lambda: run.task.done(), "settlement stopped")
        with pytest.raises(SettlementFatal):
            await run.stop()
        reopened = open_ledger(str(tmp_path / "ledger.sqlite3"))
        try:
            assert reopened.count() == 3 and reopened.rejection_counts() == {}
        finally:
            reopened.close()
        assert await kafka.committed(group, topics.settlement) == ends

    async def test_a_crash_between_ledger_write_and_commit_redelivers_as_a_no_op(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        topics = await kafka.new_namespace([MODEL])
        records = [signed_record(NODE_A, rid) for rid in ids("c", 20)]
        valid = {r.envelope.request_id for r in records}
        await register(kafka, topics, NODE_A)
        await publish(kafka, topics, records)
        ledger_path = tmp_path / "ledger.sqlite3"

        audit = LedgerAudit(valid)
        audited = audit.kafka(kafka)
        crashed = SettlementRun(
            kafka, topics, ledger_path, admitted=[NODE_A], kafka=audited, max_batch=5
        )
        service = await crashed.start()
        audit.ledger = service.ledger
        (consumer,) = audited.consumers
        consumer.fail_commits(1)  # the first batch is written, then the process "dies"
        await asyncio.wait([crashed.task], timeout=kafka.timeout_s)
        with pytest.raises(BrokerUnavailable):
            await crashed.stop()
        group = service.settings.group_id
        assert await kafka.committed(group, topics.settlement) == dict.fromkeys(range(4))
        ledger = open_ledger(str(ledger_path))
        stored_before = ledger.count()
        ledger.close()
        assert 0 < stored_before < len(records)

        audit = LedgerAudit(valid)
        restarted = SettlementRun(
            kafka, topics, ledger_path, admitted=[NODE_A], kafka=audit.kafka(kafka)
        )
        service = await restarted.start()
        audit.ledger = service.ledger
        try:
            ends = await settlement_ends(kafka, topics, len(records))

            async def settled() -> bool:
                return await kafka.committed(group, topics.settlement) == ends

            await kafka.wait_until(settled, "the restart settled and committed everything")
            ledger = service.ledger
            assert ledger is not None
            assert ledger.count() == len(records)
            assert ledger.rejection_counts() == {}  # redelivered, not replayed
            counts = settlement_counts(service)
        finally:
            await restarted.stop()
        assert counts == {
            "verified": float(len(records)),  # everything was delivered again...
            "stored": float(len(records) - stored_before),  # ...and what was stored, a no-op
            "rejected": 0.0,
        }
        assert audit.commits > 0 and audit.violations == []

    async def test_stop_and_restart_on_the_same_ledger_and_group_loses_and_repeats_nothing(
        self, kafka: KafkaEnv, tmp_path: Path
    ) -> None:
        topics = await kafka.new_namespace([MODEL])
        records = [signed_record(NODE_A, rid) for rid in ids("s", 60)]
        valid = {r.envelope.request_id for r in records}
        ledger_path = tmp_path / "ledger.sqlite3"
        audits = [LedgerAudit(valid), LedgerAudit(valid)]
        await register(kafka, topics, NODE_A)

        async def produce_steadily() -> None:
            for start in range(0, len(records), 5):
                await publish(kafka, topics, records[start : start + 5])
                await asyncio.sleep(kafka.poll_s)

        first = SettlementRun(
            kafka, topics, ledger_path, admitted=[NODE_A], kafka=audits[0].kafka(kafka)
        )
        service = await first.start()
        audits[0].ledger = service.ledger
        producing = asyncio.create_task(produce_steadily())
        try:
            ledger = service.ledger
            assert ledger is not None
            await kafka.wait_until(lambda: ledger.count() >= 15, "the first instance stored some")
            await first.stop()
            first_counts = settlement_counts(service)
            assert first_counts["stored"] < len(records), "nothing left for the restart"

            second = SettlementRun(
                kafka, topics, ledger_path, admitted=[NODE_A], kafka=audits[1].kafka(kafka)
            )
            service = await second.start()
            audits[1].ledger = service.ledger
            try:
                await producing
                ends = await settlement_ends(kafka, topics, len(records))
                group = service.settings.group_id

                async def settled() -> bool:
                    return await kafka.committed(group, topics.settlement) == ends

                await kafka.wait_until(settled, "the restart settled everything")
                ledger = service.ledger
                assert ledger is not None
                assert ledger.count() == len(records)
                assert ledger.rejection_counts() == {}
                second_counts = settlement_counts(service)
            finally:
                await second.stop()
        finally:
            if not producing.done():
                producing.cancel()
        # A clean stop commits what it stored: the restart is delivered only the rest.
        assert first_counts["verified"] + second_counts["verified"] == len(records)
        assert first_counts["stored"] + second_counts["stored"] == len(records)
        for audit in audits:
            assert audit.commits > 0 and audit.violations == []


class TestSettlement(SettlementContract):
    """Runs every scenario on each backend of the ``kafka`` fixture (memory, tansu)."""


# -- batching and anchoring -------------------------------------------------------------------


class FakeClock:
    """Milliseconds; starts at the wall clock (the ledger stamps records with it)."""

    def __init__(self) -> None:
        self.now_ms = now_ms()

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


def stored_ledger(path: Path, n: int, node: TestNode = NODE_A) -> tuple[Ledger, list[str]]:
    ledger = open_ledger(str(path))
    rids = ids("b", n)
    ledger.store(
        [
            Accepted(signed_record(node, rid), Origin("t.settlement", 0, i))
            for i, rid in enumerate(rids)
        ]
    )
    return ledger, rids


def batches_of(ledger: Ledger) -> list[int]:
    """The ids of every batch (they count up from 1)."""
    found = []
    while True:
        try:
            ledger.batch(len(found) + 1)
        except BatchNotFoundError:
            return found
        found.append(len(found) + 1)


async def assert_ledger_and_chain_agree(
    ledger: Ledger, chain: ChainEnv, rids: Sequence[str], counts: Sequence[int]
) -> None:
    """Every batch anchored once, as the chain has it, with the root of its leaves; every
    record in exactly one batch."""
    assert batches_of(ledger) == list(range(1, len(counts) + 1))
    assert await chain.sends() == len(counts)
    for batch_id, count in enumerate(counts, start=1):
        row = ledger.batch(batch_id)
        assert (row.status, row.count) == ("anchored", count)
        assert (
            "0x"
            + MerkleTree(
                bytes.fromhex(leaf[2:]) for leaf in ledger.batch_leaves(batch_id)
            ).root.hex()
            == row.root
        )
        anchored = await chain.chain.find_anchor(bytes.fromhex(row.root[2:]))
        assert anchored is not None
        assert (anchored.tx_hash, anchored.block_number, anchored.batch_index) == (
            row.tx_hash,
            row.block_number,
            row.batch_index,
        )
        assert row.batch_index == batch_id - 1
    members = defaultdict(list)
    for rid in rids:
        for _, batch, _, _ in ledger.record_batch(rid):
            assert batch is not None
            members[rid].append(batch.id)
    assert sorted(members) == sorted(rids) and all(len(b) == 1 for b in members.values())
    assert ledger.unbatched_count() == 0 and ledger.open_batches() == []


class BatcherContract:
    """Batching and resumed anchoring; the ``chain`` fixture picks the backend."""

    async def test_a_batch_closes_when_it_reaches_max_records(
        self, chain: ChainEnv, tmp_path: Path
    ) -> None:
        ledger, rids = stored_ledger(tmp_path / "ledger.sqlite3", 12)
        clock = FakeClock()
        batcher = Batcher(
            ledger, chain.chain, BatcherConfig(max_records=5, max_age_s=60), clock_ms=clock
        )
        await batcher.step()
        await batcher.step()
        assert ledger.unbatched_count() == 2
        await batcher.step()  # two young records: not due
        assert batches_of(ledger) == [1, 2] and ledger.unbatched_count() == 2
        clock.advance(60)
        await batcher.step()
        await assert_ledger_and_chain_agree(ledger, chain, rids, [5, 5, 2])
        ledger.close()

    async def test_a_batch_closes_when_its_oldest_record_reaches_max_age(
        self, chain: ChainEnv, tmp_path: Path
    ) -> None:
        ledger, rids = stored_ledger(tmp_path / "ledger.sqlite3", 3)
        clock = FakeClock()
        batcher = Batcher(
            ledger, chain.chain, BatcherConfig(max_records=100, max_age_s=5), clock_ms=clock
        )
        await batcher.step()
        clock.advance(4.9)
        await batcher.step()
        assert batches_of(ledger) == [] and await chain.sends() == 0
        clock.advance(0.2)
        await batcher.step()
        await assert_ledger_and_chain_agree(ledger, chain, rids, [3])
        ledger.close()

    async def test_a_batch_built_while_the_chain_is_down_is_anchored_once_after_a_restart(
        self, chain: ChainEnv, tmp_path: Path
    ) -> None:
        path = tmp_path / "ledger.sqlite3"
        ledger, rids = stored_ledger(path, 4)
        config = BatcherConfig(max_records=4, max_age_s=60)
        chain.fail_sends(1)
        with pytest.raises(ChainError):
            await Batcher(ledger, chain.chain, config, clock_ms=FakeClock()).step()
        (built,) = ledger.open_batches()
        assert (built.status, built.count) == ("built", 4)
        assert await chain.chain.find_anchor(bytes.fromhex(built.root[2:])) is None
        assert await chain.sends() == 0
        ledger.close()

        ledger = open_ledger(str(path))  # the restart
        await Batcher(ledger, chain.chain, config, clock_ms=FakeClock()).step()
        assert ledger.batch(built.id).root == built.root
        await assert_ledger_and_chain_agree(ledger, chain, rids, [4])
        ledger.close()

    async def test_a_batch_whose_receipt_was_lost_is_found_again_not_sent_twice(
        self, chain: ChainEnv, tmp_path: Path
    ) -> None:
        path = tmp_path / "ledger.sqlite3"
        ledger, rids = stored_ledger(path, 4)
        config = BatcherConfig(max_records=4, max_age_s=60)
        chain.lose_receipts(1)
        with pytest.raises(ChainError):
            await Batcher(ledger, chain.chain, config, clock_ms=FakeClock()).step()
        (built,) = ledger.open_batches()
        on_chain = await chain.chain.find_anchor(bytes.fromhex(built.root[2:]))
        assert on_chain is not None and await chain.sends() == 1
        ledger.close()

        ledger = open_ledger(str(path))  # the restart
        await Batcher(ledger, chain.chain, config, clock_ms=FakeClock()).step()
        assert ledger.batch(built.id).tx_hash == on_chain.tx_hash
        await assert_ledger_and_chain_agree(ledger, chain, rids, [4])
        ledger.close()

    async def test_run_retries_until_the_chain_is_back(
        self, chain: ChainEnv, tmp_path: Path
    ) -> None:
        ledger, rids = stored_ledger(tmp_path / "ledger.sqlite3", 6)
        chain.fail_sends(2)
        batcher = Batcher(
            ledger,
            chain.chain,
            BatcherConfig(max_records=6, max_age_s=60, tick_s=0.01, retry_backoff_s=0.01),
            clock_ms=FakeClock(),
        )
        running = asyncio.create_task(batcher.run())
        try:
            async with asyncio.timeout(10):
                while batcher.last_anchored is None:
                    await asyncio.sleep(0.01)
        finally:
            batcher.stop()
            await running
        await assert_ledger_and_chain_agree(ledger, chain, rids, [6])
        ledger.close()


class TestBatcher(BatcherContract):
    """Runs every scenario on each backend of the ``chain`` fixture (memory, anvil)."""
