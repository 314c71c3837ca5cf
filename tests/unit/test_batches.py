"""Published batches (pure): the document, its canonical bytes and batchRef, the rebuilt tree
and inclusion proof, and what tampering each check catches.

The chain side (batchRef on chain, ``verifyRecord``) and publication by the real service are in
tests/integration/test_published_batches.py and test_settlement_modes.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import rfc8785
from eth_hash.auto import keccak
from pydantic import ValidationError

from schemas.base import SettlementMode
from schemas.batches import (
    MAX_PUBLISHED_LEAVES,
    PublishedBatch,
    batch_bytes,
    batch_key,
    batch_ref,
    check_published_batch,
    find_batch,
    inclusion_from_batch,
    parse_published_batches,
    published_batch,
)
from schemas.inclusion import ChainRef, check_inclusion_offline
from schemas.limits import MAX_MESSAGE_BYTES
from schemas.merkle import LEAF_TYPES, MerkleTree, envelope_leaf, leaf_values
from schemas.results import ResultEnvelope
from schemas.topics import Topics, standard_topics
from settlement.batcher import Batcher, BatcherConfig
from settlement.ledger import (
    Accepted,
    BatchConflictError,
    BatchMember,
    Ledger,
    Origin,
    open_ledger,
)
from settlement.memory_chain import MemoryChain
from settlement.publisher import BatchPublisher, DirectorySink
from tests.harness.nodes import TestNode

NODE = TestNode.seeded(1)
CHAIN = ChainRef(chain_id=31337, contract_address="0x" + "11" * 20)


def envelopes(n: int, prefix: str = "req") -> list[ResultEnvelope]:
    return [NODE.envelope(f"{prefix}-{i}", signed_unix_ms=1_700_000_000_000 + i) for i in range(n)]


def document(n: int, index: int = 7) -> tuple[PublishedBatch, list[ResultEnvelope]]:
    items = envelopes(n)
    return published_batch(index, [leaf_values(e) for e in reversed(items)]), items


def failed(batch: PublishedBatch) -> set[str]:
    return {c.name for c in check_published_batch(batch) if not c.ok}


def test_leaves_are_in_leaf_order_and_make_the_trees_root() -> None:
    batch, items = document(9)
    tree = MerkleTree(envelope_leaf(e) for e in items)
    assert (batch.batch_index, batch.count, batch.root) == (7, 9, "0x" + tree.root.hex())
    in_order = [
        ["0x" + v.hex() for v in leaf_values(e)]
        for e in sorted(items, key=lambda e: envelope_leaf(e))
    ]
    assert batch.leaves == in_order
    assert failed(batch) == set()
    # The input order does not matter: one batch, one document.
    assert published_batch(7, [leaf_values(e) for e in items]) == batch


def test_one_leaf_batch_is_its_own_root() -> None:
    batch, (item,) = document(1)
    assert batch.root == "0x" + envelope_leaf(item).hex()
    proof = inclusion_from_batch(batch, item, CHAIN)
    assert proof is not None and proof.proof == []
    assert all(c.ok for c in check_inclusion_offline(proof))


def test_the_file_is_the_canonical_form_and_batch_ref_its_sha256() -> None:
    batch, _ = document(5)
    data = batch_bytes(batch)
    assert data == rfc8785.dumps(json.loads(data))
    assert batch_ref(batch) == hashlib.sha256(data).digest()
    assert PublishedBatch.model_validate_json(data) == batch
    assert json.loads(data)["type"] == "published_batch"
    assert json.loads(data)["schema_version"] == 2
    # Another index is another file: batchRef commits to the index too.
    assert batch_ref(batch.model_copy(update={"batch_index": 8})) != batch_ref(batch)


def test_request_ids_stay_out_only_their_keccak_is_published() -> None:
    batch, items = document(4)
    data = batch_bytes(batch)
    for item in items:
        assert item.request_id.encode() not in data
        assert ("0x" + keccak(item.request_id.encode()).hex()).encode() in data
    assert set(json.loads(data)) == {
        "schema_version",
        "type",
        "batch_index",
        "root",
        "count",
        "leaves",
    }


def test_inclusion_from_a_batch_proves_every_member() -> None:
    batch, items = document(13)
    for item in items:
        proof = inclusion_from_batch(batch, item, CHAIN)
        assert proof is not None
        assert proof.root == batch.root and proof.batch.batch_index == 7
        assert proof.leaf.types == list(LEAF_TYPES)
        assert proof.request_id == item.request_id and proof.chain == CHAIN
        assert all(c.ok for c in check_inclusion_offline(proof)), item.request_id
    stranger = NODE.envelope("not-in-the-batch")
    assert inclusion_from_batch(batch, stranger, CHAIN) is None


@pytest.mark.parametrize(
    ("tamper", "caught"),
    [
        (lambda b: b.model_copy(update={"count": b.count + 1}), {"batch_count"}),
        (
            lambda b: b.model_copy(update={"leaves": [b.leaves[1], b.leaves[0], *b.leaves[2:]]}),
            {"leaf_order"},
        ),
        (lambda b: b.model_copy(update={"root": "0x" + "00" * 32}), {"batch_root"}),
        (
            lambda b: b.model_copy(update={"leaves": [b.leaves[0], *b.leaves]}),
            {"batch_count", "leaf_order", "batch_root"},
        ),
        (
            lambda b: b.model_copy(
                update={"leaves": [[*b.leaves[0][:4], "0x" + "ee" * 32], *b.leaves[1:]]}
            ),
            {"batch_root"},
        ),
    ],
    ids=["count", "order", "root", "duplicate-leaf", "leaf-value"],
)
def test_tampered_documents_fail_their_own_checks(tamper: object, caught: set[str]) -> None:
    batch, _ = document(6)
    assert callable(tamper)
    forged = tamper(batch)
    assert caught <= failed(forged)
    assert batch_ref(forged) != batch_ref(batch)


def test_a_proof_from_a_document_with_a_forged_root_does_not_fold_to_it() -> None:
    batch, items = document(6)
    forged = batch.model_copy(update={"root": "0x" + "ab" * 32})
    proof = inclusion_from_batch(forged, items[2], CHAIN)
    assert proof is not None
    failing = {c.name for c in check_inclusion_offline(proof) if not c.ok}
    assert failing == {"merkle_path"}


def test_find_batch_picks_the_one_holding_the_leaf() -> None:
    first = published_batch(0, [leaf_values(e) for e in envelopes(3, "a")])
    second_items = envelopes(4, "b")
    second = published_batch(1, [leaf_values(e) for e in second_items])
    assert find_batch([first, second], second_items[3]) == second
    assert find_batch([first], second_items[3]) is None


def test_parse_a_file_a_pretty_file_and_a_topic_dump() -> None:
    first, _ = document(2, index=0)
    second, _ = document(3, index=1)
    assert parse_published_batches(batch_bytes(first)) == ([first], 0)
    pretty = json.dumps(first.model_dump(mode="json"), indent=2).encode()
    assert parse_published_batches(pretty) == ([first], 0)
    dump = b"\n".join([batch_bytes(first), b"not json", batch_bytes(second), b"", b"{}"])
    assert parse_published_batches(dump) == ([first, second], 2)
    assert parse_published_batches(b"") == ([], 0)


def test_the_model_is_strict_what_parses_is_what_was_hashed() -> None:
    batch, _ = document(2)
    raw = json.loads(batch_bytes(batch))
    for field, value in (
        ("batch_index", "7"),
        ("count", 2.0),
        ("root", raw["root"].upper().replace("0X", "0x")),
        ("extra", 1),
    ):
        with pytest.raises(ValidationError):
            PublishedBatch.model_validate_json(json.dumps({**raw, field: value}))
    with pytest.raises(ValidationError):
        PublishedBatch.model_validate_json(json.dumps({**raw, "leaves": [raw["leaves"][0][:4]]}))


def test_the_largest_batch_fits_one_message() -> None:
    values = [
        tuple(keccak(f"{i}-{f}".encode()) for f in range(5)) for i in range(MAX_PUBLISHED_LEAVES)
    ]
    largest = published_batch(2**40, values)
    assert len(batch_bytes(largest)) < MAX_MESSAGE_BYTES
    with pytest.raises(ValidationError):
        PublishedBatch(
            batch_index=0,
            root=largest.root,
            count=MAX_PUBLISHED_LEAVES + 1,
            leaves=[*largest.leaves, largest.leaves[0]],
        )


def test_topic_key_and_spec() -> None:
    assert batch_key(0) == b"0" and batch_key(12345) == b"12345"
    topics = Topics("og")
    assert topics.batches == "og.batches"
    assert topics.is_internal("og.batches"), "a reply must never be directed into it"
    (spec,) = [s for s in standard_topics("og", []) if s.name == "og.batches"]
    assert spec.partitions == 1
    assert spec.config == {"cleanup.policy": "compact", "retention.ms": "-1"}


# -- publication, in memory: the batcher's order of operations -----------------------------


class FlakySink:
    """A sink that fails its first ``failures`` deliveries (a full disk, a broker away)."""

    name = "flaky"

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.delivered: list[bytes] = []

    async def deliver(self, batch: PublishedBatch, data: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("injected")
        self.delivered.append(data)


def stored(tmp_path: Path, modes: list[SettlementMode]) -> tuple[Ledger, list[ResultEnvelope]]:
    ledger = open_ledger(str(tmp_path / "ledger.sqlite3"))
    records = [
        NODE.record(f"pub-{i}", settlement=mode, signed_unix_ms=1_700_000_000_000 + i)
        for i, mode in enumerate(modes)
    ]
    ledger.store([Accepted(r, Origin("t.settlement", 0, i)) for i, r in enumerate(records)])
    return ledger, [r.envelope for r in records]


async def test_a_failed_publication_is_retried_and_a_private_record_never_published(
    tmp_path: Path,
) -> None:
    modes = [SettlementMode.BATCH, SettlementMode.PRIVATE, SettlementMode.INDIVIDUAL]
    ledger, items = stored(tmp_path, [*modes, SettlementMode.BATCH])
    chain = MemoryChain()
    sink = FlakySink(failures=1)
    directory = DirectorySink(tmp_path / "published")
    publisher = BatchPublisher(ledger, [directory, sink])
    batcher = Batcher(
        ledger, chain, BatcherConfig(max_records=2, max_age_s=60), publisher=publisher
    )
    with pytest.raises(OSError, match="injected"):
        await batcher.step()  # the individual record: anchored, then its delivery fails
    (due,) = ledger.unpublished_batches()
    assert (due.count, due.status, due.batch_index) == (1, "anchored", 0)
    await batcher.step()  # publishes what is due first, then anchors the batch of two
    assert ledger.unpublished_batches() == [] and publisher.published == 2
    for ref, data in zip(
        sorted(a.batch_ref for a in chain.batches.values()),
        sorted("0x" + hashlib.sha256(d).hexdigest() for d in sink.delivered),
        strict=True,
    ):
        assert ref == data
    files = sorted((tmp_path / "published").iterdir())
    assert [f.name for f in files] == ["batch-0000000000.json", "batch-0000000001.json"]
    assert sorted(f.read_bytes() for f in files) == sorted(sink.delivered)
    published = [PublishedBatch.model_validate_json(d) for d in sink.delivered]
    private = items[1]
    assert find_batch(published, private) is None
    assert all(find_batch(published, e) is not None for e in (items[0], items[2], items[3]))
    (row,) = ledger.get(private.request_id)
    assert row["batch_id"] is None and row["settlement_mode"] == "private"
    with pytest.raises(BatchConflictError):
        ledger.create_batch(
            "0x" + envelope_leaf(private).hex(),
            [BatchMember(private.request_id, private.node_id, 0, row["leaf_hash"])],
        )
    ledger.close()


async def test_a_batch_anchored_with_a_foreign_batch_ref_is_never_published(
    tmp_path: Path,
) -> None:
    """A batch sent by a version that labelled batches with their id, found again after the
    upgrade: the chain does not commit to its document, so none is published for it."""
    ledger, _ = stored(tmp_path, [SettlementMode.INDIVIDUAL])
    chain = MemoryChain()
    batcher = Batcher(
        ledger,
        chain,
        BatcherConfig(),
        publisher=BatchPublisher(ledger, [sink := FlakySink(failures=0)]),
    )
    (leaf,) = ledger.unbatched(1, "individual")
    batch_id = ledger.create_batch(
        leaf.leaf_hash, [BatchMember(leaf.request_id, leaf.node_id, 0, leaf.leaf_hash)]
    )
    await chain.settle_batch(bytes.fromhex(leaf.leaf_hash[2:]), 1, batch_id.to_bytes(32, "big"))
    await batcher.step()
    row = ledger.batch(batch_id)
    assert (row.status, row.batch_ref, row.published_unix_ms) == ("anchored", None, None)
    assert ledger.unpublished_batches() == [] and sink.delivered == []
    ledger.close()
