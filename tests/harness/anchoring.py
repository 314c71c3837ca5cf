"""Settlement with anchoring on a real chain, for the settlement-mode and published-batch
tests: a fresh Settlement contract on anvil, the service's settings to anchor on it (and
publish to a directory), the service run in-process as the CLI runs it, and readers of what a
third party sees (the ``<ns>.batches`` topic, the contract's ``BatchSettled`` events) that use
web3 and aiokafka directly, not our settlement code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from eth_utils.crypto import keccak
from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3

from infra.dev.anvil import DEV_ACCOUNTS, AnvilProcess, dev_private_key
from schemas.base import SettlementMode
from schemas.results import InferenceResult, MLOutput, Tensor, output_hash
from settlement.app import SettlementService
from settlement.chain import ChainSettings, SettlementChain
from settlement.settings import SettlementSettings
from tests.harness.nodes import TestNode
from tests.harness.support import read_topic

__all__ = [
    "anchoring",
    "batch_settled_events",
    "chain_settings",
    "deploy_settlement",
    "published_on_topic",
    "reply_of",
    "running_service",
]

SETTLED_TOPIC = keccak(text="BatchSettled(bytes32,uint256,uint64,bytes32)")


def chain_settings(anvil: AnvilProcess, contract: str | None = None) -> ChainSettings:
    """Dev account 0 as relayer (and deployer)."""
    return ChainSettings(
        rpc_url=anvil.rpc_url,
        chain_id=anvil.chain_id,
        contract_address=contract,
        relayer_key=SecretStr(dev_private_key(0)),
        receipt_timeout_s=10,
    )


async def deploy_settlement(anvil: AnvilProcess) -> str:
    """A fresh Settlement contract (batch indices from 0) whose relayer is dev account 0."""
    return await SettlementChain.deploy(chain_settings(anvil), DEV_ACCOUNTS[0])


def anchoring(
    settings: SettlementSettings,
    anvil: AnvilProcess,
    contract: str,
    publish_dir: Path | None,
    **overrides: Any,
) -> SettlementSettings:
    """``settings`` anchoring on ``contract`` (batches close at 3 records or after 60 s by
    default: a test's batch closes by size, never by a slow machine's clock)."""
    return settings.model_copy(
        update={
            "anchor": True,
            "chain": chain_settings(anvil, contract),
            "publish_dir": publish_dir,
            "merkle_batch_max_records": 3,
            "merkle_batch_max_age_s": 60.0,
            **overrides,
        }
    )


@contextlib.asynccontextmanager
async def running_service(settings: SettlementSettings) -> AsyncIterator[SettlementService]:
    """The service set up and running as ``inference-node settlement`` runs it."""
    service = SettlementService(settings)
    await service.setup()
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        service.stop()
        try:
            async with asyncio.timeout(30):
                await task
        finally:
            await service.close()


async def published_on_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes]]:
    """(key, value) of every message on ``topic``, read as any Kafka client would."""
    return [(m.key, m.value) for m in await read_topic(bootstrap, topic, idle_s=0.5)]


async def batch_settled_events(rpc_url: str, contract: str) -> dict[str, dict[str, Any]]:
    """Root (``0x`` hex) → ``{"batch_index", "count", "batch_ref", "tx_hash"}`` of every
    ``BatchSettled`` event of ``contract``, decoded by hand from the log."""
    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
    try:
        logs = await w3.eth.get_logs(
            {
                "address": w3.to_checksum_address(contract),
                "fromBlock": 0,
                "toBlock": "latest",
                "topics": [SETTLED_TOPIC],  # type: ignore[list-item]
            }
        )
    finally:
        await w3.provider.disconnect()
    events = {}
    for log in logs:
        data = bytes(log["data"])
        events["0x" + bytes(log["topics"][1]).hex()] = {
            "batch_index": int.from_bytes(log["topics"][2], "big"),
            "count": int.from_bytes(data[:32], "big"),
            "batch_ref": "0x" + data[32:64].hex(),
            "tx_hash": "0x" + bytes(log["transactionHash"]).hex(),
        }
    return events


def reply_of(
    node: TestNode, request_id: str, settlement: SettlementMode = SettlementMode.BATCH
) -> InferenceResult:
    """A reply ``node`` signs for ``request_id`` as a worker does (its settlement record is
    ``node.sign(reply.envelope)``)."""
    output = MLOutput(
        tensors={"y": Tensor(dtype="float32", shape=[1], data=[float(len(request_id))])}
    )
    envelope = node.envelope(request_id, output_hash=output_hash(output), settlement=settlement)
    record = node.sign(envelope)
    return InferenceResult(
        request_id=request_id,
        envelope=envelope,
        signature=record.signature,
        chain_signature=record.chain_signature,
        output=output,
    )
