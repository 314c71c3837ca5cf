"""Inclusion proofs: ``inference-node settlement proof ID`` builds one from the ledger, and
``inference-node verify --inclusion FILE`` checks one against the chain.

A proof file is self-contained JSON: the leaf's ABI types and values, the sibling hashes, the
root, the anchoring transaction and the contract. Checking it needs no ledger access: recompute
the leaf (OpenZeppelin standard leaf), fold the proof to the root, and ask the contract whether
that root is settled and the proof verifies (``verifyInclusion``). Given the signed result too,
the leaf values are also recomputed from its envelope.
"""

from __future__ import annotations

from typing import Any

from schemas.results import InferenceResult
from schemas.signing import verify_envelope_signature
from settlement.chain import ChainError, ChainSettings, SettlementChain
from settlement.ledger.base import Ledger
from settlement.merkle import LEAF_TYPES, MerkleTree, leaf_hash, leaf_values, verify_proof

__all__ = ["build_proofs", "check_proof"]


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def build_proofs(ledger: Ledger, request_id: str, chain: ChainSettings) -> list[dict[str, Any]]:
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
            {
                "schema_version": 1,
                "type": "inclusion_proof",
                "request_id": record.request_id,
                "node_id": record.node_id,
                "leaf": {"types": list(LEAF_TYPES), "values": [_hex(v) for v in values]},
                "leaf_hash": _hex(leaf),
                "proof": [_hex(p) for p in tree.proof(leaf)],
                "root": batch.root,
                "batch": {
                    "count": batch.count,
                    "tx_hash": batch.tx_hash,
                    "block_number": batch.block_number,
                    "batch_index": batch.batch_index,
                    "gas_used": batch.gas_used,
                },
                "chain": {"chain_id": chain.chain_id, "contract_address": chain.contract_address},
            }
        )
    return proofs


async def check_proof(
    proof: dict[str, Any], rpc_url: str, result: InferenceResult | None = None
) -> list[dict[str, Any]]:
    """Each check with its outcome; the proof holds only when all are ok."""
    checks: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    try:
        types = [str(t) for t in proof["leaf"]["types"]]
        values = [bytes.fromhex(str(v).removeprefix("0x")) for v in proof["leaf"]["values"]]
        leaf = bytes.fromhex(str(proof["leaf_hash"]).removeprefix("0x"))
        root = bytes.fromhex(str(proof["root"]).removeprefix("0x"))
        siblings = [bytes.fromhex(str(p).removeprefix("0x")) for p in proof["proof"]]
        contract = str(proof["chain"]["contract_address"])
        chain_id = int(proof["chain"]["chain_id"])
    except (KeyError, TypeError, ValueError) as e:
        check("format", False, f"malformed proof file ({type(e).__name__})")
        return checks
    check("leaf_hash", leaf_hash(types, values) == leaf, "keccak256(keccak256(abi.encode(values)))")
    check("merkle_path", verify_proof(root, leaf, siblings), "sorted-pair keccak256 up to the root")
    if result is not None:
        check("result_signature", verify_envelope_signature(result.envelope, result.signature))
        check("leaf_matches_result", list(leaf_values(result.envelope)) == values)
    settings = ChainSettings(rpc_url=rpc_url, contract_address=contract, chain_id=chain_id)
    try:
        chain = await SettlementChain.connect(settings)
        try:
            settled = await chain.is_settled(root)
            included = await chain.verify_inclusion(root, leaf, siblings)
        finally:
            await chain.close()
    except ChainError as e:
        check("chain", False, f"cannot query the contract ({e.reason or type(e).__name__})")
        return checks
    check("root_settled", settled, "Settlement.isSettled(root)")
    check("on_chain_inclusion", included, "Settlement.verifyInclusion(root, leaf, proof)")
    return checks
