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
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import Hash32
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from pydantic import BaseModel, Field, SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.contract import AsyncContract
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.types import TxParams, TxReceipt, Wei

from infra.contracts import load_artifact

__all__ = [
    "AnchorChain",
    "Anchored",
    "ChainError",
    "ChainSettings",
    "DuplicateRoot",
    "SettlementChain",
    "TransactionTimeout",
]

log = logging.getLogger(__name__)

_UINT64_MAX = 2**64 - 1
_CONFIRMATION_POLL_S = 0.2


class ChainSettings(BaseModel):
    """Where the Settlement contract lives and how to pay for anchoring."""

    rpc_url: str = "http://127.0.0.1:8545"
    contract_address: str | None = None
    relayer_key: SecretStr | None = None
    chain_id: int = 31337
    receipt_timeout_s: float = Field(default=60.0, gt=0)
    confirmations: int = Field(default=0, ge=0)
    gas_limit_multiplier: float = Field(default=1.2, ge=1.0)


class ChainError(Exception):
    """The chain could not be reached, or it refused or reverted a call.

    ``reason`` is the contract's custom error name (``"NotRelayer"``, ``"EmptyBatch"``, ...)
    when the failure was a decoded revert, else None.
    """

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class DuplicateRoot(ChainError):
    """The contract already holds ``root``: callers treat the batch as already anchored."""

    def __init__(self, root: bytes) -> None:
        super().__init__(f"root 0x{root.hex()} is already settled", reason="DuplicateRoot")
        self.root = root


class TransactionTimeout(ChainError):
    """The transaction was sent but not mined (or not confirmed) within the receipt timeout."""

    def __init__(self, message: str, *, tx_hash: str) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash


class AnchorChain(Protocol):
    """What the batcher needs of a chain (``SettlementChain`` on a node, ``MemoryChain`` in
    memory for the contract tier)."""

    async def find_anchor(self, root: bytes) -> Anchored | None:
        """The anchoring of ``root`` if the contract holds it, else None."""
        ...

    async def settle_batch(self, root: bytes, count: int, batch_ref: bytes) -> Anchored:
        """Anchor ``root``; ``DuplicateRoot`` when it is there already, ``ChainError`` for any
        other refusal."""
        ...


@dataclass(frozen=True)
class Anchored:
    """A batch root anchored on chain (hex strings are ``0x``-prefixed)."""

    root: str
    tx_hash: str
    block_number: int
    gas_used: int
    batch_index: int


def _error_selectors(abi: list[dict[str, Any]]) -> dict[bytes, tuple[str, list[str]]]:
    selectors = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item.get("inputs", [])]
            signature = f"{item['name']}({','.join(types)})"
            selectors[keccak(text=signature)[:4]] = (item["name"], types)
    return selectors


def _revert_data(error: ContractLogicError) -> bytes | None:
    data = error.data
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    return None


