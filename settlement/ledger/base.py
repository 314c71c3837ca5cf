"""What every ledger backend provides (``Ledger``), the rows it returns, and its errors.

Exceptions::

    LedgerError                     anything the ledger refuses; the caller should not retry as is
    ├── BatchConflictError          a record is missing or already in a batch; nothing was written
    └── BatchNotFoundError          (also a KeyError) no batch with that id

Database driver errors (``sqlite3.Error``, ``psycopg.Error``) pass through unchanged from
``store``: a failed store wrote nothing and the caller decides whether to retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

from schemas.merkle import envelope_leaf
from schemas.proofs import ProofRecord
from schemas.results import ResultEnvelope
from schemas.settlement import SettlementRecord
from schemas.verify.record import Rejected

__all__ = [
    "RECORD_COLUMNS",
    "Accepted",
    "BatchConflictError",
    "BatchMember",
    "BatchNotFoundError",
    "BatchRow",
    "BatchStatus",
    "Leaf",
    "Ledger",
    "LedgerError",
    "Origin",
    "ProofEntry",
    "Rejection",
    "Stored",
    "StoredRecord",
    "batch_row",
    "check_members",
    "record_row",
    "rejection_row",
    "stored_record",
]

BatchStatus: TypeAlias = Literal["built", "anchored"]

RECORD_COLUMNS: tuple[str, ...] = (
    "request_id",
    "node_id",
    "model_id",
    "model_digest",
    "mode",
    "input_hash",
    "output_hash",
    "input_tokens",
    "output_tokens",
    "payer",
    "signed_unix_ms",
    "signature",
    "envelope_json",
    "received_unix_ms",
    "origin",
    "leaf_hash",
    "settlement_mode",
    "booking",
    "chain_signature",
)
"""Columns written by ``store``, in the order of ``record_row``; both backends share them."""

BATCH_COLUMNS: tuple[str, ...] = (
    "id",
    "root",
    "count",
    "status",
    "created_unix_ms",
    "tx_hash",
    "block_number",
    "gas_used",
    "batch_index",
    "anchored_unix_ms",
    "batch_ref",
    "published_unix_ms",
)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a message came from: its topic, partition and offset."""

    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"

    @classmethod
    def parse(cls, text: str) -> Origin:
        topic, partition, offset = text.rsplit("/", 2)
        return cls(topic, int(partition), int(offset))


@dataclass(frozen=True, slots=True)
class Accepted:
    """A verified record as the service hands it to the ledger."""

    record: SettlementRecord
    origin: Origin | None = None
    """None: a record from no message (tools, tests); it is never taken for a replay."""
    leaf_hash: str | None = None
    """``0x`` hex of its Merkle leaf when the caller computed it already (else computed)."""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A rejected message as the service hands it over: why, its bytes (only their hash is
    stored) and where it came from."""

    outcome: Rejected
    raw: bytes | None
    origin: Origin


@dataclass(frozen=True, slots=True)
class BatchMember:
    """One record's place in a batch's tree."""

    request_id: str
    node_id: str
    leaf_index: int
    leaf_hash: str


@dataclass(frozen=True, slots=True)
class Leaf:
    """An unbatched record's key and Merkle leaf (``0x`` hex), as the batcher needs it."""

    request_id: str
    node_id: str
    leaf_hash: str


@dataclass(frozen=True)
class ProofEntry:
    """A proof record signed by its node, as the service hands it to the ledger: ``verified``
    (every check passed; the ledger links it to the result) or ``rejected`` with a reason."""

    record: ProofRecord
    status: Literal["verified", "rejected"]
    reason: str | None = None
    origin: Origin | None = None
    """Where the proof record came from."""


@dataclass(frozen=True, slots=True)
class Stored:
    """What one ``store`` call wrote: records new to the ledger, and the reasons of records it
    refused and booked as rejections: ``replay`` (already stored from another message) and
    ``already_booked`` (another node booked the same request for the same payer)."""

    inserted: int
    refused: tuple[str, ...] = ()

    @property
    def replays(self) -> int:
        return len(self.refused)


class LedgerError(Exception):
    """The ledger refused an operation (as opposed to the database failing)."""


class BatchConflictError(LedgerError):
    """``create_batch`` found a member missing or already batched; the transaction rolled back."""


class BatchNotFoundError(LedgerError, KeyError):
    """No batch has this id."""


@dataclass(frozen=True)
class StoredRecord:
    """A stored, verified record, as the batcher and the proof endpoint need it."""

    request_id: str
    node_id: str
    envelope: ResultEnvelope
    received_unix_ms: int


@dataclass(frozen=True)
class BatchRow:
    """One Merkle batch. ``built``: tree stored, root not yet on chain. ``anchored``: the root is
    on chain in ``tx_hash`` (block, gas, the contract's batch index and the ``batchRef`` it
    records). ``published_unix_ms``: when its published batch (``schemas.batches``) was last
    delivered everywhere it goes; None while it is due. Batches anchored before ledger v6 have
    no ``batch_ref`` (it was the batch id) and are never published."""

    id: int
    root: str
    count: int
    status: BatchStatus
    created_unix_ms: int
    tx_hash: str | None = None
    block_number: int | None = None
    gas_used: int | None = None
    batch_index: int | None = None
    anchored_unix_ms: int | None = None
    batch_ref: str | None = None
    published_unix_ms: int | None = None


