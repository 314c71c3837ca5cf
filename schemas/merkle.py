"""Merkle trees over settled results, byte-for-byte compatible with OpenZeppelin.

The tree is the one ``StandardMerkleTree.of(values, LEAF_TYPES)`` from ``@openzeppelin/merkle-tree``
builds with its default ``sortLeaves: true``, and its proofs verify with OpenZeppelin's
``MerkleProof.verify`` on chain. Matching the npm library exactly means a client can rebuild or
check any batch with off-the-shelf tooling, and the contract needs no custom verifier.

- Leaf: ``keccak256(keccak256(abi.encode(types, values)))``. The double hash makes a leaf (64
  bytes hashed twice) impossible to confuse with an inner node (64 bytes hashed once), which
  blocks second-preimage attacks; it is OpenZeppelin's "standard" leaf.
- Inner node: ``keccak256(min(a, b) || max(a, b))``. Sorted pairs make proofs position-free: a
  proof is a plain list of siblings, with no left/right flags, as ``MerkleProof.verify`` expects.
- Layout: leaves sorted ascending by hash (so the root does not depend on the order records
  were read), placed at the end of one array ``tree[len - 1 - i] = leaf_i``, parents at
  ``(i - 1) // 2``. It is a complete binary tree, so an odd node count needs no padding rule.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from eth_abi.abi import encode
from eth_hash.auto import keccak

from schemas.results import ResultEnvelope
from schemas.signing import envelope_digest

__all__ = [
    "LEAF_TYPES",
    "MerkleTree",
    "envelope_leaf",
    "hash_pair",
    "leaf_hash",
    "leaf_values",
    "verify_proof",
]

LEAF_TYPES: Final[tuple[str, ...]] = ("bytes32", "bytes32", "bytes32", "bytes32", "bytes32")
"""ABI types of a leaf: ``(request_key, node_id, input_hash, output_hash, envelope_digest)``.

All fixed 32-byte words, so ``abi.encode`` is a plain concatenation a contract can rebuild
cheaply; the variable-length request id enters as its keccak256 (``request_key``)."""


def leaf_values(envelope: ResultEnvelope, digest: bytes | None = None) -> tuple[bytes, ...]:
    """The values of ``envelope``'s leaf, in ``LEAF_TYPES`` order.

    ``envelope_digest`` is the message the node signed, so the leaf commits to every signed field
    (model, mode, usage, payer, time) and not only to the four shown in clear."""
    return (
        keccak(envelope.request_id.encode("utf-8")),
        bytes.fromhex(envelope.node_id),
        bytes.fromhex(envelope.input_hash),
        bytes.fromhex(envelope.output_hash),
        envelope_digest(envelope) if digest is None else digest,
    )


def leaf_hash(types: Sequence[str], values: Sequence[object]) -> bytes:
    """OpenZeppelin's standard leaf: ``keccak256(keccak256(abi.encode(types, values)))``."""
    return keccak(keccak(encode(list(types), list(values))))


def envelope_leaf(envelope: ResultEnvelope, digest: bytes | None = None) -> bytes:
    """The leaf hash of one settled result: ``leaf_hash(LEAF_TYPES, leaf_values(envelope))``.
    ``digest`` is its ``envelope_digest`` when the caller has it already."""
    return leaf_hash(LEAF_TYPES, leaf_values(envelope, digest))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """Inner node: keccak256 of the two children in ascending byte order (commutative)."""
    return keccak(a + b) if a <= b else keccak(b + a)


def verify_proof(root: bytes, leaf: bytes, proof: Iterable[bytes]) -> bool:
    """True when ``proof`` links ``leaf`` to ``root``; the same fold as ``MerkleProof.verify``."""
    node = leaf
    for sibling in proof:
        node = hash_pair(node, sibling)
    return node == root


class MerkleTree:
    """A tree over leaf hashes, laid out exactly as OpenZeppelin's ``StandardMerkleTree``.

    ``leaves[i]`` is the i-th smallest leaf hash; ``i`` is the *leaf index* the ledger stores, and
    the leaf sits at ``tree[len(tree) - 1 - i]``. Rebuilding from the stored leaves (in any order)
    gives the same root and proofs, which is how inclusion proofs are served later.
    Duplicate leaves are kept (as the npm library does); ``index_of`` returns the first.
    """

    __slots__ = ("_index", "_tree", "leaves")

    def __init__(self, leaves: Iterable[bytes]) -> None:
        ordered = sorted(leaves)
        if not ordered:
            raise ValueError("a Merkle tree needs at least one leaf")
        for leaf in ordered:
            if len(leaf) != 32:
                raise ValueError(f"leaf hashes are 32 bytes, got {len(leaf)}")
        size = 2 * len(ordered) - 1
        tree: list[bytes] = [b""] * size
        for i, leaf in enumerate(ordered):
            tree[size - 1 - i] = leaf
        for i in range(size - 1 - len(ordered), -1, -1):
            tree[i] = hash_pair(tree[2 * i + 1], tree[2 * i + 2])
        self._tree = tree
        self.leaves: tuple[bytes, ...] = tuple(ordered)
        self._index: dict[bytes, int] = {}
        for i, leaf in enumerate(ordered):
            self._index.setdefault(leaf, i)

    @property
    def root(self) -> bytes:
        return self._tree[0]

    def __len__(self) -> int:
        return len(self.leaves)

    def index_of(self, leaf: bytes) -> int:
        """The leaf index of ``leaf``; ``KeyError`` when it is not in the tree."""
        try:
            return self._index[leaf]
        except KeyError:
            raise KeyError(f"leaf 0x{leaf.hex()} is not in the tree") from None

    def proof(self, leaf: bytes) -> list[bytes]:
        """Sibling hashes from ``leaf`` up to the root (``getProof`` of the npm library)."""
        return self.proof_at(self.index_of(leaf))

    def proof_at(self, leaf_index: int) -> list[bytes]:
        """The proof for the leaf at ``leaf_index`` (0 .. len - 1)."""
        if not 0 <= leaf_index < len(self.leaves):
            raise IndexError(f"leaf index {leaf_index} out of range")
        i = len(self._tree) - 1 - leaf_index
        proof: list[bytes] = []
        while i > 0:
            proof.append(self._tree[i + 1 if i % 2 else i - 1])
            i = (i - 1) // 2
        return proof