@asynccontextmanager
async def _translated(action: str) -> AsyncIterator[None]:
    """Turn web3 / transport exceptions into :class:`ChainError` (never quoting a key)."""
    try:
        yield
    except ChainError:
        raise
    except (Web3Exception, aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ChainError(f"{action} failed: {type(e).__name__}: {e}") from e


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
        self._errors = _error_selectors(contract.abi)  # type: ignore[arg-type]
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
        relayer = _account(settings.relayer_key)
        w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        try:
            async with _translated(f"connecting to {settings.rpc_url}"):
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
        deployer = _account(settings.relayer_key)
        if deployer is None:
            raise ChainError("deploying needs relayer_key")
        artifact = load_artifact()
        w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        try:
            async with _translated("deploying Settlement"):
                args = w3.codec.encode(["address"], [to_checksum_address(relayer_address)])
                data = artifact["bytecode"] + args.hex()
                receipt = await _send(w3, deployer, settings, {"data": data})
                address = receipt["contractAddress"]
                if address is None:
                    raise ChainError("deployment receipt carries no contract address")
                return str(address)
        finally:
            await w3.provider.disconnect()

    async def settle_batch(self, root: bytes, count: int, batch_ref: bytes) -> Anchored:
        """Anchor ``root`` (a batch of ``count`` leaves, labelled ``batch_ref``) on chain.

        Raises :class:`DuplicateRoot` (nothing sent) when the root is already anchored,
        :class:`ChainError` naming the contract's error for any other revert, and
        :class:`TransactionTimeout` when the transaction was sent but not mined in time.
        """
        _check_bytes32("root", root)
        _check_bytes32("batch_ref", batch_ref)
        if not 0 <= count <= _UINT64_MAX:
            raise ValueError(f"count must fit in uint64, got {count}")
        if self._relayer is None:
            raise ChainError("this client is read-only: no relayer_key configured")
        data = self._contract.encode_abi("settleBatch", args=[root, count, batch_ref])
        tx: TxParams = {"to": self._contract.address, "data": data}
        async with self._nonce_lock, _translated("settleBatch"):
            await self._simulate(tx, root)
            receipt = await _send(self._w3, self._relayer, self._settings, tx)
        anchored = self._anchored_from(receipt, root)
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
        async with _translated("finding the anchor"):
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
        async with _translated("isSettled"):
            return bool(await self._contract.functions.isSettled(root).call())

    async def batch_count(self) -> int:
        """How many roots the contract holds (``batchCount``): ledger and chain must agree."""
        async with _translated("batchCount"):
            return int(await self._contract.functions.batchCount().call())

    async def verify_inclusion(self, root: bytes, leaf: bytes, proof: list[bytes]) -> bool:
        """True when ``root`` is anchored and ``proof`` proves ``leaf`` in its tree (a view)."""
        _check_bytes32("root", root)
        _check_bytes32("leaf", leaf)
        for node in proof:
            _check_bytes32("proof node", node)
        async with _translated("verifyInclusion"):
            call = self._contract.functions.verifyInclusion(root, leaf, proof)
            return bool(await call.call())

    async def close(self) -> None:
        """Close the HTTP session (web3 v8 caches an aiohttp session per provider)."""
        await self._w3.provider.disconnect()

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
        data = _revert_data(error)
        if data is None or len(data) < 4:
            return None
        known = self._errors.get(data[:4])
        return known[0] if known else None

    def _anchored_from(self, receipt: TxReceipt, root: bytes) -> Anchored:
        for entry in receipt["logs"]:
            topics = entry["topics"]
            if (
                entry["address"] == self._contract.address
                and len(topics) == 3
                and bytes(topics[0]) == self._settled_topic
                and bytes(topics[1]) == root
            ):
                return Anchored(
                    root="0x" + root.hex(),
                    tx_hash="0x" + bytes(receipt["transactionHash"]).hex(),
                    block_number=receipt["blockNumber"],
                    gas_used=receipt["gasUsed"],
                    batch_index=int.from_bytes(topics[2], "big"),
                )
        raise ChainError("the settleBatch receipt carries no BatchSettled event for the root")


def _account(key: SecretStr | None) -> LocalAccount | None:
    if key is None:
        return None
    try:
        account: LocalAccount = Account.from_key(key.get_secret_value())
    except (ValueError, TypeError):
        # ``from None``: the original message may quote the malformed key.
        raise ChainError("relayer_key is not a valid private key") from None
    return account


def _check_bytes32(name: str, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes")


async def _send(
    w3: AsyncWeb3[AsyncHTTPProvider],
    account: LocalAccount,
    settings: ChainSettings,
    tx: TxParams,
) -> TxReceipt:
    """Estimate, sign and send ``tx`` from ``account``; wait for its receipt (status 1).

    Callers serialise calls per account: the nonce is the account's pending count.
    """
    tx = {**tx, "from": account.address, "chainId": settings.chain_id, "value": Wei(0)}
    estimate = await w3.eth.estimate_gas(tx, "pending")
    tip = await w3.eth.max_priority_fee
    latest = await w3.eth.get_block("latest")
    base_fee = latest.get("baseFeePerGas", 0)
    tx["gas"] = int(estimate * settings.gas_limit_multiplier)
    tx["maxPriorityFeePerGas"] = tip
    tx["maxFeePerGas"] = Wei(2 * base_fee + tip)
    tx["nonce"] = await w3.eth.get_transaction_count(account.address, "pending")
    signed = account.sign_transaction(tx)  # type: ignore[arg-type]
    tx_hash = "0x" + bytes(signed.hash).hex()
    await w3.eth.send_raw_transaction(signed.raw_transaction)
    try:
        receipt = await w3.eth.wait_for_transaction_receipt(
            signed.hash, timeout=settings.receipt_timeout_s
        )
        await _await_confirmations(w3, receipt["blockNumber"], settings)
    except (TimeExhausted, TimeoutError) as e:
        raise TransactionTimeout(
            f"transaction {tx_hash} not mined/confirmed within {settings.receipt_timeout_s} s",
            tx_hash=tx_hash,
        ) from e
    if receipt["status"] != 1:
        raise ChainError(f"transaction {tx_hash} reverted on chain (status 0)")
    return receipt


async def _await_confirmations(
    w3: AsyncWeb3[AsyncHTTPProvider], block_number: int, settings: ChainSettings
) -> None:
    if settings.confirmations == 0:
        return
    deadline = time.monotonic() + settings.receipt_timeout_s
    while await w3.eth.block_number < block_number + settings.confirmations:
        if time.monotonic() >= deadline:
            raise TimeoutError
        await asyncio.sleep(_CONFIRMATION_POLL_S)
