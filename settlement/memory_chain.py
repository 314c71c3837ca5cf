"""The batcher's chain port in memory: the Settlement contract's anchoring rules, no EVM.

It ships beside ``settlement.chain.SettlementChain`` (as the in-memory Kafka ships beside the
aiokafka adapter) so the contract tier runs batching and resumed anchoring in milliseconds,
then the same scenarios on anvil. It keeps the contract's rules: a root is anchored at most
once (``DuplicateRoot``), an empty batch is refused, batch indices count up from 0.

Test hooks: ``fail_sends(n)`` makes the next ``n`` anchorings raise ``ChainError`` (the chain
is down); ``lose_receipts(n)`` makes the next ``n`` anchorings land on chain but raise, as a
relayer crashing after sending would see it (the batcher must then find them again).
"""

from __future__ import annotations

import hashlib

from settlement.chain import AnchorChain, Anchored, BatchRef, ChainError, DuplicateRoot

__all__ = ["MemoryChain"]

_BASE_GAS = 45_000


class MemoryChain(AnchorChain):
    def __init__(self) -> None:
        self.batches: dict[bytes, Anchored] = {}
        self.sends = 0
        """Anchoring transactions that reached the chain."""
        self._fail = 0
        self._lose = 0

    def fail_sends(self, count: int) -> None:
        self._fail = count

    def lose_receipts(self, count: int) -> None:
        self._lose = count

    async def find_anchor(self, root: bytes) -> Anchored | None:
        return self.batches.get(root)

    async def settle_batch(self, root: bytes, count: int, batch_ref: BatchRef) -> Anchored:
        index = len(self.batches)
        ref = batch_ref(index) if callable(batch_ref) else batch_ref
        if len(root) != 32 or len(ref) != 32:
            raise ValueError("root and batch_ref must be 32 bytes")
        if self._fail > 0:
            self._fail -= 1
            raise ChainError("the chain is unreachable (injected)")
        if count == 0:
            raise ChainError("settleBatch would revert: EmptyBatch", reason="EmptyBatch")
        if root in self.batches:
            raise DuplicateRoot(root)
        tx = hashlib.sha256(b"memory-chain" + root + ref).digest()
        anchored = Anchored(
            root="0x" + root.hex(),
            tx_hash="0x" + tx.hex(),
            block_number=index + 1,
            gas_used=_BASE_GAS,
            batch_index=index,
            count=count,
            batch_ref="0x" + ref.hex(),
        )
        self.batches[root] = anchored
        self.sends += 1
        if self._lose > 0:
            self._lose -= 1
            raise ChainError("sent, but the receipt was lost (injected)")
        return anchored
