"""Settlement receipts: everything the ledger knows about one request, in one JSON document
(``inference-node settlement receipt ID``).

A receipt shows, per stored record of the request: the signed envelope and both signatures,
whether the record is a booking (what the payer is billed for), its settlement mode, its status
(``booked``; ``batched``: in a Merkle batch not yet anchored; ``anchored``), the batch (the
contract's index, root, transaction, block, ``batchRef``, and whether it was published) and the
inclusion proof that checks on chain (``inference-node verify --inclusion``).

``private`` records are booked and never batched, so their receipt is the booking alone: no
batch, no proof.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from schemas.base import SettlementMode
from schemas.inclusion import InclusionProof
from schemas.results import ResultEnvelope
from settlement.chain import ChainSettings
from settlement.inclusion import build_proofs
from settlement.ledger.base import BatchRow, Ledger

__all__ = ["Receipt", "ReceiptBatch", "receipts_for"]

ReceiptStatus = Literal["booked", "batched", "anchored"]


class ReceiptBatch(BaseModel):
    """The Merkle batch holding a record (anchoring fields None while it is ``built``)."""

    status: Literal["built", "anchored"]
    root: str
    count: int
    leaf_index: int | None
    batch_index: int | None
    tx_hash: str | None
    block_number: int | None
    gas_used: int | None
    batch_ref: str | None
    """sha256 of the published batch, as ``BatchSettled`` records it (None: not anchored, or
    anchored before batches were published)."""
    published: bool


class Receipt(BaseModel):
    type: Literal["settlement_receipt"] = "settlement_receipt"
    request_id: str
    node_id: str
    settlement_mode: SettlementMode
    status: ReceiptStatus
    booked: bool
    """The record is the request's booking (billed once per request and payer)."""
    received_unix_ms: int
    envelope: ResultEnvelope
    signature: str
    chain_signature: str | None
    """None for records stored before the ledger kept it."""
    batch: ReceiptBatch | None
    inclusion: InclusionProof | None


def _batch(row: BatchRow, leaf_index: int | None) -> ReceiptBatch:
    return ReceiptBatch(
        status=row.status,
        root=row.root,
        count=row.count,
        leaf_index=leaf_index,
        batch_index=row.batch_index,
        tx_hash=row.tx_hash,
        block_number=row.block_number,
        gas_used=row.gas_used,
        batch_ref=row.batch_ref,
        published=row.published_unix_ms is not None,
    )


def receipts_for(ledger: Ledger, request_id: str, chain: ChainSettings) -> list[Receipt]:
    """One receipt per stored record of ``request_id`` (empty: the ledger does not know it).
    ``chain`` names the contract the inclusion proofs point at."""
    rows = {row["node_id"]: row for row in ledger.get(request_id)}
    proofs = {p.node_id: p for p in build_proofs(ledger, request_id, chain)}
    found = []
    for record, batch, leaf_index, _ in ledger.record_batch(request_id):
        row = rows.get(record.node_id)
        if row is None:
            continue  # stored between the two reads: the next call shows it
        mode = SettlementMode(row["settlement_mode"])
        status: ReceiptStatus = "booked"
        if batch is not None:
            status = "anchored" if batch.status == "anchored" else "batched"
        found.append(
            Receipt(
                request_id=record.request_id,
                node_id=record.node_id,
                settlement_mode=mode,
                status=status,
                booked=row["booking"] == 1,
                received_unix_ms=record.received_unix_ms,
                envelope=record.envelope,
                signature=row["signature"],
                chain_signature=row["chain_signature"],
                batch=None if batch is None else _batch(batch, leaf_index),
                inclusion=proofs.get(record.node_id),
            )
        )
    return found
