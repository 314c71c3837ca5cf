"""Registration and heartbeats on the compacted ``<ns>.registry`` topic.

The worker publishes its signed registration (keys, models, attestation) and waits for the
broker's acknowledgement before it subscribes to any request topic: it serves nothing before
the network can know it. A heartbeat re-publishes the same record with a new
``heartbeat_unix_ms`` every ``interval_s``; on shutdown the node publishes ``draining`` so
clients stop sealing new requests to it while it finishes the ones it holds.

A heartbeat that fails to publish is logged and retried at the next tick, not fatal: the node
keeps answering, and readiness (``published_recently``) turns false so an orchestrator notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version

from infra.kafka.ports import Producer
from schemas.attestation import Attestation
from schemas.codec import encode
from schemas.registry import (
    REGISTRATION_DOMAIN,
    NodeRegistration,
    NodeStatus,
    RegisteredModel,
    RegistrationRecord,
    registration_key,
)
from schemas.signing import Signer
from schemas.topics import HEADER_SCHEMA_VERSION
from schemas.version import SCHEMA_VERSION

__all__ = ["Registrar", "software_version"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _sequence(previous: int) -> int:
    """The next registration sequence: above the last one, and derived from the clock in
    microseconds so that it also grows across restarts (verifiers ignore anything not above
    the latest they accepted, so a restarted node must never go back)."""
    return max(previous + 1, time.time_ns() // 1000)


def software_version() -> str:
    try:
        return version("verifiable-inference-node")
    except PackageNotFoundError:
        return "0+unknown"


class Registrar:
    def __init__(
        self,
        producer: Producer,
        topic: str,
        signer: Signer,
        *,
        x25519_public_key: str,
        chain_address: str,
        models: Sequence[RegisteredModel],
        attestation: Attestation | None,
        interval_s: float,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._signer = signer
        self._interval_s = interval_s
        self._clock_ms = clock_ms
        now = clock_ms()
        self._registration = NodeRegistration(
            node_id=signer.node_id,
            x25519_public_key=x25519_public_key,
            chain_address=chain_address,
            models=list(models),
            software_version=software_version(),
            attestation=attestation,
            started_unix_ms=now,
            heartbeat_unix_ms=now,
            heartbeat_interval_s=interval_s,
            sequence=_sequence(0),
        )
        self.last_published_ms: int | None = None
        self._stopped = asyncio.Event()

    @property
    def registration(self) -> NodeRegistration:
        return self._registration

    def published_recently(self) -> bool:
        """True when the last heartbeat went out within two intervals (for readiness)."""
        last = self.last_published_ms
        return last is not None and self._clock_ms() - last <= 2 * self._interval_s * 1000

    def update_attestation(self, attestation: Attestation | None) -> None:
        """New evidence (re-attestation); published with the next heartbeat."""
        self._registration = self._registration.model_copy(update={"attestation": attestation})

    async def publish(self, status: NodeStatus = "active") -> None:
        """Publish the registration with a fresh heartbeat; returns once acknowledged."""
        self._registration = self._registration.model_copy(
            update={
                "heartbeat_unix_ms": self._clock_ms(),
                "status": status,
                "sequence": _sequence(self._registration.sequence),
            }
        )
        record = RegistrationRecord(
            registration=self._registration,
            signature=self._signer.sign(REGISTRATION_DOMAIN, self._registration),
        )
        await self._producer.send_and_wait(
            self._topic,
            encode(record),
            key=registration_key(self._signer.node_id),
            headers=[(HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())],
        )
        self.last_published_ms = self._registration.heartbeat_unix_ms

    async def run(self) -> None:
        """Heartbeat until ``stop()``."""
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._stopped.wait()
            if self._stopped.is_set():
                return
            try:
                await self.publish()
            except Exception as e:
                log.error("heartbeat not published", extra={"error_type": type(e).__name__})

    def stop(self) -> None:
        self._stopped.set()
