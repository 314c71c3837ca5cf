"""What a client trusts: the admission authority's facts and the registry, kept current.

``ClientTrust`` follows the registry topic (registrations, with the time this client read
each) and refreshes admission facts (``infra.admission``) in the background; ``snapshot()``
gives ``schemas.verify.result.Trust`` for verifying one reply now. If either background task
dies, ``require_healthy`` raises: a client must not keep sealing prompts to, or accepting
answers from, nodes judged on facts that stopped moving.
"""

from __future__ import annotations

import time

from infra.admission import AdmissionKeeper, AdmissionSettings
from infra.kafka.ports import Kafka
from infra.kafka.reader import TopicReader
from infra.lifecycle import Supervisor
from schemas.verify.admission import Admissions
from schemas.verify.attestation import AttestationPolicySettings, registration_verdict
from schemas.verify.registry import RegistryPolicy, RegistryView
from schemas.verify.result import Trust

__all__ = ["ClientTrust", "TrustUnavailable"]


class TrustUnavailable(RuntimeError):
    """The registry reader or the admission refresher stopped: nothing can be verified."""


class ClientTrust:
    def __init__(
        self,
        kafka: Kafka,
        registry_topic: str,
        admission: AdmissionSettings,
        attestation: AttestationPolicySettings,
    ) -> None:
        policy = attestation.policy()
        self.view = RegistryView(
            RegistryPolicy(
                attestation_check=registration_verdict(
                    policy,
                    approved=lambda kind, m: self.view.admissions.measurement_approved(kind, m),
                )
            )
        )
        self._reader = TopicReader(kafka.consumer(None), registry_topic, self.view.apply)
        self._admission_settings = admission
        self._keeper: AdmissionKeeper | None = None
        self._supervisor = Supervisor()

    def _facts(self, facts: Admissions) -> None:
        self.view.admissions = facts

    async def start(self) -> None:
        try:
            self._keeper = AdmissionKeeper.of(self._admission_settings, self._facts)
        except ValueError as e:
            raise TrustUnavailable(f"admission: {e}") from e
        await self._keeper.refresh()
        self._supervisor.spawn("admission", self._keeper.run())
        await self._reader.start()

    async def close(self) -> None:
        await self._supervisor.stop()
        await self._reader.stop()
        if self._keeper is not None:
            await self._keeper.close()

    @property
    def healthy(self) -> bool:
        keeper = self._keeper
        return (
            self._reader.healthy
            and self._supervisor.healthy
            and keeper is not None
            and keeper.healthy
        )

    def require_healthy(self) -> None:
        if not self.healthy:
            raise TrustUnavailable("the registry or admission facts stopped updating")

    def snapshot(self) -> Trust:
        return Trust(self.view.admissions, time.time_ns() // 1_000_000, self.view)
