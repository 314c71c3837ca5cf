"""Gas per settled record: ``individual`` against ``batch`` (sizes 1, 10, 100).

Run with ``python -m bench.settlement_gas``; writes ``bench/settlement_gas.json``.

Everything is the real path: anvil started for the run, one freshly deployed Settlement
contract, a SQLite ledger in a temporary directory holding signed v2 records, and the
settlement service's own ``Batcher`` anchoring them (each ``batchRef`` the SHA-256 of the
batch's published document, as in production). Gas is ``gasUsed`` from each anchoring's
receipt, as the ledger records it.

1. One anchoring first, not reported: the first batch of a contract also pays the zero to
   non-zero write of ``batchCount``.
2. ``individual``: 10 records in that mode, each anchored alone (a tree of one leaf) in its
   own transaction: gas per record is the mean ``gasUsed``.
3. ``batch``: for each size, that many records anchored as one batch: gas per record is
   ``gasUsed / size``. ``settleBatch`` costs the same whatever the count (one storage slot,
   one event), so per record it falls as 1/size.

Also reported per row: ``verifyRecord`` gas (``eth_estimateGas`` of the view a consumer
contract would call) for the record whose proof is longest: the cost moves from anchoring to
proving, by one keccak per tree level.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3

from infra.contracts import load_artifact
from infra.dev.anvil import DEV_ACCOUNTS, dev_private_key, running_anvil
from schemas.base import SettlementMode, VerificationMode
from schemas.merkle import LEAF_TYPES, MerkleTree, leaf_hash, leaf_values
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer, envelope_digest
from settlement.batcher import Batcher, BatcherConfig
from settlement.chain import ChainSettings, SettlementChain
from settlement.ledger import Accepted, Ledger, Origin, open_ledger

RESULTS = Path(__file__).with_name("settlement_gas.json")
BATCH_SIZES = (1, 10, 100)
INDIVIDUAL_RECORDS = 10
SIGNER = Signer(b"\x01" * 32)
CHAIN_SIGNER = ChainSigner(hashlib.sha256(b"bench chain key").digest())


def _records(prefix: str, n: int, mode: SettlementMode) -> list[SettlementRecord]:
    now_ms = time.time_ns() // 1_000_000
    records = []
    for i in range(n):
        envelope = ResultEnvelope(
            request_id=f"{prefix}-{i}",
            model_id="demo-mlp",
            model_digest="ab" * 32,
            mode=VerificationMode.VANILLA,
            settlement=mode,
            input_hash=hashlib.sha256(f"{prefix}-{i}/in".encode()).hexdigest(),
            output_hash=hashlib.sha256(f"{prefix}-{i}/out".encode()).hexdigest(),
            usage=Usage(input_tokens=4, output_tokens=1),
            max_output_tokens=None,
            payer=None,
            node_id=SIGNER.node_id,
            signed_unix_ms=now_ms,
            request_created_unix_ms=now_ms - 50,
        )
        digest = envelope_digest(envelope)
        records.append(
            SettlementRecord(
                envelope=envelope,
                signature=SIGNER.sign_digest(digest),
                chain_signature=CHAIN_SIGNER.sign_digest(digest),
            )
        )
    return records


def _store(ledger: Ledger, records: list[SettlementRecord]) -> None:
    prefix = records[0].envelope.request_id
    ledger.store([Accepted(r, Origin(f"bench.{prefix}", 0, i)) for i, r in enumerate(records)])


async def _verify_gas(rpc_url: str, address: str, record: SettlementRecord, tree: Any) -> int:
    """``eth_estimateGas`` of ``verifyRecord`` for ``record`` (a view: what a consumer
    contract pays to check it)."""
    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
    try:
        contract = w3.eth.contract(
            address=w3.to_checksum_address(address), abi=load_artifact()["abi"]
        )
        values = leaf_values(record.envelope)
        leaf = leaf_hash(LEAF_TYPES, values)
        call = contract.functions.verifyRecord(tree.root, *values, tree.proof(leaf))
        assert await call.call(), "the record must verify on chain"
        return int(await call.estimate_gas())
    finally:
        await w3.provider.disconnect()


async def _anchor(
    ledger: Ledger, chain: SettlementChain, records: list[SettlementRecord], max_records: int
) -> None:
    _store(ledger, records)
    batcher = Batcher(ledger, chain, BatcherConfig(max_records=max_records, max_age_s=3600))
    await batcher.step()
    assert ledger.unbatched_count() == 0 and ledger.unbatched(1_000, "individual") == []


def _batches_of(ledger: Ledger, records: list[SettlementRecord]) -> list[Any]:
    rows = {}
    for record in records:
        (entry,) = ledger.record_batch(record.envelope.request_id)
        batch = entry[1]
        assert batch is not None and batch.status == "anchored"
        rows[batch.id] = batch
    return list(rows.values())


async def run(rpc_url: str, chain_id: int, workdir: Path) -> dict[str, Any]:
    settings = ChainSettings(
        rpc_url=rpc_url, chain_id=chain_id, relayer_key=SecretStr(dev_private_key(0))
    )
    address = await SettlementChain.deploy(settings, DEV_ACCOUNTS[0])
    chain = await SettlementChain.connect(settings.model_copy(update={"contract_address": address}))
    ledger = open_ledger(str(workdir / "ledger.sqlite3"))
    rows: list[dict[str, Any]] = []
    try:
        warm_up = _records("warm-up", 1, SettlementMode.INDIVIDUAL)
        await _anchor(ledger, chain, warm_up, 1)
        (first,) = _batches_of(ledger, warm_up)

        individual = _records("individual", INDIVIDUAL_RECORDS, SettlementMode.INDIVIDUAL)
        await _anchor(ledger, chain, individual, 1)
        gases = [b.gas_used for b in _batches_of(ledger, individual)]
        assert len(gases) == INDIVIDUAL_RECORDS, "one transaction per record"
        one = individual[-1]
        rows.append(
            {
                "mode": "individual",
                "records": 1,
                "transactions": len(gases),
                "gas_used": statistics.mean(gases),
                "gas_per_record": statistics.mean(gases),
                "verify_record_gas": await _verify_gas(
                    rpc_url, address, one, MerkleTree([bytes.fromhex(_leaf(ledger, one)[2:])])
                ),
            }
        )
        for size in BATCH_SIZES:
            records = _records(f"batch{size}", size, SettlementMode.BATCH)
            await _anchor(ledger, chain, records, size)
            (batch,) = _batches_of(ledger, records)
            tree = MerkleTree(bytes.fromhex(h[2:]) for h in ledger.batch_leaves(batch.id))
            deepest = max(
                records, key=lambda r: len(tree.proof(bytes.fromhex(_leaf(ledger, r)[2:])))
            )
            rows.append(
                {
                    "mode": "batch",
                    "records": size,
                    "transactions": 1,
                    "gas_used": batch.gas_used,
                    "gas_per_record": batch.gas_used / size,
                    "verify_record_gas": await _verify_gas(rpc_url, address, deepest, tree),
                }
            )
    finally:
        ledger.close()
        await chain.close()
    return {"first_anchoring_gas": first.gas_used, "rows": rows}


def _leaf(ledger: Ledger, record: SettlementRecord) -> str:
    (entry,) = ledger.record_batch(record.envelope.request_id)
    assert entry[3] is not None
    return entry[3]


def _table(results: dict[str, Any]) -> str:
    header = ("mode", "records/tx", "gas/tx", "gas/record", "vs individual", "verifyRecord gas")
    individual = results["rows"][0]["gas_per_record"]
    lines = [
        (
            row["mode"],
            str(row["records"]),
            f"{row['gas_used']:.0f}",
            f"{row['gas_per_record']:.0f}",
            f"{row['gas_per_record'] / individual:.3f}",
            str(row["verify_record_gas"]),
        )
        for row in results["rows"]
    ]
    widths = [max(len(c) for c in column) for column in zip(header, *lines, strict=True)]
    out = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, running_anvil(log_dir=Path(tmp)) as anvil:
        results = asyncio.run(run(anvil.rpc_url, anvil.chain_id, Path(tmp)))
    results["note"] = (
        "anvil, fresh Settlement contract; gas from receipts as the ledger records them; the "
        "first anchoring of a contract (also writing batchCount 0 -> 1) is not a row"
    )
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(_table(results))
    print(f"first anchoring of the contract: {results['first_anchoring_gas']} gas")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
