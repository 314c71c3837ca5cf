"""Published batches: the leaves of an anchored Merkle batch, in the open.

When settlement anchors a batch it publishes a ``PublishedBatch``: the contract's index of the
batch, its root, its leaf count and, for each leaf in leaf order, the five leaf values
(``schemas.merkle.LEAF_TYPES``). Nothing else: no request id in clear (a request id may be user
data; a third party who knows one hashes it with keccak256 to find its leaf), and ``private``
records are never batched, so never published.

The document's canonical bytes, ``JCS(document)``, are the published file; its SHA-256 is the
``batchRef`` argument of ``settleBatch`` (``batch_ref``), so the chain commits to the file. With
the file, a signed result and the chain, anyone can rebuild the tree, find the result's leaf and
prove its inclusion, with no help from the service that published it:
``check_published_batch`` and ``inclusion_from_batch`` do the rebuilding (pure), the chain
side is ``settlement.inclusion.check_published_inclusion``.

Leaf order is the tree's: ascending leaf hash, leaf ``i`` at index ``i`` (one batch, one file).
A document holds at most ``MAX_PUBLISHED_LEAVES`` leaves, so it fits one message
(``schemas.limits.MAX_MESSAGE_BYTES``) on the ``<ns>.batches`` topic.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from typing import Annotated, Final, Literal

from pydantic import ConfigDict, Field, ValidationError

from schemas.base import WireModel
from schemas.canonical import canonical_bytes
from schemas.inclusion import AnchoringTx, Bytes32, ChainRef, InclusionProof, LeafFields
from schemas.merkle import LEAF_TYPES, MerkleTree, leaf_hash, leaf_values
from schemas.results import ResultEnvelope
from schemas.verify.result import Check
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "MAX_PUBLISHED_LEAVES",
    "PublishedBatch",
    "batch_bytes",
    "batch_key",
    "batch_ref",
    "check_published_batch",
    "find_batch",
    "inclusion_from_batch",
    "parse_published_batches",
    "published_batch",
]

MAX_PUBLISHED_LEAVES: Final = 2_500
"""Leaves per batch at most: a leaf takes 347 bytes of the document, so 2,500 leaves stay under
the 1,000,000-byte message limit with room for the header."""

LeafRow = Annotated[list[Bytes32], Field(min_length=5, max_length=5)]
"""One leaf's values in ``LEAF_TYPES`` order: request key (keccak256 of the request id's UTF-8
bytes), node id, input hash, output hash, envelope digest; each ``0x`` + 64 lower-case hex."""


class PublishedBatch(WireModel):
    """One anchored batch's leaves (see the module docstring); strict, so what parses is
    exactly what was hashed (no ``"7"`` for ``7``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, strict=True)

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["published_batch"] = "published_batch"
    batch_index: int = Field(ge=0, le=2**53 - 1)
    """The contract's index of the batch (``BatchSettled.batchIndex``)."""
    root: Bytes32
    count: int = Field(ge=1, le=MAX_PUBLISHED_LEAVES)
    leaves: list[LeafRow] = Field(min_length=1, max_length=MAX_PUBLISHED_LEAVES)


def _bytes(value: str) -> bytes:
    return bytes.fromhex(value[2:])


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def _leaf_hashes(batch: PublishedBatch) -> list[bytes]:
    return [leaf_hash(LEAF_TYPES, [_bytes(v) for v in row]) for row in batch.leaves]


def published_batch(batch_index: int, leaves: Iterable[Sequence[bytes]]) -> PublishedBatch:
    """The document of a batch given its leaves' values (in any order): leaves put in leaf
    order, root computed as ``MerkleTree`` does."""
    keyed = sorted(
        (leaf_hash(LEAF_TYPES, list(values)), [_hex(v) for v in values]) for values in leaves
    )
    tree = MerkleTree(h for h, _ in keyed)
    return PublishedBatch(
        batch_index=batch_index,
        root=_hex(tree.root),
        count=len(keyed),
        leaves=[row for _, row in keyed],
    )


