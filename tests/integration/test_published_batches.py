"""Published batches on real parts: a third party proves inclusion with nothing but the reply,
the published batch (the file, or a dump of the ``<ns>.batches`` topic) and the chain's RPC,
a tampered file fails against the ``batchRef`` on chain, and a settlement process killed
between anchoring and publishing publishes on restart.

Real broker, anvil, the worker and the settlement service (in-process, and as a process killed
by ``settlement.failpoints``); the third party uses ``inference-node verify`` after the ledger
is gone, and OpenZeppelin's ``@openzeppelin/merkle-tree`` with node's own SHA-256.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from web3 import AsyncHTTPProvider, AsyncWeb3

from client import InferenceClient, build_request
from infra.dev.anvil import DEV_ACCOUNTS, AnvilProcess, dev_private_key, running_anvil
from infra.dev.broker import BrokerProcess
from nodecli.main import main
from schemas import InferenceResult, MLInput, Tensor, Topics, encode
from schemas.batches import (
    PublishedBatch,
    batch_bytes,
    batch_key,
    batch_ref,
    parse_published_batches,
    published_batch,
)
from schemas.merkle import LEAF_TYPES, leaf_values
from settlement.chain import ChainError, SettlementChain
from settlement.ledger import open_ledger
from settlement.settings import SettlementSettings
from tests.harness.admission import AdmissionFile
from tests.harness.anchoring import (
    anchoring,
    batch_settled_events,
    chain_settings,
    deploy_settlement,
    published_on_topic,
    reply_of,
    running_service,
)
from tests.harness.nodes import TestNode
from tests.harness.support import eventually, fast_kafka, register_node
from worker.app import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.chain]

NODE_DIR = Path(__file__).resolve().parents[2] / "infra" / "node"
NODE = TestNode.seeded(7)

_OPENZEPPELIN = """
const { StandardMerkleTree } = require('@openzeppelin/merkle-tree');
const { createHash } = require('crypto');
const fs = require('fs');
const [file, wanted] = process.argv.slice(1);
const bytes = fs.readFileSync(file);
const doc = JSON.parse(bytes);
const tree = StandardMerkleTree.of(doc.leaves, TYPES);
let proof = null;
for (const [i, v] of tree.entries()) {
  if (JSON.stringify(v) === wanted) proof = tree.getProof(i);
}
process.stdout.write(JSON.stringify({
  sha256: '0x' + createHash('sha256').update(bytes).digest('hex'), root: tree.root, proof }));
