"""Which nodes settlement accepts records from: a live registry view plus policy.

Settlement reads the registry topic itself (``infra.kafka.reader.TopicReader``) and rejects
records from unknown, stale, revoked or (when required) unattested nodes; the rules are in
``schemas.verify.registry``. A record from a node the view does not know yet may simply have
overtaken its registration (they travel on different topics), so before rejecting
``unknown_node`` the service waits up to ``unknown_node_wait_s`` for the view to move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field

from infra.kafka.ports import Kafka
from infra.kafka.reader import TopicReader
from schemas.base import VerificationMode
from schemas.registry import NodeRegistration
from schemas.verify.attestation import AttestationPolicySettings, registration_check
from schemas.verify.registry import RegistryPolicy, RegistryView

__all__ = ["NodeRegistry", "RegistrySettings"]


class RegistrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    required: bool = Field(
        default=True,
        description="reject records from nodes without a valid registration on the registry "
        "topic; turn off only for a closed test network",
    )
    stale_after_intervals: float = Field(
        default=3.0,
        gt=0,
        description="a node is stale this many heartbeat intervals after its last",
    )
    require_attestation: bool = Field(
        default=False, description="accept records only from nodes whose attestation verifies"
    )
    authorities: list[str] = Field(
        default_factory=list, description="ed25519 keys (hex) whose revocations are honoured"
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

    def policy(
        self, attestation_check: Callable[[NodeRegistration], bool] | None = None
    ) -> RegistryPolicy:
        return RegistryPolicy(
            stale_after_intervals=self.stale_after_intervals,
            require_attestation=self.require_attestation,
            attestation_check=attestation_check,
            authorities=frozenset(self.authorities),
            revoked_nodes=frozenset(self.revoked_nodes),
        )


class NodeRegistry:
    """Lifecycle wrapper (``start``/``stop``) around the registry reader, with the
    unknown-node wait."""

    def __init__(
        self,
        kafka: Kafka,
        topic: str,
        settings: RegistrySettings,
        attestation_check: Callable[[NodeRegistration], bool] | None = None,
    ) -> None:
        self.settings = settings
        check = attestation_check or registration_check(settings.attestation.policy())
        self.view = RegistryView(settings.policy(check))
        self.reader = TopicReader(kafka.consumer(None), topic, self.view.apply)

    async def start(self) -> None:
        await self.reader.start(self.settings.catch_up_timeout_s)

    async def stop(self) -> None:
        await self.reader.stop()

    @property
    def healthy(self) -> bool:
        """False once the registry reader died: the view no longer follows the topic."""
        return self.reader.healthy

    def check_record(self, node_id: str, signed_unix_ms: int, mode: VerificationMode) -> str | None:
        return self.view.check_record(node_id, signed_unix_ms, mode)

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
