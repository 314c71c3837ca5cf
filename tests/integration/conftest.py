"""Real-broker fixtures: a fresh namespace of topics per test, in-process worker and
settlement services wired exactly as the CLI wires them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from infra.dev.broker import BrokerProcess
from infra.kafka.admin import ensure_topics
from schemas.topics import standard_topics
from settlement.app import SettlementService
from settlement.settings import SettlementSettings
from tests.harness.admission import AdmissionFile
from tests.harness.support import fast_kafka
from worker.app import Worker
from worker.identity import chain_address, node_signer
from worker.settings import WorkerSettings

MODELS = ["demo-mlp", "demo-lm"]


@pytest.fixture
async def namespace(broker: BrokerProcess) -> str:
    ns = "t" + uuid.uuid4().hex[:12]
    await ensure_topics(broker.bootstrap, standard_topics(ns, MODELS))
    return ns


@pytest.fixture
def admission(tmp_path: Path) -> AdmissionFile:
    """The test deployment's pinned authority: it admits ``worker_settings``' node only."""
    return AdmissionFile(tmp_path / "admission.json")


@pytest.fixture
def worker_settings(
    broker: BrokerProcess,
    namespace: str,
    demo_hub: Path,
    tmp_path: Path,
    admission: AdmissionFile,
) -> WorkerSettings:
    settings = WorkerSettings(
        namespace=namespace,
        kafka=fast_kafka(broker.bootstrap),
        group_id=f"{namespace}-workers",
        models=MODELS,
        hub_dir=demo_hub,
        cache_dir=tmp_path / "cache",
        key_dir=tmp_path / "keys",
        admission=admission.settings(),
    )
    admission.admit(node_signer(settings).node_id, chain_address(settings))
    return settings


@pytest.fixture
def settlement_settings(
    broker: BrokerProcess, namespace: str, tmp_path: Path, admission: AdmissionFile
) -> SettlementSettings:
    return SettlementSettings(
        namespace=namespace,
        kafka=fast_kafka(broker.bootstrap),
        group_id=f"{namespace}-settlement",
        ledger_url=str(tmp_path / "ledger.sqlite3"),
        admission=admission.settings(),
    )


@pytest.fixture
async def running_worker(worker_settings: WorkerSettings) -> AsyncIterator[Worker]:
    worker = Worker(worker_settings)
    await worker.setup()
    task = asyncio.create_task(worker.run())
    yield worker
    worker.stop()
    await asyncio.wait_for(task, 30)
    await worker.close()


@pytest.fixture
async def running_settlement(
    settlement_settings: SettlementSettings,
) -> AsyncIterator[SettlementService]:
    service = SettlementService(settlement_settings)
    await service.setup()
    task = asyncio.create_task(service.run())
    yield service
    service.stop()
    await asyncio.wait_for(task, 30)
    await service.close()
