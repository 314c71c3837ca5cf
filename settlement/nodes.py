"""Which nodes settlement accepts records from: a live registry view, admission facts, policy.

Settlement reads the registry topic itself (``infra.kafka.reader.TopicReader``, stamping each
registration with its own receipt time) and keeps the admission authority's facts current
(``infra.admission``); the rules are in ``schemas.verify.registry``. A record from a node the
view does not know yet may simply have overtaken its registration (they travel on different
topics), so before rejecting ``unknown_node`` the service waits up to ``unknown_node_wait_s``
for the view to move.

Supervision: if the registry reader or the admission refresher dies, ``healthy`` turns false;
the service then fails readiness and commits nothing it judged on a view that stopped moving.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from infra.admission import AdmissionKeeper, AdmissionSettings
from infra.kafka.ports import Kafka
from infra.kafka.reader import TopicReader
from infra.lifecycle import Supervisor
from schemas.verify.admission import Admissions
from schemas.verify.attestation import AttestationPolicySettings, registration_verdict
from schemas.verify.registry import RegistryPolicy, RegistryView

__all__ = ["NodeRegistry", "RegistrySettings"]


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stale_after_intervals: float = Field(
        default=3.0,
        gt=0,
        description="a node is stale this many heartbeat intervals after its last",
    )
    require_attestation: bool = Field(
        default=False, description="accept records only from nodes whose attestation verifies"
    )
    revoked_nodes: list[str] = Field(
        default_factory=list, description="node ids whose records are always rejected"
    )
    unknown_node_wait_s: float = Field(
        default=5.0,
        ge=0,
        description="how long a record from an unknown node waits for its "
        "registration to arrive before it is rejected",
    )
    catch_up_timeout_s: float = Field(default=10.0, gt=0)
    attestation: AttestationPolicySettings = Field(
        default_factory=AttestationPolicySettings,
        description="which TEE evidence counts as attested (measurement allow-list, dev, age)",
    )


class NodeRegistry:
    """The node gate (``schemas.verify.record.NodeGate``) with its reader, its admission
    refresher and the unknown-node wait. Lifecycle: ``start`` → ``stop``."""

    def __init__(
        self,
        kafka: Kafka,
        topic: str,
        settings: RegistrySettings,
        admission: AdmissionSettings,
    ) -> None:
        self.settings = settings
        self.view = RegistryView(
            RegistryPolicy(
                stale_after_intervals=settings.stale_after_intervals,
                require_attestation=settings.require_attestation,
                attestation_check=registration_verdict(
                    settings.attestation.policy(),
                    approved=lambda kind, m: self.view.admissions.measurement_approved(kind, m),
                ),
                revoked_nodes=frozenset(settings.revoked_nodes),
            )
        )
        self.reader = TopicReader(kafka.consumer(None), topic, self.view.apply)
        # The node gate (``schemas.verify.record.NodeGate``) is the view's.
        self.check = self.view.check
        self.chain_address = self.view.chain_address
        self.admission = AdmissionKeeper.of(admission, self._admissions)

    def _admissions(self, facts: Admissions) -> None:
        self.view.admissions = facts

    async def start(self, supervisor: Supervisor) -> None:
        await self.admission.refresh()
        supervisor.spawn("admission", self.admission.run())
        await self.reader.start(self.settings.catch_up_timeout_s)

    async def stop(self) -> None:
        await self.reader.stop()
        await self.admission.close()

    @property
    def healthy(self) -> bool:
        """False once the registry reader died or admission facts stopped refreshing."""
        return self.reader.healthy and self.admission.healthy

    async def await_nodes(self, node_ids: set[str]) -> None:
        """Give registrations of ``node_ids`` the view does not know yet a bounded time to
        arrive (one wait per batch, not per record)."""
        if all(self.view.registration(n) is not None for n in node_ids):
            return
        deadline = asyncio.get_running_loop().time() + self.settings.unknown_node_wait_s
        while any(self.view.registration(n) is None for n in node_ids):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            if not await self.reader.wait_for_change(self.reader.version, remaining):
                return
