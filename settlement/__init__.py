"""The settlement service (``settlement.app``) and what a program may call on its ledger:
``receipts_for(ledger, request_id, chain)`` gives everything settled about a request (envelope,
signatures, booking, mode, batch, inclusion proof), as ``inference-node settlement receipt``
prints it."""

from settlement.receipts import Receipt, ReceiptBatch, receipts_for

__all__ = ["Receipt", "ReceiptBatch", "receipts_for"]