class Ledger(Protocol):
    """The settlement ledger. One row per (request id, node id); every method is one transaction
    and safe to call from worker threads (the service uses ``asyncio.to_thread``)."""

    def store(
        self,
        accepted: Sequence[Accepted],
        rejected: Sequence[Rejection] = (),
        proofs: Sequence[ProofEntry] = (),
    ) -> Stored:
        """Store records, rejections and proofs in one transaction; say how many records were
        new and how many were replays.

        A record's origin tells a redelivery of the same message (a no-op) from a *replay*:
        the same (request, node) arriving in another message, which is stored as a ``replay``
        rejection. Rejections of the same origin are stored once. Each record's Merkle leaf is
        stored with it, so batching never re-reads an envelope. ``proofs`` are stored after the
        records (so a proof and its result in one batch link up): see
        ``settlement.ledger.proofs``."""
        ...

    def proofs(self, request_id: str) -> list[dict[str, Any]]:
        """Every proof row of ``request_id`` (one per node), as column → value."""
        ...

    def proof_counts(self) -> dict[str, int]:
        """Proof rows per status (verified, pending, rejected)."""
        ...

    def count(self) -> int: ...

    def rejection_counts(self) -> dict[str, int]: ...

    def get(self, request_id: str) -> list[dict[str, Any]]:
        """Every stored row for ``request_id`` (one per node), as column → value."""
        ...

    def usage(self, payer: str | None = None) -> list[dict[str, Any]]:
        """Per (payer, model_id): requests, input_tokens, output_tokens; one payer or all."""
        ...

    def unbatched(self, limit: int, mode: str = "batch") -> list[Leaf]:
        """Up to ``limit`` records of settlement ``mode`` (``batch`` or ``individual``) not in
        any batch, oldest (first stored) first. ``private`` records are never batched."""
        ...

    def oldest_unbatched_unix_ms(self) -> int | None:
        """When the oldest unbatched ``batch``-mode record was stored (None: all batched)."""
        ...

    def unbatched_count(self) -> int:
        """How many ``batch``-mode records are in no batch yet."""
        ...

    def create_batch(self, root_hex: str, members: Sequence[BatchMember]) -> int:
        """Insert a ``built`` batch and assign exactly ``members`` to it, atomically; raise
        ``BatchConflictError`` (writing nothing) when one is missing, already batched or
        ``private`` (a private record is never batched, whoever asks)."""
        ...

    def open_batches(self) -> list[BatchRow]:
        """Batches built but not yet anchored, oldest first (to resume after a restart)."""
        ...

    def mark_anchored(
        self,
        batch_id: int,
        tx_hash: str,
        block_number: int,
        gas_used: int,
        batch_index: int,
        batch_ref: str | None = None,
    ) -> None:
        """Record the chain transaction holding the batch's root (and the ``batchRef`` its
        event carries). Repeating it with the same ``tx_hash`` is a no-op; another
        ``tx_hash`` for an anchored batch raises."""
        ...

    def batch(self, batch_id: int) -> BatchRow: ...

    def batch_leaves(self, batch_id: int) -> list[str]:
        """The batch's leaf hashes (hex) by leaf index: enough to rebuild its tree."""
        ...

    def batch_envelopes(self, batch_id: int) -> list[tuple[str, ResultEnvelope]]:
        """(leaf hash, stored envelope) of each member by leaf index: the envelopes give the
        leaf values a published batch shows."""
        ...

    def unpublished_batches(self, limit: int = 100) -> list[BatchRow]:
        """Anchored batches (with a ``batch_ref``) whose publication is still due, oldest
        first: a restart republishes them."""
        ...

    def mark_published(self, batch_id: int) -> None:
        """Record that the batch's published batch was delivered (idempotent)."""
        ...

    def record_batch(
        self, request_id: str
    ) -> list[tuple[StoredRecord, BatchRow | None, int | None, str | None]]:
        """For inclusion proofs: each record of ``request_id`` with its batch (None while
        unbatched), leaf index and leaf hash."""
        ...

    def close(self) -> None: ...


def record_row(item: Accepted, now_ms: int) -> tuple[Any, ...]:
    record = item.record
    e = record.envelope
    leaf = item.leaf_hash or "0x" + envelope_leaf(e).hex()
    return (
        e.request_id,
        e.node_id,
        e.model_id,
        e.model_digest,
        e.mode.value,
        e.input_hash,
        e.output_hash,
        e.usage.input_tokens,
        e.usage.output_tokens,
        None if e.payer is None else e.payer.account,
        e.signed_unix_ms,
        record.signature,
        e.model_dump_json(),
        now_ms,
        None if item.origin is None else str(item.origin),
        leaf,
        e.settlement.value,
        1,
        record.chain_signature,
    )


def rejection_row(item: Rejection, now_ms: int) -> tuple[Any, ...]:
    rej, origin = item.outcome, item.origin
    digest = hashlib.sha256(item.raw or b"").hexdigest()
    return (
        rej.reason,
        rej.detail,
        rej.request_id,
        rej.node_id,
        digest,
        origin.topic,
        origin.partition,
        origin.offset,
        now_ms,
    )


def stored_record(
    request_id: str, node_id: str, envelope_json: str, received_unix_ms: int
) -> StoredRecord:
    return StoredRecord(
        request_id=request_id,
        node_id=node_id,
        envelope=ResultEnvelope.model_validate_json(envelope_json),
        received_unix_ms=int(received_unix_ms),
    )


def batch_row(row: Sequence[Any]) -> BatchRow:
    return BatchRow(*row)


def check_members(members: Sequence[BatchMember]) -> None:
    """Refuse an empty batch or one naming a record or leaf index twice (before any write)."""
    if not members:
        raise BatchConflictError("a batch needs at least one member")
    keys = {(m.request_id, m.node_id) for m in members}
    indices = {m.leaf_index for m in members}
    if len(keys) != len(members) or len(indices) != len(members):
        raise BatchConflictError("a batch names a record or a leaf index twice")
