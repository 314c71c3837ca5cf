"""Composition root of the worker: ``Worker.setup`` builds every object from settings.

Nothing is created at import time. Lifecycle: ``setup()`` → ``run()`` → ``stop()`` (from a
signal) → ``close()``. Stopping goes in a stated order: announce ``draining`` on the registry
(clients stop sealing to this node), stop fetching, finish in-flight work within
``drain_timeout_s``, commit, leave the group, then close the producer and the engines.

Background tasks (heartbeats, re-attestation, the intake's commit loop and metrics sampler)
are supervised: one that dies fails readiness and stops the worker (exit non-zero).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
from pathlib import Path

from nacl.public import PublicKey

from infra.admission import AdmissionKeeper
from infra.health import HealthServer, kafka_reachable
from infra.kafka.client import ClusterKafka
from infra.kafka.ports import Consumer, Kafka, Producer
from infra.lifecycle import Supervisor, clear_ready, install_stop_handlers, mark_ready
from infra.tracing import Tracer, Tracing, configure_tracing
from schemas.attestation import Attestation
from schemas.base import VerificationMode
from schemas.registry import RegisteredModel
from schemas.signing import ChainSigner
from schemas.topics import Topics
from schemas.verify.admission import admission_problem
from schemas.verify.attestation import AttestationPolicy, verify_node_attestation
from worker.engines.base import Engine
from worker.handler import RecordHandler
from worker.identity import (
    AttestationFatal,
    chain_address,
    chain_key,
    dlq_public_key,
    node_attestation,
    node_sealer,
    node_signer,
)
from worker.intake import Intake, IntakeConfig
from worker.metrics import WorkerMetrics
from worker.modelstore.service import build_engines, open_cache
from worker.modelstore.stats import CacheMetrics
from worker.observe import RecordObserver
from worker.pipeline import ModeHandler, Pipeline
from worker.publish import Publisher
from worker.registration import Registrar, software_version
from worker.replies import ReplyTopics, TopicDirectory
from worker.settings import WorkerSettings
from worker.trust.tee import TeeMode
from worker.zkml.handler import ZkmlModeHandler

__all__ = [
    "Worker",
    "WorkerFatal",
    "compose_intake",
    "load_engines",
    "serve",
    "tune_gc",
]

log = logging.getLogger(__name__)

_DRAINING_PUBLISH_TIMEOUT_S = 5.0


class WorkerFatal(Exception):
    """The worker cannot go on safely; the process should exit non-zero."""


async def load_engines(
    settings: WorkerSettings, metrics: WorkerMetrics | None = None
) -> dict[str, Engine]:
    """Resolve every served model through the configured hub (local directory, or HTTP when
    ``cache.hub_url`` is set) into the shared cache at ``cache_dir``; pre-warmed models are
    loaded now, the others on their first request (see ``worker.modelstore.service``)."""
    if metrics is not None and settings.cache.budget_bytes is not None:
        metrics.set_cache_budget(settings.cache.budget_bytes)
    cache = open_cache(
        settings.hub_dir,
        settings.cache_dir,
        settings.cache,
        metrics=CacheMetrics((metrics.on_cache_event,)) if metrics is not None else None,
    )
    engines: dict[str, Engine] = await build_engines(cache, settings.models, settings.cache)
    from worker.proxy import load_proxy_engines  # LLM proxy (docs/PROXY.md)

    if clash := {m.name for m in settings.proxy.models} & engines.keys():
        for engine in engines.values():
            await engine.close()
        raise WorkerFatal(f"proxied models clash with hub models: {sorted(clash)}")
    engines.update(await load_proxy_engines(settings.proxy, metrics=metrics))
    if metrics is not None:
        _observe_batches(engines, metrics)
    return engines


def _observe_batches(engines: dict[str, Engine], metrics: WorkerMetrics) -> None:
    """Feed og_worker_engine_batch_requests from every loaded vLLM engine (pre-warmed ones:
    the default, and what a vLLM deployment wants; a model loaded on demand is not seen)."""
    import sys

    vllm = sys.modules.get("worker.engines.vllm")  # loaded only where a vLLM model is
    if vllm is None:
        return
    for name, engine in engines.items():
        if isinstance(engine, vllm.VLLMEngine):
            engine.observe_batches(functools.partial(metrics.engine_step, name))


def _registered_models(
    engines: dict[str, Engine],
    modes: dict[VerificationMode, ModeHandler],
    private: frozenset[str],
) -> list[RegisteredModel]:
    return [
        RegisteredModel(
            name=name,
            digest=engine.model_digest,
            modes=[VerificationMode.VANILLA, *(m for m, h in modes.items() if h.accepts(name))],
            private=name in private,
        )
        for name, engine in engines.items()
    ]


def compose_intake(
    consumer: Consumer,
    producer: Producer,
    pipeline: Pipeline,
    topics: Topics,
    config: IntakeConfig,
    *,
    dlq_key: PublicKey,
    dedupe_window: int = 10_000,
    reply_topic_prefixes: list[str] | None = None,
    metrics: WorkerMetrics | None = None,
    tracer: Tracer | None = None,
) -> Intake:
    """The intake and what it drives (publisher, record handler, observer), wired as the
    worker wires them; the caller subscribes ``consumer`` with ``intake.rebalance_listener()``."""
    publisher = Publisher(producer, topics, dlq_key, metrics=metrics)
    reply_topics = ReplyTopics(
        topics, reply_topic_prefixes, TopicDirectory(consumer.partitions_for)
    )
    handler = RecordHandler(
        pipeline,
        topics,
        publisher.publish_chunk,
        dedupe_window=dedupe_window,
        reply_topics=reply_topics,
    )
    observer = RecordObserver(topics, metrics, tracer if tracer is not None else Tracer())
    return Intake(consumer, publisher, handler, observer, config, metrics=metrics)


class Worker:
    def __init__(self, settings: WorkerSettings, kafka: Kafka | None = None) -> None:
        self.settings = settings
        self.kafka: Kafka = kafka if kafka is not None else ClusterKafka(settings.kafka)
        self.signer = node_signer(settings)
        self.sealer = node_sealer(settings)
        self.engines: dict[str, Engine] = {}
        self.intake: Intake | None = None
        self.registrar: Registrar | None = None
        self.tee: TeeMode | None = None
        self.metrics = WorkerMetrics()
        self.health: HealthServer | None = None
        self.tracing: Tracing | None = None
        self.zkml: ZkmlModeHandler | None = None
        self.supervisor = Supervisor(on_failure=lambda _name: self.stop())
        self._producer: Producer | None = None
        self._consumer: Consumer | None = None
        self._stop_requested = False
        self._draining: asyncio.Task[None] | None = None
        self.admission: AdmissionKeeper | None = None
        self._chain_address = ""
        self._own_measurement: tuple[str, str] | None = None

    async def setup(self) -> None:
        s = self.settings
        if s.metrics_port is not None:
            # First, so probes answer (not ready) while models load.
            self.health = HealthServer(
                host=s.metrics_host,
                port=s.metrics_port,
                registry=self.metrics.registry,
                ready={
                    "models_loaded": lambda: bool(self.engines),
                    "broker_reachable": kafka_reachable(s.kafka),
                    "registration_published": lambda: (
                        self.registrar is not None and self.registrar.published_recently()
                    ),
                    "consuming": lambda: self.intake is not None and not self._stop_requested,
                    "admitted": lambda: self.admitted,
                    "admission_current": lambda: (
                        self.admission is not None and self.admission.healthy
                    ),
                    "background_tasks": lambda: (
                        self.supervisor.healthy and (self.intake is None or self.intake.healthy)
                    ),
                },
            )
            await self.health.start()
        self.tracing = configure_tracing(s.tracing)
        self.metrics.set_node(self.signer.node_id, software_version())
        self.engines = await load_engines(s, self.metrics)
        private = frozenset(s.private_models)
        if not private <= self.engines.keys():
            raise WorkerFatal("private_models names a model this worker does not serve")
        self._producer = self.kafka.producer()
        await self._producer.start()
        address = await asyncio.to_thread(chain_address, s)
        attestation = await self._attest(address)
        self._own_measurement = self._measurement(attestation, address)
        self.tee = TeeMode(attestation, allow_dev=s.attestation.allow_dev_tee)
        modes: dict[VerificationMode, ModeHandler] = {VerificationMode.TEE: self.tee}
        if s.zk.enabled:
            self.zkml = await self._zkml()
            modes[VerificationMode.ZKML] = self.zkml
        pipeline = Pipeline(
            self.engines,
            self.signer,
            ChainSigner(chain_key(s)),
            retries=s.engine_retries,
            retry_backoff_s=s.engine_retry_backoff_ms / 1000,
            modes=modes,
            sealer=self.sealer,
            private_models=private,
            max_execution_s=s.max_execution_s,
            max_request_age_s=s.max_request_age_s,
            admitted=lambda: self.admitted,
        )
        self.registrar = Registrar(
            self._producer,
            s.topics.registry,
            self.signer,
            x25519_public_key=self.sealer.public_key_hex,
            chain_address=address,
            models=_registered_models(self.engines, modes, private),
            attestation=attestation,
            interval_s=s.heartbeat_interval_s,
        )
        # Registered before subscribing: the node serves nothing the network cannot know.
        await self.registrar.publish()
        self.supervisor.spawn("heartbeats", self.registrar.run(), may_return=True)
        # And admitted before subscribing: an authority must count this node first.
        await self._await_admission(address)
        if attestation is not None:
            self.supervisor.spawn("re-attestation", self._reattest(address))
        self._consumer = self.kafka.consumer(s.group_id)
        self.intake = compose_intake(
            self._consumer,
            self._producer,
            pipeline,
            s.topics,
            IntakeConfig(
                window_per_partition=s.window_per_partition,
                max_in_flight=s.max_in_flight,
                commit_interval_s=s.commit_interval_ms / 1000,
                drain_timeout_s=s.drain_timeout_s,
                revoke_timeout_s=s.revoke_timeout_s,
            ),
            dlq_key=dlq_public_key(s),
            dedupe_window=s.dedupe_window,
            reply_topic_prefixes=s.reply_topic_prefixes,
            metrics=self.metrics,
            tracer=self.tracing.tracer,
        )
        self._consumer.subscribe(
            [s.topics.infer(m) for m in self.engines], self.intake.rebalance_listener()
        )
        await self._consumer.start()
        if self._stop_requested:
            self.intake.stop()
        log.info("worker ready", extra={"node_id": self.signer.node_id, "models": s.models})

    async def _await_admission(self, address: str) -> None:
        """Wait until the admission authority counts this node (polling its facts), then keep
        them fresh: after a revocation the node answers ``not_admitted``."""
        s = self.settings
        try:
            self.admission = AdmissionKeeper.of(s.admission)
        except ValueError as e:
            raise WorkerFatal(f"admission: {e}") from e
        self._chain_address = address
        waited = False
        while not self._stop_requested:
            await self.admission.refresh()
            if self.admitted:
                break
            if not waited:
                log.warning(
                    "waiting for admission",
                    extra={"node_id": self.signer.node_id, "chain_address": address},
                )
                waited = True
            await asyncio.sleep(min(1.0, s.admission.refresh_interval_s))
        self.supervisor.spawn("admission", self.admission.run())

    @property
    def admitted(self) -> bool:
        """Whether the admission authority counts this node now (by explicit admission of
        its node id and chain address; or, for a node with TEE evidence, by an approved
        measurement of that evidence)."""
        if self.admission is None:
            return False
        attested = None
        if self.registrar is not None and self.registrar.registration.attestation is not None:
            attested = self._own_measurement
        problem = admission_problem(
            self.admission.current, self.signer.node_id, self._chain_address, attested
        )
        return problem is None

    def _measurement(self, attestation: Attestation | None, address: str) -> tuple[str, str] | None:
        """(kind, measurement) of this node's own evidence, for admission by measurement."""
        if attestation is None:
            return None
        verdict = verify_node_attestation(
            node_id=self.signer.node_id,
            x25519_public_key=self.sealer.public_key_hex,
            chain_address=address,
            attestation=attestation,
            policy=AttestationPolicy(allow_dev=True, allow_debug=True),
        )
        return None if verdict.measurement is None else (verdict.kind, verdict.measurement)

    async def _attest(self, address: str) -> Attestation | None:
        try:
            return await node_attestation(
                self.settings, self.signer.node_id, self.sealer.public_key_hex, address
            )
        except AttestationFatal as e:
            raise WorkerFatal(str(e)) from e

    async def _reattest(self, address: str) -> None:
        """Fresh evidence every ``attestation.refresh_interval_s``, so verifiers' maximum
        evidence age is never reached while the node runs. A failure keeps the old evidence
        and is retried at the next tick (verifiers refuse it once it is too old)."""
        assert self.registrar is not None and self.tee is not None
        while True:
            await asyncio.sleep(self.settings.attestation.refresh_interval_s)
            try:
                attestation = await node_attestation(
                    self.settings, self.signer.node_id, self.sealer.public_key_hex, address
                )
            except AttestationFatal as e:
                log.error("re-attestation failed", extra={"error_type": type(e).__name__})
                continue
            self.tee.update(attestation)
            self._own_measurement = self._measurement(attestation, address)
            self.registrar.update_attestation(attestation)
            await self.registrar.publish()
            log.info("re-attested")

    async def _zkml(self) -> ZkmlModeHandler:
        """Prepare (or load from the cache) the circuits of the ONNX models, start the prover."""
        from worker.zkml import ZkConfigError, prepare_circuits, proof_publisher

        s = self.settings
        assert self._producer is not None
        try:
            circuits = await prepare_circuits(
                s.zk, open_cache(s.hub_dir, s.cache_dir, s.cache), list(self.engines), s.cache_dir
            )
        except ZkConfigError as e:
            raise WorkerFatal(str(e)) from e
        handler = ZkmlModeHandler(
            circuits,
            self.signer,
            proof_publisher(self._producer, s.topics),
            s.zk,
            metrics=self.metrics,
            supervisor=self.supervisor,
        )
        handler.start()
        return handler

    async def run(self) -> None:
        """Serve until ``stop()``; raise ``WorkerFatal`` if the worker stopped on a failure."""
        assert self.intake is not None, "setup() first"
        await self.intake.run()
        if self.intake.fatal is not None:
            raise WorkerFatal("the worker failed; exiting for a restart") from self.intake.fatal
        if not self.supervisor.healthy:
            raise WorkerFatal(f"a background task died: {sorted(self.supervisor.failures)}")

    def stop(self) -> None:
        """Stop gracefully (safe from a signal handler): announce ``draining`` first."""
        if self._stop_requested:
            return
        self._stop_requested = True
        self.supervisor.shutting_down()
        if self.registrar is not None and self._producer is not None:
            self.registrar.stop()
            self._draining = asyncio.get_running_loop().create_task(self._announce_draining())
        if self.intake is not None:
            self.intake.stop()

    async def _announce_draining(self) -> None:
        assert self.registrar is not None
        try:
            async with asyncio.timeout(_DRAINING_PUBLISH_TIMEOUT_S):
                await self.registrar.publish("draining")
        except Exception as e:
            log.warning("draining status not published", extra={"error_type": type(e).__name__})

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()  # leaves the group: partitions move at once
        if self._draining is not None:
            await self._draining
        await self.supervisor.stop()
        if self.admission is not None:
            await self.admission.close()
        if self.zkml is not None:
            await self.zkml.close(drain_timeout_s=self.settings.drain_timeout_s)
        if self._producer is not None:
            await self._producer.stop()
        for engine in self.engines.values():
            await engine.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)
        if self.health is not None:
            await self.health.stop()
        log.info("worker stopped")


def tune_gc() -> None:
    """Process-wide GC policy for a long-running worker, applied after start-up.

    Each request allocates many short-lived objects; with the default gen-0 threshold (700)
    the cyclic collector runs every few requests and re-scans every long-lived object
    (models, tokenizers, clients). Freezing what start-up built and raising the gen-0
    threshold measured ~+18% throughput on the intake benchmark.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


async def serve(settings: WorkerSettings, ready_file: Path | None = None) -> None:
    """Run a worker until SIGTERM/SIGINT; a second signal exits at once."""
    worker = Worker(settings)
    install_stop_handlers(worker.stop)
    try:
        await worker.setup()
        tune_gc()
        await mark_ready(ready_file, worker.signer.node_id)
        await worker.run()
    finally:
        await worker.close()
        await clear_ready(ready_file)
