"""Our Merkle tree against the real ``@openzeppelin/merkle-tree`` npm library (in infra/node).

For each size, the same 5 x bytes32 values go to ``StandardMerkleTree.of(values, types)`` in a
node subprocess; root, leaf hashes and every ``getProof(i)`` must match ours byte for byte.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas.merkle import LEAF_TYPES, MerkleTree, leaf_hash, verify_proof

pytestmark = pytest.mark.chain

NODE_DIR = Path(__file__).resolve().parents[2] / "infra" / "node"

_SCRIPT = """
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');
let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const { types, values } = JSON.parse(input);
  const tree = StandardMerkleTree.of(values, types);
  const leaves = values.map((v) => tree.leafHash(v));
  const proofs = values.map((_, i) => tree.getProof(i));
  process.stdout.write(JSON.stringify({ root: tree.root, leaves, proofs }));
});
"""


def _openzeppelin(values: list[tuple[bytes, ...]]) -> dict[str, Any]:
    node = shutil.which("node")
    assert node is not None, "node is not installed (needed for the npm merkle-tree check)"
    assert (NODE_DIR / "node_modules" / "@openzeppelin" / "merkle-tree").is_dir(), (
        "run `npm ci` in infra/node first"
    )
    payload = {
        "types": list(LEAF_TYPES),
        "values": [["0x" + v.hex() for v in row] for row in values],
    }
    done = subprocess.run(
        [node, "-e", _SCRIPT],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        cwd=NODE_DIR,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _hex(data: bytes) -> str:
    return "0x" + data.hex()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 257])
def test_root_and_proofs_match_openzeppelin(size: int) -> None:
    rng = random.Random(size)
    values = [tuple(rng.randbytes(32) for _ in LEAF_TYPES) for _ in range(size)]
    leaves = [leaf_hash(LEAF_TYPES, row) for row in values]
    tree = MerkleTree(leaves)

    oz = _openzeppelin(values)

    assert oz["root"] == _hex(tree.root)
    assert oz["leaves"] == [_hex(leaf) for leaf in leaves]
    for leaf, oz_proof in zip(leaves, oz["proofs"], strict=True):
        ours = tree.proof(leaf)
        assert oz_proof == [_hex(p) for p in ours]
        assert verify_proof(tree.root, leaf, ours)
