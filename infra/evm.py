"""EVM plumbing shared by the services' chain clients (settlement anchoring, the node
registry): one way to send a transaction, one translation of web3's exceptions.

Every write goes the same way: encode the call, **simulate** it with ``eth_call`` (a revert is
reported before anything is signed), estimate gas with a margin, take the pending nonce, sign
locally, send the raw transaction and wait for its receipt (and confirmations). Callers
serialise writes per account (a nonce lock). No message or ``repr`` ever carries a key.

Exceptions::

    ChainError                  the chain could not be reached, or refused or reverted a call
    └── TransactionTimeout      sent, but no receipt in time (``tx_hash`` says what to look for)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from pydantic import BaseModel, Field, SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.exceptions import ContractLogicError, TimeExhausted, Web3Exception
from web3.types import TxParams, TxReceipt, Wei

__all__ = [
    "ChainError",
    "EvmSettings",
    "TransactionTimeout",
    "account_from",
    "error_selectors",
    "revert_data",
    "revert_reason",
    "send_transaction",
    "translated",
]

_CONFIRMATION_POLL_S = 0.2


class EvmSettings(BaseModel):
    """How to reach a chain and wait for transactions."""

    rpc_url: str = "http://127.0.0.1:8545"
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


class TransactionTimeout(ChainError):
    """The transaction was sent but not mined (or not confirmed) within the receipt timeout."""

    def __init__(self, message: str, *, tx_hash: str) -> None:
        super().__init__(message)
        self.tx_hash = tx_hash


def error_selectors(abi: list[dict[str, Any]]) -> dict[bytes, tuple[str, list[str]]]:
    selectors = {}
    for item in abi:
        if item.get("type") == "error":
            types = [i["type"] for i in item.get("inputs", [])]
            signature = f"{item['name']}({','.join(types)})"
            selectors[keccak(text=signature)[:4]] = (item["name"], types)
    return selectors


def revert_data(error: ContractLogicError) -> bytes | None:
    data = error.data
    if isinstance(data, dict):
        data = data.get("data")
    if isinstance(data, str) and data.startswith("0x"):
        try:
            return bytes.fromhex(data[2:])
        except ValueError:
            return None
    return None


def revert_reason(
    error: ContractLogicError, selectors: dict[bytes, tuple[str, list[str]]]
) -> str | None:
    """The custom error's name (from a contract's ``error_selectors``), or None."""
    data = revert_data(error)
    if data is None or len(data) < 4:
        return None
    known = selectors.get(data[:4])
    return known[0] if known else None


@asynccontextmanager
async def translated(
    action: str, selectors: dict[bytes, tuple[str, list[str]]] | None = None
) -> AsyncIterator[None]:
    """Turn web3 / transport exceptions into :class:`ChainError` (never quoting a key); a
    revert with a custom error of ``selectors`` carries its name as ``reason``."""
    try:
        yield
    except ChainError:
        raise
    except ContractLogicError as e:
        reason = revert_reason(e, selectors or {})
        raise ChainError(f"{action} reverted: {reason or 'no reason'}", reason=reason) from e
    except (Web3Exception, aiohttp.ClientError, OSError, TimeoutError) as e:
        raise ChainError(f"{action} failed: {type(e).__name__}: {e}") from e


def account_from(key: SecretStr | None, what: str = "relayer_key") -> LocalAccount | None:
    if key is None:
        return None
    try:
        account: LocalAccount = Account.from_key(key.get_secret_value())
    except (ValueError, TypeError):
        # ``from None``: the original message may quote the malformed key.
        raise ChainError(f"{what} is not a valid private key") from None
    return account


async def send_transaction(
    w3: AsyncWeb3[AsyncHTTPProvider],
    account: LocalAccount,
    settings: EvmSettings,
    tx: TxParams,
) -> TxReceipt:
    """Estimate, sign and send ``tx`` from ``account``; wait for its receipt (status 1).

    Callers serialise calls per account: the nonce is the account's pending count, unless
    ``tx`` names one (a caller that must know it before signing, such as settlement's).
    """
    tx = {**tx, "from": account.address, "chainId": settings.chain_id, "value": Wei(0)}
    estimate = await w3.eth.estimate_gas(tx, "pending")
    tip = await w3.eth.max_priority_fee
    latest = await w3.eth.get_block("latest")
    base_fee = latest.get("baseFeePerGas", 0)
    tx["gas"] = int(estimate * settings.gas_limit_multiplier)
    tx["maxPriorityFeePerGas"] = tip
    tx["maxFeePerGas"] = Wei(2 * base_fee + tip)
    if "nonce" not in tx:
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
    w3: AsyncWeb3[AsyncHTTPProvider], block_number: int, settings: EvmSettings
) -> None:
    if settings.confirmations == 0:
        return
    deadline = time.monotonic() + settings.receipt_timeout_s
    while await w3.eth.block_number < block_number + settings.confirmations:
        if time.monotonic() >= deadline:
            raise TimeoutError
        await asyncio.sleep(_CONFIRMATION_POLL_S)
