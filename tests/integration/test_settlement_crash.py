"""Crash safety of settlement: SIGKILL at each failpoint, restart, and check that ledger and
chain agree — no record lost, none stored twice, no root anchored twice, none orphaned.

Real broker, real anvil, SQLite and PostgreSQL ledgers, the settlement service as a real
process (``inference-node settlement``) killed by ``settlement.failpoints``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from infra.dev.anvil import DEV_ACCOUNTS, AnvilProcess, dev_private_key, running_anvil
from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from schemas import SettlementRecord, Usage, encode
from schemas.merkle import MerkleTree, envelope_leaf
from schemas.topics import standard_topics
from settlement.chain import ChainSettings, SettlementChain
from settlement.ledger import open_ledger
from settlement.ledger.base import Ledger
from tests.harness.admission import AdmissionFile
from tests.harness.nodes import TestNode
from tests.harness.support import fast_kafka, register_node

pytestmark = [pytest.mark.kafka, pytest.mark.chain]

N_RECORDS = 240
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as proc:
        yield proc


@pytest.fixture
async def contract(anvil: AnvilProcess) -> str:
    settings = ChainSettings(rpc_url=anvil.rpc_url, relayer_key=SecretStr(dev_private_key(0)))
    return await SettlementChain.deploy(settings, DEV_ACCOUNTS[0])


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "ledger.sqlite3")
        return
    schema = "crash_" + uuid.uuid4().hex[:10]
    yield f"{POSTGRES_DSN}?schema={schema}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


SIGNERS = [TestNode.seeded(i) for i in (1, 2)]


def _records(n: int) -> list[SettlementRecord]:
    return [
        SIGNERS[i % 2].record(
            f"crash-{i}",
            input_hash=f"{i:064x}",
            output_hash=f"{i + 1:064x}",
            usage=Usage(input_tokens=i, output_tokens=0),
        )
        for i in range(n)
    ]


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nodecli.main", "settlement"],
            env=env,
            stdout=out,
            stderr=out,
        )


@pytest.fixture
async def settlement_env(
    broker: BrokerProcess, anvil: AnvilProcess, contract: str, ledger_url: str, tmp_path: Path
) -> AsyncIterator[dict[str, str]]:
    namespace = "c" + uuid.uuid4().hex[:10]
    await ensure_topics(broker.bootstrap, standard_topics(namespace, ["demo-mlp"]))
    admission = AdmissionFile(tmp_path / "admission.json")
    admission.admit_all((n.node_id, n.chain_address) for n in SIGNERS)
    yield {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OG_", "OG_FAILPOINT"))},
        **admission.env("OG_SETTLEMENT_"),
        "OG_SETTLEMENT_NAMESPACE": namespace,
        "OG_SETTLEMENT_GROUP_ID": f"{namespace}-settlement",
        "OG_SETTLEMENT_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap,
        "OG_SETTLEMENT_KAFKA__SESSION_TIMEOUT_MS": "3000",
        "OG_SETTLEMENT_KAFKA__HEARTBEAT_INTERVAL_MS": "500",
        "OG_SETTLEMENT_LEDGER_URL": ledger_url,
        "OG_SETTLEMENT_MAX_BATCH": "60",
        "OG_SETTLEMENT_ANCHOR": "true",
        "OG_SETTLEMENT_CHAIN__RPC_URL": anvil.rpc_url,
        "OG_SETTLEMENT_CHAIN__CONTRACT_ADDRESS": contract,
        "OG_SETTLEMENT_CHAIN__RELAYER_KEY": dev_private_key(0),
        "OG_SETTLEMENT_MERKLE_BATCH_MAX_RECORDS": "100",
        "OG_SETTLEMENT_MERKLE_BATCH_MAX_AGE_S": "0.5",
    }


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("settlement did not reach its failpoint")
        await asyncio.sleep(0.1)
    return proc.returncode


@pytest.mark.parametrize(
    "point", ["before_ledger_write", "after_ledger_write", "after_batch_built", "after_tx_sent"]
)
async def test_sigkill_at_each_point_then_restart_loses_nothing_and_anchors_once(
    point: str,
    broker: BrokerProcess,
    anvil: AnvilProcess,
    contract: str,
    ledger_url: str,
    settlement_env: dict[str, str],
    tmp_path: Path,
) -> None:
    records = _records(N_RECORDS)
    namespace = settlement_env["OG_SETTLEMENT_NAMESPACE"]
    for signer in SIGNERS:
        await register_node(broker.bootstrap, f"{namespace}.registry", signer)
    producer = AIOKafkaProducer(**fast_kafka(broker.bootstrap).producer_kwargs())
    await producer.start()
    try:
        topic = f"{namespace}.settlement"
        for record in records:
            await producer.send(topic, encode(record), key=record.envelope.request_id.encode())
        await producer.flush()
    finally:
        await producer.stop()

    log = tmp_path / "settlement.log"
    crashed = _start({**settlement_env, "OG_FAILPOINT": point}, log)
    assert await _wait_exit(crashed, 60) == -signal.SIGKILL

    restarted = _start(settlement_env, log)
    try:
        ledger = open_ledger(ledger_url)
        try:
            deadline = time.monotonic() + 60
            while not (
                ledger.count() == N_RECORDS
                and ledger.oldest_unbatched_unix_ms() is None
                and not ledger.open_batches()
            ):
                assert restarted.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "not settled and anchored in time"
                await asyncio.sleep(0.2)
            await _assert_ledger_and_chain_agree(ledger, records, anvil, contract)
        finally:
            ledger.close()
    finally:
        restarted.send_signal(signal.SIGTERM)
        assert await _wait_exit(restarted, 30) == 0


async def _assert_ledger_and_chain_agree(
    ledger: Ledger, records: list[SettlementRecord], anvil: AnvilProcess, contract: str
) -> None:
    batch_ids = set()
    for record in records:
        rows = ledger.record_batch(record.envelope.request_id)
        assert len(rows) == 1, "stored exactly once"
        _, batch, _, leaf_hex = rows[0]
        assert batch is not None and batch.status == "anchored", "in exactly one anchored batch"
        assert leaf_hex == "0x" + envelope_leaf(record.envelope).hex()
        batch_ids.add(batch.id)
    chain = await SettlementChain.connect(
        ChainSettings(rpc_url=anvil.rpc_url, contract_address=contract)
    )
    try:
        assert await chain.batch_count() == len(batch_ids), "no root anchored twice or orphaned"
        total = 0
        for batch_id in batch_ids:
            batch = ledger.batch(batch_id)
            leaves = [bytes.fromhex(h[2:]) for h in ledger.batch_leaves(batch_id)]
            assert "0x" + MerkleTree(leaves).root.hex() == batch.root
            anchored = await chain.find_anchor(bytes.fromhex(batch.root[2:]))
            assert anchored is not None and anchored.tx_hash == batch.tx_hash
            total += batch.count
        assert total == len(records)
    finally:
        await chain.close()
