"""Inclusion proofs from the ledger (``inference-node settlement proof ID``) and their one
online check: is the root anchored, and does the contract accept the path
(``inference-node verify --inclusion FILE``). The format and the offline checks are the
protocol's (``schemas.inclusion``).

Without the ledger, from a published batch (``inference-node verify REPLY --published-batch
FILE``): ``check_published_inclusion`` rebuilds the tree and the proof from the document
(``schemas.batches``, pure), then asks the contract whether that document is the one it
committed to (its SHA-256 is the ``batchRef`` of the root's ``BatchSettled`` event) and
whether the proof holds (``verifyRecord``)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from schemas.batches import (
    PublishedBatch,
    batch_ref,
    check_published_batch,
    find_batch,
    inclusion_from_batch,
)
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

__all__ = ["build_proofs", "check_inclusion", "check_published_inclusion"]


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
    data: Any, rpc_url: str, result: InferenceResult | None = None, contract: str | None = None
) -> list[dict[str, Any]]:
    """Every check of a proof file, the contract's included: each ``{name, ok, detail}``.

    ``contract`` is the Settlement contract the verifier trusts (its own setting): a proof file
    naming another one proves nothing (anyone can deploy a contract holding any root)."""
    try:
        proof = InclusionProof.model_validate(data)
    except ValidationError as e:
        return [_row(Check("format", False, f"malformed proof file ({e.error_count()} errors)"))]
    checks = check_inclusion_offline(proof, result)
    named = proof.chain.contract_address
    trusted = contract is not None and named is not None and named.lower() == contract.lower()
    detail = "the proof's contract is the one the verifier trusts"
    if contract is None:
        detail = "the verifier names no trusted contract (--contract)"
    checks.append(Check("contract", trusted, detail))
    if not trusted:
        return [_row(c) for c in checks]
    settings = ChainSettings(
        rpc_url=rpc_url,
        contract_address=contract,
        chain_id=proof.chain.chain_id,
    )
    checks += await _on_chain(proof, settings)
    return [_row(c) for c in checks]


async def check_published_inclusion(
    batches: list[PublishedBatch], result: InferenceResult, chain: ChainSettings
) -> list[dict[str, Any]]:
    """Every check that ``result`` is settled in one of ``batches`` (a published file or a
    topic dump), the contract's included: the batch holding its leaf rebuilt (count, leaf
    order, root), the proof derived from it, and on chain the root's ``batchRef`` equal to the
    document's SHA-256, its index and count, and ``verifyRecord``. ``chain`` names the
    contract: the verifier's own trusted setting, never taken from the file."""
    batch = find_batch(batches, result.envelope)
    if batch is None:
        return [_row(Check("in_published_batch", False, "no given batch holds the result's leaf"))]
    checks = [Check("in_published_batch", True, f"batch index {batch.batch_index}")]
    checks += check_published_batch(batch)
    ref = ChainRef(chain_id=chain.chain_id, contract_address=chain.contract_address)
    proof = inclusion_from_batch(batch, result.envelope, ref)
    assert proof is not None  # find_batch found the leaf
    checks += check_inclusion_offline(proof, result)
    checks += await _on_chain(proof, chain, batch)
    return [_row(c) for c in checks]


async def _on_chain(
    proof: InclusionProof, settings: ChainSettings, published: PublishedBatch | None = None
) -> list[Check]:
    """The contract's checks of ``proof`` (and, given the published batch it came from, of
    that batch's anchoring)."""
    root = bytes.fromhex(proof.root[2:])
    values = [bytes.fromhex(v[2:]) for v in proof.leaf.values]
    path = [bytes.fromhex(p[2:]) for p in proof.proof]
    checks = []
    try:
        chain = await SettlementChain.connect(settings)
        try:
            settled = await chain.is_settled(root)
            anchored = await chain.find_anchor(root) if published is not None else None
            included = await chain.verify_record(root, values, path)
        finally:
            await chain.close()
    except ChainError as e:
        return [Check("chain", False, f"cannot query the contract ({e.reason or 'error'})")]
    checks.append(Check("root_settled", settled, "Settlement.isSettled(root)"))
    if published is not None:
        ref = "0x" + batch_ref(published).hex()
        checks += [
            Check(
                "batch_ref",
                anchored is not None and anchored.batch_ref == ref,
                "sha256 of the published batch = batchRef of BatchSettled(root)",
            ),
            Check(
                "batch_index",
                anchored is not None
                and (anchored.batch_index, anchored.count)
                == (published.batch_index, published.count),
                "batch index and count = BatchSettled(root)'s",
            ),
        ]
    checks.append(
        Check("on_chain_inclusion", included, "Settlement.verifyRecord(root, leaf fields, proof)")
    )
    return checks


def _row(check: Check) -> dict[str, Any]:
    return {"name": check.name, "ok": check.ok, "detail": check.detail}