""".replace("TYPES", json.dumps(list(LEAF_TYPES)))


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as proc:
        yield proc


def _payload(i: int) -> MLInput:
    return MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i, 1.0, -1.0, 0.5])})


def _openzeppelin(file: Path, reply: InferenceResult) -> dict[str, Any]:
    """What OpenZeppelin's npm library makes of a published file: its sha256, the tree's root
    and the proof of ``reply``'s leaf."""
    node = shutil.which("node")
    assert node is not None, "node is required for the npm merkle-tree check"
    wanted = json.dumps(["0x" + v.hex() for v in leaf_values(reply.envelope)])
    done = subprocess.run(
        [node, "-e", _OPENZEPPELIN, str(file), wanted.replace(" ", "")],
        capture_output=True,
        text=True,
        cwd=NODE_DIR,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def _verify(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, bool]]:
    """``inference-node verify ARGS`` (in a thread: it runs its own event loop): exit code and
    check name → ok."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["verify", *args])
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    return code, {c["name"]: c["ok"] for c in report["checks"]}


def _verify_args(
    reply: Path, published: Path, anvil: AnvilProcess, contract: str, admission: AdmissionFile
) -> list[str]:
    return [
        str(reply),
        "--published-batch",
        str(published),
        "--contract",
        contract,
        "--rpc-url",
        anvil.rpc_url,
        "--chain-id",
        str(anvil.chain_id),
        "--state-dir",
        str(reply.parent / "no-stack"),
        *admission.verify_args(),
    ]


CHAIN_CHECKS = {"root_settled", "batch_ref", "batch_index", "on_chain_inclusion"}


async def test_a_third_party_proves_inclusion_from_the_published_file_or_topic(
    broker: BrokerProcess,
    namespace: str,
    anvil: AnvilProcess,
    running_worker: Worker,
    settlement_settings: SettlementSettings,
    admission: AdmissionFile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topics = Topics(namespace)
    contract = await deploy_settlement(anvil)
    publish_dir = tmp_path / "published"
    settings = anchoring(
        settlement_settings, anvil, contract, publish_dir, merkle_batch_max_records=4
    )
    async with (
        running_service(settings) as service,
        InferenceClient(
            fast_kafka(broker.bootstrap), topics, admission=admission.settings()
        ) as client,
    ):
        requests = [build_request("demo-mlp", _payload(i)) for i in range(4)]
        futures = [await client.send(r) for r in requests]
        async with asyncio.timeout(60):
            replies = await asyncio.gather(*futures)
        assert all(isinstance(r, InferenceResult) for r in replies)
        publisher = service.publisher
        assert publisher is not None
        await eventually(lambda: publisher.published == 1)
    dump = tmp_path / "batches.jsonl"
    on_topic = await published_on_topic(broker.bootstrap, topics.batches)
    dump.write_bytes(b"\n".join(value for _, value in on_topic) + b"\n")
    # The third party has no ledger: it is gone.
    Path(settings.ledger_url).unlink()

    (file,) = publish_dir.glob("*.json")
    assert file.name == "batch-0000000000.json"
    assert [(key, value) for key, value in on_topic] == [(batch_key(0), file.read_bytes())]
    (document,), _ = parse_published_batches(file.read_bytes())
    assert (document.batch_index, document.count) == (0, 4)

    events = await batch_settled_events(anvil.rpc_url, contract)
    assert (
        events[document.root]["batch_ref"] == "0x" + hashlib.sha256(file.read_bytes()).hexdigest()
    )
    for i, reply in enumerate(replies):
        assert isinstance(reply, InferenceResult)
        reply_file = tmp_path / f"reply-{i}.json"
        reply_file.write_bytes(encode(reply))
        for published in (file, dump, publish_dir):
            code, checks = await _verify(
                _verify_args(reply_file, published, anvil, contract, admission), capsys
            )
            assert code == 0, checks
            assert CHAIN_CHECKS | {"batch_root", "leaf_order", "merkle_path", "admitted"} <= set(
                checks
            )

        # The same from OpenZeppelin's library: the file's sha256 is the batchRef on chain,
        # its leaves make the root, and the library's proof holds in the contract.
        oz = _openzeppelin(file, reply)
        assert (oz["sha256"], oz["root"]) == (events[document.root]["batch_ref"], document.root)
        chain = await SettlementChain.connect(chain_settings(anvil, contract))
        try:
            proof = [bytes.fromhex(p[2:]) for p in oz["proof"]]
            root = bytes.fromhex(document.root[2:])
            assert await chain.verify_record(root, list(leaf_values(reply.envelope)), proof)
        finally:
            await chain.close()

    # A reply that is in no published batch is not proved by them.
    stranger = tmp_path / "stranger.json"
    stranger.write_bytes(encode(reply_of(NODE, "not-settled")))
    code, checks = await _verify(_verify_args(stranger, file, anvil, contract, admission), capsys)
    assert code == 1 and checks["in_published_batch"] is False


async def _settle_and_publish(
    broker: BrokerProcess, settings: SettlementSettings, replies: list[InferenceResult]
) -> None:
    topics = settings.topics
    await register_node(broker.bootstrap, topics.registry, NODE)
    async with running_service(settings) as service:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
        await producer.start()
        try:
            for reply in replies:
                record = NODE.sign(reply.envelope)
                await producer.send_and_wait(
                    topics.settlement, encode(record), key=NODE.node_id.encode()
                )
        finally:
            await producer.stop()
        publisher = service.publisher
        assert publisher is not None
        await eventually(lambda: publisher.published == 1)


async def test_a_tampered_published_file_fails_against_batch_ref(
    broker: BrokerProcess,
    anvil: AnvilProcess,
    settlement_settings: SettlementSettings,
    admission: AdmissionFile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admission.admit(NODE.node_id, NODE.chain_address)
    contract = await deploy_settlement(anvil)
    publish_dir = tmp_path / "published"
    settings = anchoring(settlement_settings, anvil, contract, publish_dir)
    replies = [reply_of(NODE, f"tamper-{tmp_path.name}-{i}") for i in range(3)]
    await _settle_and_publish(broker, settings, replies)
    (file,) = publish_dir.glob("*.json")
    (document,), _ = parse_published_batches(file.read_bytes())
    reply_file = tmp_path / "reply.json"
    reply_file.write_bytes(encode(replies[0]))

    code, checks = await _verify(_verify_args(reply_file, file, anvil, contract, admission), capsys)
    assert code == 0 and all(checks.values())

    # Same leaves and root, another index: the tree still checks, the chain does not agree.
    renumbered = tmp_path / "renumbered.json"
    renumbered.write_bytes(batch_bytes(document.model_copy(update={"batch_index": 5})))
    code, checks = await _verify(
        _verify_args(reply_file, renumbered, anvil, contract, admission), capsys
    )
    assert code == 1
    assert {name for name, ok in checks.items() if not ok} == {"batch_ref", "batch_index"}

    # Another record's leaf swapped for a forged one and the root recomputed: a consistent
    # document of a tree that was never anchored.
    values = [[bytes.fromhex(v[2:]) for v in row] for row in document.leaves]
    mine = list(leaf_values(replies[0].envelope))
    other = next(i for i, row in enumerate(values) if row != mine)
    values[other][4] = b"\xee" * 32
    forged = published_batch(document.batch_index, values)
    assert forged.root != document.root and batch_ref(forged) != batch_ref(document)
    forged_file = tmp_path / "forged.json"
    forged_file.write_bytes(batch_bytes(forged))
    code, checks = await _verify(
        _verify_args(reply_file, forged_file, anvil, contract, admission), capsys
    )
    assert code == 1
    assert {name for name, ok in checks.items() if not ok} == CHAIN_CHECKS
    assert checks["batch_root"] and checks["merkle_path"], "the forgery is self-consistent"

    # A flipped byte in the file as published: no longer a document, or not the anchored one.
    raw = bytearray(file.read_bytes())
    at = raw.index(document.leaves[other][4].encode()) + 5
    raw[at] = ord("0") if raw[at] != ord("0") else ord("1")
    flipped = tmp_path / "flipped.json"
    flipped.write_bytes(bytes(raw))
    code, checks = await _verify(
        _verify_args(reply_file, flipped, anvil, contract, admission), capsys
    )
    assert code == 1 and not checks["batch_ref"] and not checks["batch_root"]


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nodecli.main", "settlement", "run"],
            env=env,
            stdout=out,
            stderr=out,
        )


async def _exited(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the settlement process did not exit in time")
        await asyncio.sleep(0.1)
    return proc.returncode


async def test_a_crash_between_anchoring_and_publishing_publishes_on_restart(
    broker: BrokerProcess,
    anvil: AnvilProcess,
    namespace: str,
    admission: AdmissionFile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topics = Topics(namespace)
    await register_node(broker.bootstrap, topics.registry, NODE)
    admission.admit(NODE.node_id, NODE.chain_address)
    contract = await deploy_settlement(anvil)
    ledger_url = str(tmp_path / "ledger.sqlite3")
    publish_dir = tmp_path / "published"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("OG_")},
        **admission.env("OG_SETTLEMENT_"),
        "OG_SETTLEMENT_NAMESPACE": namespace,
        "OG_SETTLEMENT_GROUP_ID": f"{namespace}-settlement",
        "OG_SETTLEMENT_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "OG_SETTLEMENT_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "OG_SETTLEMENT_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "OG_SETTLEMENT_LEDGER_URL": ledger_url,
        "OG_SETTLEMENT_ANCHOR": "true",
        "OG_SETTLEMENT_CHAIN__RPC_URL": anvil.rpc_url,
        "OG_SETTLEMENT_CHAIN__CHAIN_ID": str(anvil.chain_id),
        "OG_SETTLEMENT_CHAIN__CONTRACT_ADDRESS": contract,
        "OG_SETTLEMENT_CHAIN__RELAYER_KEY": dev_private_key(0),
        "OG_SETTLEMENT_MERKLE_BATCH_MAX_RECORDS": "3",
        "OG_SETTLEMENT_MERKLE_BATCH_MAX_AGE_S": "60",
        "OG_SETTLEMENT_PUBLISH_DIR": str(publish_dir),
    }
    replies = [reply_of(NODE, f"crash-{namespace}-{i}") for i in range(3)]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap)
    await producer.start()
    try:
        for reply in replies:
            await producer.send_and_wait(
                topics.settlement, encode(NODE.sign(reply.envelope)), key=NODE.node_id.encode()
            )
    finally:
        await producer.stop()

    log = tmp_path / "settlement.log"
    crashed = _start({**env, "OG_FAILPOINT": "after_batch_anchored"}, log)
    assert await _exited(crashed, 60) == -signal.SIGKILL, log.read_text()[-2000:]

    # Anchored, recorded, and published nowhere.
    events = await batch_settled_events(anvil.rpc_url, contract)
    (root,) = events
    ledger = open_ledger(ledger_url)
    try:
        (row,) = ledger.unpublished_batches()
        assert (row.root, row.status, row.batch_index) == (root, "anchored", 0)
        assert row.batch_ref == events[root]["batch_ref"] and row.published_unix_ms is None
    finally:
        ledger.close()
    assert not publish_dir.exists() or list(publish_dir.glob("*.json")) == []
    assert await published_on_topic(broker.bootstrap, topics.batches) == []

    restarted = _start(env, log)
    try:
        await eventually(lambda: (publish_dir / "batch-0000000000.json").exists(), 60)
        on_topic: list[tuple[bytes | None, bytes]] = []

        async def on_the_topic() -> bool:
            on_topic[:] = await published_on_topic(broker.bootstrap, topics.batches)
            return bool(on_topic)

        await eventually(on_the_topic, 30)
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await _exited(restarted, 30) == 0, log.read_text()[-2000:]

    file = publish_dir / "batch-0000000000.json"
    assert on_topic == [(batch_key(0), file.read_bytes())], "published once, as anchored"
    assert "0x" + hashlib.sha256(file.read_bytes()).hexdigest() == events[root]["batch_ref"]
    document = PublishedBatch.model_validate_json(file.read_bytes())
    assert (document.root, document.count) == (root, 3)
    ledger = open_ledger(ledger_url)
    try:
        assert ledger.unpublished_batches() == []
        assert ledger.batch(1).published_unix_ms is not None
    finally:
        ledger.close()
    assert len(await batch_settled_events(anvil.rpc_url, contract)) == 1, "anchored once"

    reply_file = tmp_path / "reply.json"
    reply_file.write_bytes(encode(replies[1]))
    code, checks = await _verify(_verify_args(reply_file, file, anvil, contract, admission), capsys)
    assert code == 0 and all(checks.values())


async def test_the_batch_index_is_read_with_the_nonce_a_pending_relayer_tx_defers_anchoring(
    anvil: AnvilProcess,
) -> None:
    """``batchRef`` names the index the contract will give the batch: it is read at one block
    with the nonce the transaction is signed with, and while a relayer transaction is pending
    (it would take that index first) nothing is signed."""
    contract = await deploy_settlement(anvil)
    chain = await SettlementChain.connect(chain_settings(anvil, contract))
    w3 = AsyncWeb3(AsyncHTTPProvider(anvil.rpc_url))
    asked: list[int] = []

    def ref_at(index: int) -> bytes:
        asked.append(index)
        return hashlib.sha256(f"document of batch {index}".encode()).digest()

    try:
        await chain.settle_batch(hashlib.sha256(b"first").digest(), 1, ref_at)
        await w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
        try:
            relayer = w3.to_checksum_address(DEV_ACCOUNTS[0])
            await w3.eth.send_transaction({"from": relayer, "to": relayer, "value": 0})
            with pytest.raises(ChainError) as refused:
                await chain.settle_batch(hashlib.sha256(b"second").digest(), 2, ref_at)
            assert refused.value.reason == "RelayerBusy"
            await w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        finally:
            await w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
        anchored = await chain.settle_batch(hashlib.sha256(b"second").digest(), 2, ref_at)
    finally:
        await chain.close()
        await w3.provider.disconnect()
    assert asked == [0, 1], "asked once per anchoring, never while the relayer was busy"
    assert (anchored.batch_index, anchored.count) == (1, 2)
    events = await batch_settled_events(anvil.rpc_url, contract)
    assert events[anchored.root]["batch_ref"] == "0x" + ref_at(1).hex()
