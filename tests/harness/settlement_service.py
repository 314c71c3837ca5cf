"""The settlement service in-process on any Kafka port, for contract scenarios.

``SettlementRun`` builds a ``SettlementService`` on a ``KafkaEnv`` (optionally through an
``AuditedKafka``), runs it as a task and stops it as the CLI does (``stop``, then ``close``).
Its admission authority (a signed list beside the ledger) admits the ``admitted`` nodes only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from infra.kafka.ports import Kafka
from infra.kafka.settings import KafkaSettings
from schemas.topics import Topics
from settlement.app import SettlementService
from settlement.nodes import RegistrySettings
from settlement.settings import SettlementSettings
from tests.harness.admission import AdmissionFile
from tests.harness.kafka_env import KafkaEnv, TansuEnv
from tests.harness.nodes import TestNode

__all__ = ["SettlementRun"]


class SettlementRun:
    def __init__(
        self,
        env: KafkaEnv,
        topics: Topics,
        ledger_path: Path,
        *,
        group: str | None = None,
        admitted: Iterable[TestNode] = (),
        registry: RegistrySettings | None = None,
        kafka: Kafka | None = None,
        max_batch: int = 500,
        admission_max_stale_s: float = 60.0,
    ) -> None:
        self.admission = AdmissionFile(ledger_path.with_name("admission.json"))
        self.admission.admit_all((n.node_id, n.chain_address) for n in admitted)
        settings = SettlementSettings(
            namespace=topics.namespace,
            # Used for the health probe only; clients come from ``kafka``.
            kafka=env.settings if isinstance(env, TansuEnv) else KafkaSettings(),
            group_id=group or f"{topics.namespace}-settlement",
            ledger_url=str(ledger_path),
            registry=registry or RegistrySettings(),
            admission=self.admission.settings(max_stale_s=admission_max_stale_s),
            max_batch=max_batch,
            anchor=False,
        )
        self.service = SettlementService(settings, kafka=kafka or env.kafka)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> SettlementService:
        await self.service.setup()
        self._task = asyncio.create_task(self.service.run())
        return self.service

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None, "start() first"
        return self._task

    async def stop(self) -> None:
        """Stop and close; re-raises what ``run`` raised."""
        try:
            if self._task is not None:
                self.service.stop()
                async with asyncio.timeout(30):
                    await self._task
        finally:
            self._task = None
            await self.service.close()
