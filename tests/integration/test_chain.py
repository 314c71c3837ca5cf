"""Integration tests for infra.dev.anvil and settlement.chain against a real anvil."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from eth_abi.abi import encode
from eth_account import Account
from eth_utils.crypto import keccak
from pydantic import SecretStr
from web3 import AsyncHTTPProvider, AsyncWeb3

from infra.dev.anvil import (
    DEV_ACCOUNTS,
    AnvilProcess,
    ChainAlreadyRunning,
    dev_private_key,
    rpc_chain_id,
    rpc_ready,
    running_anvil,
    start_anvil,
    stop_anvil,
)
from infra.dev.anvil import ChainError as AnvilError
from infra.dev.broker import free_port
from schemas.merkle import LEAF_TYPES, MerkleTree, leaf_hash
from settlement.chain import (
    Anchored,
    ChainError,
    ChainSettings,
    DuplicateRoot,
    SettlementChain,
)

pytestmark = pytest.mark.chain

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "infra" / "contracts" / "build.mjs"
NODE_DIR = REPO / "infra" / "node"
REF = b"\x00" * 31 + b"\x01"


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as running:
        yield running


def settings_for(
    anvil: AnvilProcess, key_index: int = 0, address: str | None = None
) -> ChainSettings:
    return ChainSettings(
        rpc_url=anvil.rpc_url,
        contract_address=address,
        relayer_key=SecretStr(dev_private_key(key_index)),
        chain_id=anvil.chain_id,
        receipt_timeout_s=10,
    )


@pytest.fixture
async def contract_address(anvil: AnvilProcess) -> str:
    """A freshly deployed Settlement whose relayer is dev account 0 (batch indexes from 0)."""
    return await SettlementChain.deploy(settings_for(anvil), DEV_ACCOUNTS[0])


@pytest.fixture
async def chain(anvil: AnvilProcess, contract_address: str) -> AsyncIterator[SettlementChain]:
    client = await SettlementChain.connect(settings_for(anvil, address=contract_address))
    yield client
    await client.close()


async def pending_nonce(anvil: AnvilProcess, address: str) -> int:
    w3 = AsyncWeb3(AsyncHTTPProvider(anvil.rpc_url))
    try:
        return await w3.eth.get_transaction_count(w3.to_checksum_address(address), "pending")
    finally:
        await w3.provider.disconnect()


def root_of(label: str) -> bytes:
    return keccak(text=label)


# --- StandardMerkleTree (OpenZeppelin) by hand, for one bytes32 field per leaf ------------


def oz_leaf(value: bytes) -> bytes:
    return keccak(keccak(encode(["bytes32"], [value])))


def hash_pair(a: bytes, b: bytes) -> bytes:
    return keccak(min(a, b) + max(a, b))


def oz_tree(values: list[bytes]) -> tuple[list[bytes], dict[bytes, int]]:
    """OZ's array layout: sorted leaves at the end, node i = hash_pair(2i+1, 2i+2)."""
    leaves = sorted(oz_leaf(v) for v in values)
    tree = [b""] * (2 * len(leaves) - 1)
    for i, leaf in enumerate(leaves):
        tree[len(tree) - 1 - i] = leaf
    for i in range(len(tree) - 1 - len(leaves), -1, -1):
        tree[i] = hash_pair(tree[2 * i + 1], tree[2 * i + 2])
    return tree, {leaf: tree.index(leaf) for leaf in leaves}


def oz_proof(tree: list[bytes], index: int) -> list[bytes]:
    proof = []
    while index > 0:
        sibling = index - 1 if index % 2 == 0 else index + 1
        proof.append(tree[sibling])
        index = (index - 1) // 2
    return proof


# --- infra.dev.anvil ---------------------------------------------------------------------------


