"""Chain environments for the batcher's contract scenarios: ``MemoryChain`` or anvil.

Both give the batcher an ``AnchorChain`` with the same two faults: ``fail_sends(n)`` (the next
``n`` anchorings fail before anything is sent: the chain is down) and ``lose_receipts(n)``
(the next ``n`` land on chain, but the caller sees an error: a relayer that died after sending).
``MemoryChain`` has both as test hooks; on anvil ``FaultyChain`` wraps the real client.
``sends()`` counts the anchoring transactions that reached the chain (anvil: the relayer's
nonce since the contract was deployed), so "anchored exactly once" is checked, not assumed.
"""

from __future__ import annotations

from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3

from infra.dev.anvil import DEV_ACCOUNTS, AnvilProcess, dev_private_key
from settlement.chain import AnchorChain, Anchored, ChainError, ChainSettings, SettlementChain
from settlement.memory_chain import MemoryChain

__all__ = ["AnvilChainEnv", "ChainEnv", "FaultyChain", "MemoryChainEnv"]


class ChainEnv:
    name: str
    chain: AnchorChain

    def fail_sends(self, count: int) -> None:
        raise NotImplementedError

    def lose_receipts(self, count: int) -> None:
        raise NotImplementedError

    async def sends(self) -> int:
        raise NotImplementedError

    async def close(self) -> None:
        return None


class MemoryChainEnv(ChainEnv):
    def __init__(self) -> None:
        self.name = "memory"
        self.memory = MemoryChain()
        self.chain = self.memory

    def fail_sends(self, count: int) -> None:
        self.memory.fail_sends(count)

    def lose_receipts(self, count: int) -> None:
        self.memory.lose_receipts(count)

    async def sends(self) -> int:
        return self.memory.sends


class FaultyChain(AnchorChain):
    """A real chain client with ``MemoryChain``'s two faults injected in front of it."""

    def __init__(self, inner: AnchorChain) -> None:
        self.inner = inner
        self._fail = 0
        self._lose = 0

    def fail_sends(self, count: int) -> None:
        self._fail = count

    def lose_receipts(self, count: int) -> None:
        self._lose = count

    async def find_anchor(self, root: bytes) -> Anchored | None:
        return await self.inner.find_anchor(root)

    async def settle_batch(self, root: bytes, count: int, batch_ref: bytes) -> Anchored:
        if self._fail > 0:
            self._fail -= 1
            raise ChainError("the chain is unreachable (injected)")
        anchored = await self.inner.settle_batch(root, count, batch_ref)
        if self._lose > 0:
            self._lose -= 1
            raise ChainError("sent, but the receipt was lost (injected)")
        return anchored


class AnvilChainEnv(ChainEnv):
    def __init__(self, client: SettlementChain, w3: AsyncWeb3[AsyncHTTPProvider]) -> None:
        self.name = "anvil"
        self.client = client
        self.faulty = FaultyChain(client)
        self.chain = self.faulty
        self._w3 = w3
        self._nonce_at_start = 0

    @classmethod
    async def deploy(cls, anvil: AnvilProcess) -> AnvilChainEnv:
        """A fresh Settlement contract whose relayer is dev account 0."""
        settings = ChainSettings(
            rpc_url=anvil.rpc_url,
            relayer_key=SecretStr(dev_private_key(0)),
            chain_id=anvil.chain_id,
            receipt_timeout_s=10,
        )
        address = await SettlementChain.deploy(settings, DEV_ACCOUNTS[0])
        client = await SettlementChain.connect(
            settings.model_copy(update={"contract_address": address})
        )
        env = cls(client, AsyncWeb3(AsyncHTTPProvider(anvil.rpc_url)))
        env._nonce_at_start = await env._nonce()
        return env

    async def _nonce(self) -> int:
        return int(await self._w3.eth.get_transaction_count(DEV_ACCOUNTS[0], "latest"))

    def fail_sends(self, count: int) -> None:
        self.faulty.fail_sends(count)

    def lose_receipts(self, count: int) -> None:
        self.faulty.lose_receipts(count)

    async def sends(self) -> int:
        return await self._nonce() - self._nonce_at_start

    async def close(self) -> None:
        await self.client.close()
        await self._w3.provider.disconnect()
