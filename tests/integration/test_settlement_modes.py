"""Each settlement mode end to end on real parts: the client asks for it, the worker signs it
into the envelope, the settlement service (real broker, SQLite ledger, anchoring on anvil,
publishing to a directory and to ``<ns>.batches``) settles it as asked:

- ``batch``: the record waits for its batch and is anchored with it, in one transaction;
- ``individual``: anchored alone at once, in its own transaction (a tree of one leaf), whose
  gas is recorded;
- ``private``: booked and billed, never in a batch, never published, no inclusion proof.

Receipts (``settlement.receipts_for`` and ``inference-node settlement receipt``) say the same.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from web3 import AsyncHTTPProvider, AsyncWeb3

from client import InferenceClient, build_request
from infra.dev.anvil import AnvilProcess, running_anvil
from infra.dev.broker import BrokerProcess
from nodecli.main import main
from schemas import InferenceResult, MLInput, Tensor, Topics
from schemas.base import SettlementMode
from schemas.batches import PublishedBatch, parse_published_batches
from schemas.inclusion import check_inclusion_offline
from schemas.merkle import envelope_leaf, leaf_values
from settlement import receipts_for
from settlement.chain import SettlementChain
from settlement.ledger import BatchConflictError, BatchMember, Ledger
from settlement.settings import SettlementSettings
from tests.harness.admission import AdmissionFile
from tests.harness.anchoring import (
    anchoring,
    chain_settings,
    deploy_settlement,
    published_on_topic,
    running_service,
)
from tests.harness.support import eventually, fast_kafka
from worker.app import Worker

pytestmark = [pytest.mark.kafka, pytest.mark.chain]


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as proc:
        yield proc


def _payload(i: int) -> MLInput:
    return MLInput(
        tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[i / 10, 0.5, -1.0, 2.0])}
    )


async def _ask(
    client: InferenceClient, modes: list[SettlementMode], start: int
) -> list[InferenceResult]:
    requests = [
        build_request("demo-mlp", _payload(start + i), settlement=mode)
        for i, mode in enumerate(modes)
    ]
    futures = [await client.send(r) for r in requests]
    async with asyncio.timeout(60):
        replies = await asyncio.gather(*futures)
    for reply, mode in zip(replies, modes, strict=True):
        assert isinstance(reply, InferenceResult), reply
        assert reply.envelope.settlement == mode, "the worker signs the mode asked for"
    return [r for r in replies if isinstance(r, InferenceResult)]


def _row(ledger: Ledger, reply: InferenceResult) -> dict[str, object]:
    (row,) = ledger.get(reply.request_id)
    return row


def _anchored(ledger: Ledger, reply: InferenceResult) -> bool:
    rows = ledger.record_batch(reply.request_id)
    return bool(rows) and rows[0][1] is not None and rows[0][1].status == "anchored"


async def _gas_of(rpc_url: str, tx_hash: str) -> tuple[int, int]:
    """(gasUsed, BatchSettled events) of a transaction, from its receipt."""
    w3 = AsyncWeb3(AsyncHTTPProvider(rpc_url))
    try:
        receipt = await w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    finally:
        await w3.provider.disconnect()
    return int(receipt["gasUsed"]), len(receipt["logs"])


def _published_dir(directory: Path) -> list[PublishedBatch]:
    found = []
    for path in sorted(directory.glob("*.json")):
        batches, malformed = parse_published_batches(path.read_bytes())
        assert malformed == 0
        found += batches
    return found


def _holds(batch: PublishedBatch, reply: InferenceResult) -> bool:
    row = ["0x" + v.hex() for v in leaf_values(reply.envelope)]
    return row in batch.leaves or row[0] in {leaf[0] for leaf in batch.leaves}


async def test_each_mode_is_settled_as_it_asks(
    broker: BrokerProcess,
    namespace: str,
    anvil: AnvilProcess,
    running_worker: Worker,
    settlement_settings: SettlementSettings,
    admission: AdmissionFile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    topics = Topics(namespace)
    contract = await deploy_settlement(anvil)
    publish_dir = tmp_path / "published"
    settings = anchoring(settlement_settings, anvil, contract, publish_dir)
    async with (
        running_service(settings) as service,
        InferenceClient(
            fast_kafka(broker.bootstrap), topics, admission=admission.settings()
        ) as client,
    ):
        ledger = service.ledger
        assert ledger is not None
        first = await _ask(
            client,
            [
                SettlementMode.INDIVIDUAL,
                SettlementMode.PRIVATE,
                SettlementMode.BATCH,
                SettlementMode.INDIVIDUAL,
                SettlementMode.BATCH,
                SettlementMode.PRIVATE,
            ],
            0,
        )
        individual = [r for r in first if r.envelope.settlement == SettlementMode.INDIVIDUAL]
        private = [r for r in first if r.envelope.settlement == SettlementMode.PRIVATE]
        batch = [r for r in first if r.envelope.settlement == SettlementMode.BATCH]

        # Individual records are anchored at once; the two batch records wait for a third.
        await eventually(lambda: all(_anchored(ledger, r) for r in individual))
        assert [_row(ledger, r)["batch_id"] for r in batch] == [None, None]
        batch += await _ask(client, [SettlementMode.BATCH], 100)
        await eventually(lambda: all(_anchored(ledger, r) for r in batch))
        await eventually(lambda: service.publisher is not None and service.publisher.published == 3)
        await asyncio.sleep(4 * 0.5)  # several more batcher rounds: nothing else happens
        assert service.publisher is not None and service.publisher.published == 3

        # -- batch: one batch of three, anchored in one transaction ------------------------
        (batch_row,) = {ledger.record_batch(r.request_id)[0][1] for r in batch}
        assert batch_row is not None
        assert (batch_row.count, batch_row.status) == (3, "anchored")
        assert batch_row.tx_hash is not None and batch_row.gas_used is not None
        batch_gas, events = await _gas_of(anvil.rpc_url, batch_row.tx_hash)
        assert (batch_gas, events) == (batch_row.gas_used, 1)

        # -- individual: each alone, in its own transaction, gas recorded ------------------
        rows = [ledger.record_batch(r.request_id)[0] for r in individual]
        txs = set()
        for reply, (_, alone, leaf_index, leaf) in zip(individual, rows, strict=True):
            assert alone is not None and alone.count == 1 and leaf_index == 0
            assert alone.root == leaf == "0x" + envelope_leaf(reply.envelope).hex()
            assert alone.tx_hash is not None and alone.gas_used is not None
            gas, events = await _gas_of(anvil.rpc_url, alone.tx_hash)
            assert (gas, events) == (alone.gas_used, 1)
            txs.add(alone.tx_hash)
        assert len(txs | {batch_row.tx_hash}) == 3, "one transaction each"
        individual_gas = rows[-1][1].gas_used  # the first anchoring also paid batchCount 0 → 1
        assert individual_gas is not None
        assert batch_gas / 3 < individual_gas, "batching is cheaper per record"
        with capsys.disabled():  # the gas used, shown in the test log
            print(f"\ngas per record: individual {individual_gas}, batch of 3 {batch_gas / 3:.0f}")

        # -- private: booked, never batched, never published --------------------------------
        for reply in private:
            row = _row(ledger, reply)
            assert (row["settlement_mode"], row["booking"], row["batch_id"]) == ("private", 1, None)
            with pytest.raises(BatchConflictError):
                ledger.create_batch(
                    "0x" + envelope_leaf(reply.envelope).hex(),
                    [BatchMember(reply.request_id, reply.envelope.node_id, 0, row["leaf_hash"])],  # type: ignore[arg-type]
                )
        assert ledger.unbatched(100, "batch") == [] and ledger.unbatched(100, "individual") == []
        assert ledger.count() == 7

        # -- what was published: three batches, every anchored record, no private one -------
        on_chain = await SettlementChain.connect(chain_settings(anvil, contract))
        try:
            assert await on_chain.batch_count() == 3
        finally:
            await on_chain.close()
        files = _published_dir(publish_dir)
        topic = [
            PublishedBatch.model_validate_json(v)
            for _, v in await published_on_topic(broker.bootstrap, topics.batches)
        ]
        assert sorted(b.batch_index for b in files) == [0, 1, 2]
        assert sorted(topic, key=lambda b: b.batch_index) == sorted(
            files, key=lambda b: b.batch_index
        )
        for reply in individual + batch:
            assert sum(_holds(b, reply) for b in files) == 1
        for reply in private:
            assert not any(_holds(b, reply) for b in files)

        # -- receipts -------------------------------------------------------------------------
        chain = chain_settings(anvil, contract)
        for reply in batch + individual:
            (receipt,) = receipts_for(ledger, reply.request_id, chain)
            assert receipt.status == "anchored" and receipt.booked
            assert receipt.settlement_mode == reply.envelope.settlement
            assert receipt.envelope == reply.envelope
            assert (receipt.signature, receipt.chain_signature) == (
                reply.signature,
                reply.chain_signature,
            )
            assert receipt.batch is not None and receipt.batch.published
            assert receipt.batch.count == (3 if reply in batch else 1)
            assert receipt.inclusion is not None
            assert all(c.ok for c in check_inclusion_offline(receipt.inclusion, reply))
            assert receipt.inclusion.batch.tx_hash == receipt.batch.tx_hash
        for reply in private:
            (receipt,) = receipts_for(ledger, reply.request_id, chain)
            assert (receipt.status, receipt.booked, receipt.settlement_mode) == (
                "booked",
                True,
                SettlementMode.PRIVATE,
            )
            assert receipt.batch is None and receipt.inclusion is None
            assert receipt.chain_signature == reply.chain_signature
        assert receipts_for(ledger, "never-asked", chain) == []

        # -- the CLI prints the same receipt, and exits 1 for an unknown request -------------
        monkeypatch.setenv("OG_SETTLEMENT_LEDGER_URL", settings.ledger_url)
        monkeypatch.setenv("OG_SETTLEMENT_CHAIN__CONTRACT_ADDRESS", contract)
        state = ["--state-dir", str(tmp_path / "no-stack")]
        capsys.readouterr()
        assert main(["settlement", "receipt", batch[0].request_id, *state]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["status"] == "anchored" and printed["inclusion"]["root"] == batch_row.root
        assert main(["settlement", "receipt", private[0].request_id, *state]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert (printed["settlement_mode"], printed["batch"], printed["inclusion"]) == (
            "private",
            None,
            None,
        )
        assert main(["settlement", "receipt", "never-asked", *state]) == 1
        assert "never-asked" not in capsys.readouterr().err
