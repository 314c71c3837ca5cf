"""Merkle tree (pure): proofs verify, forgeries do not, the root ignores input order.

Compatibility with the npm library itself is checked in tests/integration/test_merkle_oz.py.
"""

from __future__ import annotations

import random

import pytest
from eth_abi.abi import encode
from eth_hash.auto import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.merkle import (
    LEAF_TYPES,
    MerkleTree,
    envelope_leaf,
    hash_pair,
    leaf_hash,
    leaf_values,
    verify_proof,
)
from schemas.results import ResultEnvelope, Usage
from schemas.signing import envelope_digest

leaf_sets = st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=64, unique=True)


@settings(max_examples=60, deadline=None)
@given(leaf_sets)
def test_every_proof_verifies(leaves: list[bytes]) -> None:
    tree = MerkleTree(leaves)
    assert sorted(tree.leaves) == sorted(leaves)
    for leaf in leaves:
        assert verify_proof(tree.root, leaf, tree.proof(leaf))
        assert tree.leaves[tree.index_of(leaf)] == leaf


@settings(max_examples=60, deadline=None)
@given(leaf_sets, st.binary(min_size=32, max_size=32))
def test_leaf_not_in_tree_fails(leaves: list[bytes], outsider: bytes) -> None:
    if outsider in leaves:
        return
    tree = MerkleTree(leaves)
    with pytest.raises(KeyError):
        tree.proof(outsider)
    for leaf in leaves:
        assert not verify_proof(tree.root, outsider, tree.proof(leaf))


@settings(max_examples=60, deadline=None)
@given(leaf_sets.filter(lambda xs: len(xs) > 1), st.data())
def test_tampered_proof_fails(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    leaf = data.draw(st.sampled_from(leaves))
    proof = tree.proof(leaf)
    position = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    tampered = list(proof)
    element = bytearray(tampered[position])
    element[bit // 8] ^= 1 << (bit % 8)
    tampered[position] = bytes(element)
    assert not verify_proof(tree.root, leaf, tampered)
    assert not verify_proof(tree.root, leaf, proof[:-1])


@settings(max_examples=60, deadline=None)
@given(leaf_sets, st.randoms(use_true_random=False))
def test_root_does_not_depend_on_input_order(leaves: list[bytes], rng: random.Random) -> None:
    shuffled = list(leaves)
    rng.shuffle(shuffled)
    assert MerkleTree(shuffled).root == MerkleTree(leaves).root
    assert MerkleTree(shuffled).leaves == MerkleTree(leaves).leaves


def test_single_leaf_is_the_root_with_empty_proof() -> None:
    leaf = keccak(b"only")
    tree = MerkleTree([leaf])
    assert tree.root == leaf
    assert tree.proof(leaf) == []
    assert verify_proof(leaf, leaf, [])


def test_empty_tree_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one leaf"):
        MerkleTree([])


def test_leaf_of_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        MerkleTree([b"\x00" * 31])


def test_three_leaf_layout_matches_openzeppelin_array() -> None:
    # tree = [root, h(l2, l1), l0... ] reversed: tree[4]=l0, tree[3]=l1, tree[2]=l2,
    # tree[1]=hash(tree[3], tree[4]), tree[0]=hash(tree[1], tree[2]).
    l0, l1, l2 = sorted(keccak(bytes([i])) for i in range(3))
    tree = MerkleTree([l2, l0, l1])
    inner = hash_pair(l1, l0)
    assert tree.root == hash_pair(inner, l2)
    assert tree.proof(l0) == [l1, l2]
    assert tree.proof(l2) == [inner]
    assert tree.proof_at(1) == [l0, l2]


def test_leaf_hash_is_double_keccak_of_abi_encoding() -> None:
    values = tuple(bytes([i]) * 32 for i in range(5))
    assert leaf_hash(LEAF_TYPES, values) == keccak(keccak(b"".join(values)))
    assert leaf_hash(LEAF_TYPES, values) == keccak(keccak(encode(list(LEAF_TYPES), values)))


def test_envelope_leaf_values() -> None:
    envelope = ResultEnvelope(
        request_id="req-m-1",
        model_id="demo-mlp",
        model_digest="a" * 64,
        mode="VANILLA",  # type: ignore[arg-type]
        input_hash="b" * 64,
        output_hash="c" * 64,
        usage=Usage(input_tokens=1, output_tokens=2),
        node_id="d" * 64,
        signed_unix_ms=1_700_000_000_000,
        settlement="batch",  # type: ignore[arg-type]
        request_created_unix_ms=1_699_999_999_000,
        max_output_tokens=None,
        payer=None,
    )
    values = leaf_values(envelope)
    assert values == (
        keccak(b"req-m-1"),
        bytes.fromhex("d" * 64),
        bytes.fromhex("b" * 64),
        bytes.fromhex("c" * 64),
        envelope_digest(envelope),
    )
    assert envelope_leaf(envelope) == leaf_hash(LEAF_TYPES, values)
