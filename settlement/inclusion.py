"""Inclusion proofs from the ledger (``inference-node settlement proof ID``) and their one
online check: is the root anchored, and does the contract accept the path
(``inference-node verify --inclusion FILE``). The format and the offline checks are the
protocol's (``schemas.inclusion``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.inclusion import (
    AnchoringTx,
    ChainRef,
    InclusionProof,
    LeafFields,
    check_inclusion_offline,
)
from schemas.merkle import LEAF_TYPES, MerkleTree, leaf_hash, leaf_values
from schemas.results import InferenceResult
from schemas.verify.result import Check
from settlement.chain import ChainError, ChainSettings, SettlementChain
from settlement.ledger.base import Ledger

__all__ = ["build_proofs", "check_inclusion"]


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def build_proofs(ledger: Ledger, request_id: str, chain: ChainSettings) -> list[InclusionProof]:
    """One proof per node that settled ``request_id`` and whose batch is anchored."""
    proofs = []
    for record, batch, _, stored_leaf in ledger.record_batch(request_id):
        if batch is None or batch.status != "anchored" or stored_leaf is None:
            continue
        tree = MerkleTree(
            bytes.fromhex(h.removeprefix("0x")) for h in ledger.batch_leaves(batch.id)
        )
        values = leaf_values(record.envelope)
        leaf = leaf_hash(LEAF_TYPES, values)
        proofs.append(
            InclusionProof(
                request_id=record.request_id,
                node_id=record.node_id,
                leaf=LeafFields(types=list(LEAF_TYPES), values=[_hex(v) for v in values]),
                leaf_hash=_hex(leaf),
                proof=[_hex(p) for p in tree.proof(leaf)],
                root=batch.root,
                batch=AnchoringTx(
                    count=batch.count,
                    tx_hash=batch.tx_hash,
                    block_number=batch.block_number,
                    batch_index=batch.batch_index,
                    gas_used=batch.gas_used,
                ),
                chain=ChainRef(chain_id=chain.chain_id, contract_address=chain.contract_address),
            )
        )
    return proofs


async def check_inclusion(
    data: Any, rpc_url: str, result: InferenceResult | None = None
) -> list[dict[str, Any]]:
    """Every check of a proof file, the contract's included: each ``{name, ok, detail}``."""
    try:
        proof = InclusionProof.model_validate(data)
    except ValidationError as e:
        return [_row(Check("format", False, f"malformed proof file ({e.error_count()} errors)"))]
    checks = check_inclusion_offline(proof, result)
    if proof.chain.contract_address is None:
        return [*map(_row, checks), _row(Check("chain", False, "the proof names no contract"))]
    settings = ChainSettings(
        rpc_url=rpc_url,
        contract_address=proof.chain.contract_address,
        chain_id=proof.chain.chain_id,
    )
    root = bytes.fromhex(proof.root[2:])
    values = [bytes.fromhex(v[2:]) for v in proof.leaf.values]
    path = [bytes.fromhex(p[2:]) for p in proof.proof]
    try:
        chain = await SettlementChain.connect(settings)
        try:
            settled = await chain.is_settled(root)
            included = await chain.verify_record(root, values, path)
        finally:
            await chain.close()
    except ChainError as e:
        checks.append(Check("chain", False, f"cannot query the contract ({e.reason or 'error'})"))
        return [_row(c) for c in checks]
    checks.append(Check("root_settled", settled, "Settlement.isSettled(root)"))
    checks.append(
        Check("on_chain_inclusion", included, "Settlement.verifyRecord(root, leaf fields, proof)")
    )
    return [_row(c) for c in checks]


def _row(check: Check) -> dict[str, Any]:
    return {"name": check.name, "ok": check.ok, "detail": check.detail}
