"""Inclusion proofs: a settled result's Merkle path up to a batch root anchored on chain.

An ``InclusionProof`` is self-contained JSON: the leaf's ABI types and values, the sibling
hashes, the root, the anchoring transaction and the contract. ``check_inclusion_offline`` does
everything a verifier can do without the chain: recompute the leaf from its fields (never trust
a leaf hash as given: an inner node would pass a plain path check), fold the path to the root,
and, given the signed result, recompute the leaf values from its envelope. Whether the root is
anchored is the one online step (``settlement.inclusion.check_inclusion``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from schemas.base import Hex32, RequestId, WireModel
from schemas.merkle import LEAF_TYPES, leaf_hash, leaf_values, verify_proof
from schemas.results import InferenceResult
from schemas.signing import verify_envelope_signature
from schemas.verify.result import Check
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "AnchoringTx",
    "ChainRef",
    "InclusionProof",
    "LeafFields",
    "check_inclusion_offline",
]

Bytes32 = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-f]{64}$")]
"""32 bytes as ``0x`` and 64 lower-case hex characters (the EVM side's spelling)."""
Address = Annotated[str, StringConstraints(pattern=r"^0x[0-9a-fA-F]{40}$")]
MAX_DEPTH = 64


class LeafFields(WireModel):
    types: list[str] = Field(min_length=1, max_length=16)
    values: list[Bytes32] = Field(min_length=1, max_length=16)


class AnchoringTx(WireModel):
    count: int = Field(ge=1)
    tx_hash: Bytes32 | None
    block_number: int | None
    batch_index: int | None
    gas_used: int | None


class ChainRef(WireModel):
    chain_id: int = Field(ge=1)
    contract_address: Address | None


class InclusionProof(WireModel):
    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["inclusion_proof"] = "inclusion_proof"
    request_id: RequestId
    node_id: Hex32
    leaf: LeafFields
    leaf_hash: Bytes32
    proof: list[Bytes32] = Field(max_length=MAX_DEPTH)
    root: Bytes32
    batch: AnchoringTx
    chain: ChainRef


def _bytes(value: str) -> bytes:
    return bytes.fromhex(value.removeprefix("0x"))


def check_inclusion_offline(
    proof: InclusionProof, result: InferenceResult | None = None
) -> list[Check]:
    """The checks that need no chain: the leaf recomputed from its fields, the path to the
    root, and (given the signed result) that the leaf is that result's."""
    values = [_bytes(v) for v in proof.leaf.values]
    leaf = leaf_hash(proof.leaf.types, values)
    checks = [
        Check(
            "leaf_fields",
            tuple(proof.leaf.types) == LEAF_TYPES,
            "the leaf has the protocol's ABI types",
        ),
        Check(
            "leaf_hash",
            leaf == _bytes(proof.leaf_hash),
            "keccak256(keccak256(abi.encode(values)))",
        ),
        Check(
            "merkle_path",
            verify_proof(_bytes(proof.root), leaf, (_bytes(p) for p in proof.proof)),
            "sorted-pair keccak256 from the recomputed leaf up to the root",
        ),
    ]
    if result is not None:
        checks += [
            Check("result_signature", verify_envelope_signature(result.envelope, result.signature)),
            Check(
                "leaf_matches_result",
                list(leaf_values(result.envelope)) == values,
                "leaf values recomputed from the signed envelope",
            ),
        ]
    return checks