def test_build_artifact_is_up_to_date() -> None:
    node = shutil.which("node")
    assert node is not None, "node (v20) is required for the contract build"
    result = subprocess.run(
        [node, str(BUILD_SCRIPT), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_dev_keys_match_anvil_accounts() -> None:
    for index, address in enumerate(DEV_ACCOUNTS):
        assert Account.from_key(dev_private_key(index)).address == address
    with pytest.raises(ValueError):
        dev_private_key(10)


def test_anvil_answers_and_refuses_a_second_start(anvil: AnvilProcess, tmp_path: Path) -> None:
    assert rpc_ready(anvil.rpc_url)
    assert rpc_chain_id(anvil.rpc_url) == anvil.chain_id
    with pytest.raises(ChainAlreadyRunning):
        start_anvil(anvil.host, anvil.port, log_path=tmp_path / "second.log")


def test_start_fails_on_a_port_held_by_something_else(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with pytest.raises(AnvilError, match="not a chain node"):
            start_anvil(port=port, log_path=tmp_path / "anvil.log")


def test_stop_anvil_with_pid_file(tmp_path: Path) -> None:
    port = free_port()
    pid_path = tmp_path / "anvil.pid"
    proc = start_anvil(port=port, log_path=tmp_path / "anvil.log", pid_path=pid_path, detach=True)
    try:
        assert rpc_ready(f"http://127.0.0.1:{port}")
        assert stop_anvil(pid_path) is True
        assert not pid_path.exists()
        assert stop_anvil(pid_path) is False
        assert not rpc_ready(f"http://127.0.0.1:{port}", timeout_s=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# --- settlement.chain ----------------------------------------------------------------------


async def test_settle_batch_then_duplicate_is_rejected_before_sending(
    anvil: AnvilProcess, chain: SettlementChain
) -> None:
    root = root_of("batch-1")
    anchored = await chain.settle_batch(root, 3, REF)
    assert anchored.root == "0x" + root.hex()
    assert anchored.batch_index == 0
    assert anchored.gas_used > 0
    assert anchored.block_number > 0
    assert await chain.is_settled(root)

    nonce = await pending_nonce(anvil, DEV_ACCOUNTS[0])
    with pytest.raises(DuplicateRoot) as excinfo:
        await chain.settle_batch(root, 3, REF)
    assert excinfo.value.root == root
    assert await pending_nonce(anvil, DEV_ACCOUNTS[0]) == nonce

    assert await chain.find_anchor(root) == anchored
    assert await chain.find_anchor(root_of("never settled")) is None


async def test_empty_batch_is_rejected_by_name(anvil: AnvilProcess, chain: SettlementChain) -> None:
    nonce = await pending_nonce(anvil, DEV_ACCOUNTS[0])
    with pytest.raises(ChainError, match="EmptyBatch") as excinfo:
        await chain.settle_batch(root_of("empty"), 0, REF)
    assert excinfo.value.reason == "EmptyBatch"
    assert await pending_nonce(anvil, DEV_ACCOUNTS[0]) == nonce


async def test_only_the_relayer_may_settle(anvil: AnvilProcess, contract_address: str) -> None:
    intruder = await SettlementChain.connect(settings_for(anvil, 1, contract_address))
    try:
        with pytest.raises(ChainError, match="NotRelayer") as excinfo:
            await intruder.settle_batch(root_of("intruder"), 1, REF)
        assert excinfo.value.reason == "NotRelayer"
        assert not await intruder.is_settled(root_of("intruder"))
    finally:
        await intruder.close()


async def test_verify_record_of_a_standard_merkle_tree(chain: SettlementChain) -> None:
    records = [[root_of(f"record-{i}-field-{f}") for f in range(5)] for i in range(4)]
    leaves = [leaf_hash(LEAF_TYPES, values) for values in records]
    tree = MerkleTree(leaves)

    assert not await chain.verify_record(tree.root, records[2], tree.proof(leaves[2]))
    await chain.settle_batch(tree.root, len(records), REF)
    for values, leaf in zip(records, leaves, strict=True):
        assert await chain.verify_record(tree.root, values, tree.proof(leaf))
    stranger = [root_of(f"stranger-{f}") for f in range(5)]
    assert not await chain.verify_record(tree.root, stranger, tree.proof(leaves[2]))
    assert not await chain.verify_record(root_of("unsettled"), records[2], tree.proof(leaves[2]))


async def test_an_inner_node_never_passes_as_a_record(chain: SettlementChain) -> None:
    """The attack the contract's fields-only API closes: with (root, leaf, proof), the hash of
    two leaves plus the path above it "proves" a record that was never settled."""
    records = [[root_of(f"inner-{i}-{f}") for f in range(5)] for i in range(4)]
    leaves = [leaf_hash(LEAF_TYPES, values) for values in records]
    tree = MerkleTree(leaves)
    await chain.settle_batch(tree.root, len(records), REF)
    first, second = tree.leaves[0], tree.leaves[1]
    inner = min(first, second) + max(first, second)
    # Nothing can present the inner node as five leaf fields whose leaf hash equals it.
    fake_fields = [inner[:32], inner[32:], b"\0" * 32, b"\0" * 32, b"\0" * 32]
    assert not await chain.verify_record(tree.root, fake_fields, tree.proof(first)[1:])


def test_hand_built_tree_matches_openzeppelin_merkle_tree() -> None:
    values = [root_of(f"record-{i}") for i in range(4)]
    tree, _ = oz_tree(values)
    script = (
        "const {StandardMerkleTree} = require('@openzeppelin/merkle-tree');"
        "const values = JSON.parse(process.argv[1]).map((v) => [v]);"
        "process.stdout.write(StandardMerkleTree.of(values, ['bytes32']).root);"
    )
    node = shutil.which("node")
    assert node is not None
    result = subprocess.run(
        [node, "-e", script, json.dumps(["0x" + v.hex() for v in values])],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "0x" + tree[0].hex()


async def test_concurrent_settlements_are_serialised(chain: SettlementChain) -> None:
    roots = [root_of(f"concurrent-{i}") for i in range(5)]
    results: list[Anchored] = await asyncio.gather(
        *(chain.settle_batch(root, i + 1, REF) for i, root in enumerate(roots))
    )
    assert sorted(r.batch_index for r in results) == [0, 1, 2, 3, 4]
    assert len({r.tx_hash for r in results}) == 5
    for root, result in zip(roots, results, strict=True):
        assert await chain.find_anchor(root) == result


async def test_connect_checks_chain_id_and_contract(
    anvil: AnvilProcess, contract_address: str
) -> None:
    wrong_chain = settings_for(anvil, address=contract_address).model_copy(update={"chain_id": 1})
    with pytest.raises(ChainError, match="serves chain"):
        await SettlementChain.connect(wrong_chain)
    with pytest.raises(ChainError, match="no contract"):
        await SettlementChain.connect(settings_for(anvil, address=DEV_ACCOUNTS[5]))


async def test_key_never_shows(anvil: AnvilProcess, chain: SettlementChain) -> None:
    key = dev_private_key(0)
    settings = settings_for(anvil, address=chain.address)
    assert key not in repr(settings)
    assert key[2:] not in repr(chain)
    assert chain.relayer_address == DEV_ACCOUNTS[0]
    with pytest.raises(ChainError) as excinfo:
        await SettlementChain.connect(
            settings.model_copy(update={"relayer_key": SecretStr("0xnot-a-key" + key[2:])})
        )
    assert key[2:] not in str(excinfo.value)
