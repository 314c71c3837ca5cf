"""The settlement service's edge to the chain: anchor batch roots on the Settlement contract.

Every write follows the same path, serialised by one nonce lock per client: encode the call,
**simulate it** with ``eth_call`` (a revert is reported before anything is signed or sent),
estimate gas with a safety margin, take the pending nonce, sign locally with the relayer key,
send the raw transaction and wait for its receipt. The lock is held until the receipt arrives,
so every simulation sees the previous anchor: a root anchored a moment ago is rejected as
:class:`DuplicateRoot` by the simulation, not by a reverted (and paid-for) transaction.

Crash recovery: when a batch was sent but its transaction hash never reached the ledger,
:meth:`SettlementChain.find_anchor` finds it again from the contract's storage and event log.

The ABI and bytecode come from ``infra.contracts.load_artifact`` (``Settlement.json``). Web3
and aiohttp exceptions are translated here; no message or ``repr`` ever carries the relayer key.

Exceptions::

    ChainError                  the chain could not be reached, or refused or reverted a call
    ├── DuplicateRoot           the contract already holds this root (treat as "anchored")
    └── TransactionTimeout      sent, but no receipt in time (``tx_hash`` says what to look for)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, Hash32
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError
from web3.types import Nonce, TxParams, TxReceipt

from infra.contracts import load_artifact
from infra.evm import (
    ChainError,
    EvmSettings,
    TransactionTimeout,
    account_from,
    error_selectors,
    revert_reason,
    send_transaction,
    translated,
)

__all__ = [
    "AnchorChain",
    "Anchored",
    "BatchRef",
    "ChainError",
    "ChainSettings",
    "DuplicateRoot",
    "SettlementChain",
    "TransactionTimeout",
]

log = logging.getLogger(__name__)

_UINT64_MAX = 2**64 - 1

BatchRef: TypeAlias = bytes | Callable[[int], bytes]
"""A batch's ``batchRef``: 32 bytes, or a function of the index the contract will give the
batch, returning them. A published batch names its own index and ``batchRef`` is its hash
(``schemas.batches``), so the index must be known before the transaction is signed:
:meth:`SettlementChain.settle_batch` reads it with the nonce it signs with (see there)."""


class ChainSettings(EvmSettings):
    """Where the Settlement contract lives and how to pay for anchoring."""

    contract_address: str | None = None
    relayer_key: SecretStr | None = None


class DuplicateRoot(ChainError):
    """The contract already holds ``root``: callers treat the batch as already anchored."""

    def __init__(self, root: bytes) -> None:
        super().__init__(f"root 0x{root.hex()} is already settled", reason="DuplicateRoot")
        self.root = root


class AnchorChain(Protocol):
    """What the batcher needs of a chain (``SettlementChain`` on a node, ``MemoryChain`` in
    memory for the contract tier)."""

    async def find_anchor(self, root: bytes) -> Anchored | None:
        """The anchoring of ``root`` if the contract holds it, else None."""
        ...

    async def settle_batch(self, root: bytes, count: int, batch_ref: BatchRef) -> Anchored:
        """Anchor ``root``; ``DuplicateRoot`` when it is there already, ``ChainError`` for any
        other refusal. A callable ``batch_ref`` is given the index the batch will get."""
        ...


@dataclass(frozen=True)
class Anchored:
    """A batch root anchored on chain, as its ``BatchSettled`` event says (hex strings are
    ``0x``-prefixed)."""

    root: str
    tx_hash: str
    block_number: int
    gas_used: int
    batch_index: int
    count: int
    batch_ref: str


class SettlementChain:
    """A client of one deployed Settlement contract; build it with :meth:`connect`."""

    def __init__(
        self,
        w3: AsyncWeb3[AsyncHTTPProvider],
        contract: AsyncContract,
        settings: ChainSettings,
        relayer: LocalAccount | None,
    ) -> None:
        self._w3 = w3
        self._contract = contract
        self._settings = settings
        self._relayer = relayer
        self._nonce_lock = asyncio.Lock()
        self._errors = error_selectors(contract.abi)  # type: ignore[arg-type]
        self._settled_topic = keccak(text="BatchSettled(bytes32,uint256,uint64,bytes32)")

    def __repr__(self) -> str:
        relayer = self._relayer.address if self._relayer else None
        return (
            f"SettlementChain(rpc_url={self._settings.rpc_url!r}, "
            f"contract={self._contract.address}, relayer={relayer})"
        )

    @property
    def address(self) -> str:
        """The contract's checksummed address."""
        return str(self._contract.address)

    @property
    def relayer_address(self) -> str | None:
        """The address transactions are signed by, or None for a read-only client."""
        return self._relayer.address if self._relayer else None

    @classmethod
    async def connect(cls, settings: ChainSettings) -> SettlementChain:
        """Connect to ``settings.rpc_url`` and bind the contract at ``settings.contract_address``.

        Checks that the node serves ``settings.chain_id`` and that code exists at the address.
        Without ``relayer_key`` the client is read-only (:meth:`settle_batch` raises).
        """
        if settings.contract_address is None:
            raise ChainError("no contract_address configured (deploy the contract first)")
        relayer = account_from(settings.relayer_key)
        w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        try:
            async with translated(f"connecting to {settings.rpc_url}"):
                address = to_checksum_address(settings.contract_address)
                chain_id = await w3.eth.chain_id
                if chain_id != settings.chain_id:
                    raise ChainError(
                        f"{settings.rpc_url} serves chain {chain_id}, not {settings.chain_id}"
                    )
                if not await w3.eth.get_code(address):
                    raise ChainError(f"no contract at {address} on chain {chain_id}")
        except BaseException:
            await w3.provider.disconnect()
            raise
        contract = w3.eth.contract(address=address, abi=load_artifact()["abi"])
        return cls(w3, contract, settings, relayer)

    @staticmethod
    async def deploy(settings: ChainSettings, relayer_address: str) -> str:
        """Deploy Settlement (paid by ``settings.relayer_key``) for ``relayer_address``.

        Returns the new contract's checksummed address.
        """
        deployer = account_from(settings.relayer_key)
        if deployer is None:
            raise ChainError("deploying needs relayer_key")
        artifact = load_artifact()
        w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        try:
            async with translated("deploying Settlement"):
                args = w3.codec.encode(["address"], [to_checksum_address(relayer_address)])
                data = artifact["bytecode"] + args.hex()
                receipt = await send_transaction(w3, deployer, settings, {"data": data})
                address = receipt["contractAddress"]
                if address is None:
                    raise ChainError("deployment receipt carries no contract address")
                return str(address)
        finally:
            await w3.provider.disconnect()

    async def settle_batch(self, root: bytes, count: int, batch_ref: BatchRef) -> Anchored:
        """Anchor ``root`` (a batch of ``count`` leaves, labelled ``batch_ref``) on chain.

        A callable ``batch_ref`` is given the index the contract will assign. It is exact, not
        a guess: the contract's ``batchCount`` and the relayer's nonce are read at the same
        block, with no relayer transaction pending, and the transaction is signed with that
        nonce. Only the relayer changes ``batchCount``, so if this transaction is mined, every
        relayer transaction before it was mined at that block: it gets that index. (Another
        transaction with the same nonce would replace it, not precede it.)

        Raises :class:`DuplicateRoot` (nothing sent) when the root is already anchored,
        :class:`ChainError` naming the contract's error for any other revert (``RelayerBusy``
        while an earlier relayer transaction is not yet mined: retry later), and
        :class:`TransactionTimeout` when the transaction was sent but not mined in time.
        """
        _check_bytes32("root", root)
        if not callable(batch_ref):
            _check_bytes32("batch_ref", batch_ref)
        if not 0 <= count <= _UINT64_MAX:
            raise ValueError(f"count must fit in uint64, got {count}")
        if self._relayer is None:
            raise ChainError("this client is read-only: no relayer_key configured")
        async with self._nonce_lock, translated("settleBatch"):
            index, nonce = await self._next_slot(self._relayer.address)
            ref = batch_ref(index) if callable(batch_ref) else batch_ref
            _check_bytes32("batch_ref", ref)
            data = self._contract.encode_abi("settleBatch", args=[root, count, ref])
            tx: TxParams = {"to": self._contract.address, "data": data}
            await self._simulate(tx, root)
            tx["nonce"] = Nonce(nonce)
            receipt = await send_transaction(self._w3, self._relayer, self._settings, tx)
        anchored = self._anchored_from(receipt, root)
        if anchored.batch_index != index:
            # Cannot happen with the reads above; if it ever does, the published file names
            # another index than the chain: say so loudly rather than publish it silently.
            raise ChainError(
                f"root 0x{root.hex()} got batch index {anchored.batch_index}, not {index}",
                reason="BatchIndexMismatch",
            )
        log.info(
            "anchored root %s as batch %d in block %d (gas %d, tx %s)",
            anchored.root,
            anchored.batch_index,
            anchored.block_number,
            anchored.gas_used,
            anchored.tx_hash,
        )
        return anchored

    async def find_anchor(self, root: bytes) -> Anchored | None:
        """The anchoring of ``root`` if the contract holds it, else None (crash recovery)."""
        _check_bytes32("root", root)
        async with translated("finding the anchor"):
            count, _settled_at, block_number = await self._contract.functions.batches(root).call()
            if count == 0:
                return None
            logs = await self._w3.eth.get_logs(
                {
                    "address": self._contract.address,
                    "fromBlock": block_number,
                    "toBlock": block_number,
                    "topics": [Hash32(self._settled_topic), Hash32(root)],
                }
            )
            if not logs:
                raise ChainError(f"root 0x{root.hex()} is settled but no BatchSettled log found")
            receipt = await self._w3.eth.get_transaction_receipt(logs[0]["transactionHash"])
        return self._anchored_from(receipt, root)

    async def is_settled(self, root: bytes) -> bool:
        """Whether the contract holds ``root``."""
        _check_bytes32("root", root)
        async with translated("isSettled"):
            return bool(await self._contract.functions.isSettled(root).call())

    async def batch_count(self) -> int:
        """How many roots the contract holds (``batchCount``): ledger and chain must agree."""
        async with translated("batchCount"):
            return int(await self._contract.functions.batchCount().call())

    async def verify_record(
        self, root: bytes, leaf_values: Sequence[bytes], proof: list[bytes]
    ) -> bool:
        """True when ``root`` is anchored and ``proof`` proves the result whose leaf the
        contract computes from ``leaf_values`` (``schemas.merkle.LEAF_TYPES`` order) is in
        its tree: the contract never takes a leaf hash as given (a view)."""
        _check_bytes32("root", root)
        if len(leaf_values) != 5:
            raise ValueError("a leaf has five 32-byte values")
        for value in (*leaf_values, *proof):
            _check_bytes32("leaf value or proof node", value)
        async with translated("verifyRecord"):
            call = self._contract.functions.verifyRecord(root, *leaf_values, proof)
            return bool(await call.call())

    async def close(self) -> None:
        """Close the HTTP session (web3 v8 caches an aiohttp session per provider)."""
        await self._w3.provider.disconnect()

    async def _next_slot(self, relayer: ChecksumAddress) -> tuple[int, int]:
        """(the index the next batch gets, the nonce to send it with), read at one block."""
        block = await self._w3.eth.block_number
        index = await self._contract.functions.batchCount().call(block_identifier=block)
        nonce = await self._w3.eth.get_transaction_count(relayer, block)
        pending = await self._w3.eth.get_transaction_count(relayer, "pending")
        if pending != nonce:
            raise ChainError(
                f"the relayer has {pending - nonce} transaction(s) not yet mined",
                reason="RelayerBusy",
            )
        return int(index), int(nonce)

    async def _simulate(self, tx: TxParams, root: bytes) -> None:
        assert self._relayer is not None
        try:
            await self._w3.eth.call({**tx, "from": self._relayer.address}, "pending")
        except ContractLogicError as e:
            name = self._decode_revert(e)
            if name == "DuplicateRoot":
                raise DuplicateRoot(root) from e
            raise ChainError(
                f"settleBatch would revert: {name or e.message or 'no reason'}", reason=name
            ) from e

    def _decode_revert(self, error: ContractLogicError) -> str | None:
        return revert_reason(error, self._errors)

    def _anchored_from(self, receipt: TxReceipt, root: bytes) -> Anchored:
        for entry in receipt["logs"]:
            topics = entry["topics"]
            if (
                entry["address"] == self._contract.address
                and len(topics) == 3
                and bytes(topics[0]) == self._settled_topic
                and bytes(topics[1]) == root
            ):
                data = bytes(entry["data"])  # abi.encode(uint64 count, bytes32 batchRef)
                return Anchored(
                    root="0x" + root.hex(),
                    tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
                    block_number=receipt["blockNumber"],
                    gas_used=receipt["gasUsed"],
                    batch_index=int.from_bytes(topics[2], "big"),
                    count=int.from_bytes(data[0:32], "big"),
                    batch_ref="0x" + data[32:64].hex(),
                )
        raise ChainError("the settleBatch receipt carries no BatchSettled event for the root")


def _check_bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")