def batch_bytes(batch: PublishedBatch) -> bytes:
    """The published file: RFC 8785 canonical bytes of the document."""
    return canonical_bytes(batch)


def batch_ref(batch: PublishedBatch) -> bytes:
    """``batchRef``: SHA-256 of ``batch_bytes(batch)``, as ``settleBatch`` records it."""
    return hashlib.sha256(batch_bytes(batch)).digest()


def batch_key(batch_index: int) -> bytes:
    """Kafka key of a batch on ``<ns>.batches``: its index in ASCII decimal."""
    return str(batch_index).encode("ascii")


def check_published_batch(batch: PublishedBatch) -> list[Check]:
    """What a document must satisfy on its own: its count, its leaf order (ascending leaf hash,
    no leaf twice) and its root, rebuilt from the leaves."""
    hashes = _leaf_hashes(batch)
    ordered = all(a < b for a, b in itertools.pairwise(hashes))
    return [
        Check("batch_count", batch.count == len(hashes), "count equals the number of leaves"),
        Check("leaf_order", ordered, "leaves in ascending leaf-hash order, none twice"),
        Check(
            "batch_root",
            MerkleTree(hashes).root == _bytes(batch.root),
            "root rebuilt from the leaves (OpenZeppelin StandardMerkleTree)",
        ),
    ]


def _leaf_index(batch: PublishedBatch, envelope: ResultEnvelope) -> int | None:
    row = [_hex(v) for v in leaf_values(envelope)]
    for i, leaf in enumerate(batch.leaves):
        if leaf == row:
            return i
    return None


def find_batch(
    batches: Iterable[PublishedBatch], envelope: ResultEnvelope
) -> PublishedBatch | None:
    """The first of ``batches`` holding ``envelope``'s leaf, or None."""
    for batch in batches:
        if _leaf_index(batch, envelope) is not None:
            return batch
    return None


def inclusion_from_batch(
    batch: PublishedBatch, envelope: ResultEnvelope, chain: ChainRef
) -> InclusionProof | None:
    """The inclusion proof of ``envelope``'s leaf, rebuilt from ``batch`` alone (None when the
    batch does not hold it). The tree is built from the document's leaves, so the proof leads
    to the root they make; whether that is ``batch.root`` is ``check_published_batch``'s to
    say. The anchoring transaction is not in the document: ``batch`` names only its index."""
    index = _leaf_index(batch, envelope)
    if index is None:
        return None
    tree = MerkleTree(_leaf_hashes(batch))
    values = batch.leaves[index]
    leaf = leaf_hash(LEAF_TYPES, [_bytes(v) for v in values])
    return InclusionProof(
        request_id=envelope.request_id,
        node_id=envelope.node_id,
        leaf=LeafFields(types=list(LEAF_TYPES), values=list(values)),
        leaf_hash=_hex(leaf),
        proof=[_hex(p) for p in tree.proof(leaf)],
        root=batch.root,
        batch=AnchoringTx(
            count=batch.count,
            tx_hash=None,
            block_number=None,
            batch_index=batch.batch_index,
            gas_used=None,
        ),
        chain=chain,
    )


def parse_published_batches(data: bytes) -> tuple[list[PublishedBatch], int]:
    """Documents from a published file (one document) or a topic dump (one document per line,
    JSON Lines), and how many lines were not a valid document (never echoed: they may be
    anything)."""
    text = data.decode("utf-8", errors="replace").strip()
    if not text:
        return [], 0
    try:
        return [PublishedBatch.model_validate_json(text)], 0
    except ValidationError:
        pass
    batches: list[PublishedBatch] = []
    malformed = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            batches.append(PublishedBatch.model_validate_json(line))
        except ValidationError:
            malformed += 1
    return batches, malformed
