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

from schemas.results import ResultEnvelope
from schemas.settlement import SettlementRecord
from settlement.ledger.proofs import ProofEntry
from settlement.verify import Rejected

__all__ = [
    "RECORD_COLUMNS",
    "BatchConflictError",
    "BatchMember",
    "BatchNotFoundError",
    "BatchRow",
    "BatchStatus",
    "Ledger",
    "LedgerError",
    "ProofEntry",
    "RejectedInput",
    "StoredRecord",
]

RejectedInput: TypeAlias = tuple[Rejected, bytes | None, str, int, int]
"""A rejection as the service hands it over: (outcome, raw value, topic, partition, offset)."""

BatchMember: TypeAlias = tuple[str, str, int, str]
"""(request_id, node_id, leaf_index, leaf_hash_hex): one record's place in a batch's tree."""

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
)


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
    on chain in ``tx_hash`` (block, gas and the contract's batch index recorded)."""

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


class Ledger(Protocol):
    """The settlement ledger. One row per (request id, node id); every method is one transaction
    and safe to call from worker threads (the service uses ``asyncio.to_thread``)."""

    def store(
        self,
        accepted: Sequence[SettlementRecord],
        rejected: Sequence[RejectedInput],
        origins: Sequence[str] | None = None,
        proofs: Sequence[ProofEntry] = (),
    ) -> int:
        """Store records, rejections and proofs in one transaction; return how many records
        were new.

        ``origins`` (``"topic/partition/offset"`` per accepted record) tells a redelivery of
        the same message (a no-op) from a *replay*: the same (request, node) arriving in
        another message, which is stored as a ``replay`` rejection. Rejections of the same
        topic, partition and offset are stored once. ``proofs`` are stored after the records
        (so a proof and its result in one batch link up): see ``settlement.ledger.proofs``."""
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

    def unbatched(self, limit: int) -> list[StoredRecord]:
        """Up to ``limit`` records not in any batch, oldest (first stored) first."""
        ...

    def oldest_unbatched_unix_ms(self) -> int | None:
        """When the oldest unbatched record was stored, or None when all are batched."""
        ...

    def unbatched_count(self) -> int:
        """How many stored records are in no batch yet."""
        ...

    def create_batch(self, root_hex: str, members: Sequence[BatchMember]) -> int:
        """Insert a ``built`` batch and assign exactly ``members`` to it, atomically; raise
        ``BatchConflictError`` (writing nothing) when one is missing or already batched."""
        ...

    def open_batches(self) -> list[BatchRow]:
        """Batches built but not yet anchored, oldest first (to resume after a restart)."""
        ...

    def mark_anchored(
        self, batch_id: int, tx_hash: str, block_number: int, gas_used: int, batch_index: int
    ) -> None:
        """Record the chain transaction holding the batch's root. Repeating it with the same
        ``tx_hash`` is a no-op; another ``tx_hash`` for an anchored batch raises."""
        ...

    def batch(self, batch_id: int) -> BatchRow: ...

    def batch_leaves(self, batch_id: int) -> list[str]:
        """The batch's leaf hashes (hex) by leaf index: enough to rebuild its tree."""
        ...

    def record_batch(
        self, request_id: str
    ) -> list[tuple[StoredRecord, BatchRow | None, int | None, str | None]]:
        """For inclusion proofs: each record of ``request_id`` with its batch (None while
        unbatched), leaf index and leaf hash."""
        ...

    def close(self) -> None: ...


def record_row(record: SettlementRecord, now_ms: int, origin: str | None = None) -> tuple[Any, ...]:
    e = record.envelope
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
        e.payer,
        e.signed_unix_ms,
        record.signature,
        e.model_dump_json(),
        now_ms,
        origin,
    )


def rejection_row(item: RejectedInput, now_ms: int) -> tuple[Any, ...]:
    rej, raw, topic, partition, offset = item
    digest = hashlib.sha256(raw or b"").hexdigest()
    return (
        rej.reason,
        rej.detail,
        rej.request_id,
        rej.node_id,
        digest,
        topic,
        partition,
        offset,
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
    keys = {(m[0], m[1]) for m in members}
    indices = {m[2] for m in members}
    if len(keys) != len(members) or len(indices) != len(members):
        raise BatchConflictError("a batch names a record or a leaf index twice")
