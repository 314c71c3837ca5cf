"""The ZKML verification mode: ``ZkmlModeHandler`` plugs into ``Pipeline(modes=...)``.

``accepts`` is true only for ONNX models whose circuit artifacts are prepared; ``signed``
queues a proof of the result the pipeline just signed and returns at once. The proof record
follows later on the settlement topic (``proof_publisher``).

``prepare_circuits`` builds or loads every configured model's circuit at start-up, in child
processes (EZKL holds the GIL for seconds), so the event loop keeps running meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.kafka.ports import Producer
from infra.lifecycle import Supervisor
from schemas import topics as t
from schemas.codec import encode
from schemas.proofs import ProofRecord
from schemas.requests import InferenceRequest, MLInput
from schemas.results import MLOutput, ResultEnvelope
from schemas.topics import Topics
from schemas.version import SCHEMA_VERSION
from worker.engines.base import EngineResult
from worker.modelstore.cache import ModelCache
from worker.modelstore.refs import ModelFormat
from worker.zkml.artifacts import PreparedCircuit, load_prepared
from worker.zkml.child import ChildFailed, run_child
from worker.zkml.prover import (
    ProofJob,
    ProofMetrics,
    ProofPublish,
    ProofQueue,
    ProofSigner,
    SubmitOutcome,
)
from worker.zkml.settings import ZkSettings
from worker.zkml.srs import DevSrs, SrsFile, SrsSource

__all__ = [
    "ZkConfigError",
    "ZkmlModeHandler",
    "prepare_circuits",
    "proof_publisher",
    "srs_source",
]

log = logging.getLogger(__name__)


class ZkConfigError(ValueError):
    """The ZKML settings name a model this worker cannot prove (not served, not ONNX)."""


class ZkmlModeHandler:
    """Implements ``worker.pipeline.ModeHandler`` for ``VerificationMode.ZKML``."""

    def __init__(
        self,
        circuits: Mapping[str, PreparedCircuit],
        signer: ProofSigner,
        publish: ProofPublish,
        settings: ZkSettings,
        *,
        metrics: ProofMetrics | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        self.circuits = dict(circuits)
        self.queue = ProofQueue(signer, publish, settings, metrics=metrics)
        self._supervisor = supervisor

    def start(self) -> None:
        self.queue.start(self._supervisor.spawn if self._supervisor is not None else None)

    async def close(self, drain_timeout_s: float) -> None:
        await self.queue.close(drain_timeout_s)

    def accepts(self, model: str) -> bool:
        return model in self.circuits

    def signed(
        self, request: InferenceRequest, result: EngineResult, envelope: ResultEnvelope
    ) -> None:
        try:
            self.submit(request, result, envelope)
        except Exception as e:  # the signed result must go out whatever happens to its proof
            log.error(
                "proof not queued",
                extra={"request_id": request.request_id, "error_type": type(e).__name__},
            )

    def submit(
        self, request: InferenceRequest, result: EngineResult, envelope: ResultEnvelope
    ) -> SubmitOutcome:
        """``signed``, returning the typed outcome (for callers that want it)."""
        circuit = self.circuits.get(request.model)
        payload, output = request.payload, result.output
        if circuit is None or not isinstance(payload, MLInput) or not isinstance(output, MLOutput):
            self.queue.stats[SubmitOutcome.NOT_PROVABLE.value] += 1
            return SubmitOutcome.NOT_PROVABLE
        return self.queue.submit(ProofJob(circuit, envelope, payload, output))


def srs_source(settings: ZkSettings) -> SrsSource:
    """The configured SRS file, else a dev SRS when allowed; ``ZkConfigError`` otherwise."""
    if settings.srs_path is not None and settings.srs_label is not None:
        return SrsFile(settings.srs_path, settings.srs_label)
    if not settings.allow_dev_srs:
        raise ZkConfigError("no SRS: set zk.srs_path and zk.srs_label (or zk.allow_dev_srs)")
    return DevSrs()


async def prepare_circuits(
    settings: ZkSettings, cache: ModelCache, served: list[str], cache_dir: Path
) -> dict[str, PreparedCircuit]:
    """The circuit of every model to serve in ZKML mode (``settings.models``, or every served
    ONNX model), prepared in child processes when missing and ``prepare_on_start``; models
    without artifacts otherwise are left out (and answer ``unsupported_mode``)."""
    index = await asyncio.to_thread(cache.hub.index)
    refs = {ref.name: ref for ref in index.models if ref.name in served}
    names = settings.models or [n for n, r in refs.items() if r.format is ModelFormat.ONNX]
    if bad := [n for n in names if n not in refs or refs[n].format is not ModelFormat.ONNX]:
        raise ZkConfigError(f"zk.models names models that are not served ONNX models: {bad}")
    root = settings.artifacts_root(cache_dir)
    srs = srs_source(settings)
    circuits: dict[str, PreparedCircuit] = {}
    for name in names:
        ref = refs[name]
        found = await asyncio.to_thread(load_prepared, root, ref.digest, settings.circuit, srs)
        if found is None and settings.prepare_on_start:
            found = await _prepare_in_child(settings, cache, ref, root, srs)
        if found is None:
            log.warning("no ZKML circuit; model served without ZKML", extra={"model": name})
            continue
        circuits[name] = found
        log.info("ZKML circuit ready", extra={"model": name, "srs": found.manifest.srs_label})
    return circuits


async def _prepare_in_child(
    settings: ZkSettings, cache: ModelCache, ref: Any, root: Path, srs: SrsSource
) -> PreparedCircuit | None:
    cached = await asyncio.to_thread(cache.materialize, ref)
    try:
        with tempfile.TemporaryDirectory(prefix="og-zk-prepare-") as tmp:
            result = await run_child(
                {
                    "kind": "prepare",
                    "model_path": str(cached.path),
                    "model_id": ref.name,
                    "model_digest": ref.digest,
                    "options": settings.circuit.model_dump(mode="json"),
                    "root": str(root),
                    "srs": None
                    if isinstance(srs, DevSrs)
                    else {"path": str(srs.path), "label": srs.label},
                    "lock_timeout_s": settings.prepare_timeout_s,
                },
                Path(tmp),
                timeout_s=settings.prepare_timeout_s,
                threads=settings.prover_threads,
            )
    except ChildFailed as e:
        log.error("ZKML preparation failed", extra={"model": ref.name, "error": str(e)})
        return None
    finally:
        cached.release()
    if not result.get("ok"):
        log.error("ZKML preparation failed", extra={"model": ref.name, "error": result})
        return None
    return await asyncio.to_thread(load_prepared, root, ref.digest, settings.circuit, srs)


def proof_publisher(producer: Producer, topics: Topics) -> ProofPublish:
    """Publish proof records on ``<ns>.settlement`` (key: request id), acknowledged."""
    headers = [(t.HEADER_SCHEMA_VERSION, str(SCHEMA_VERSION).encode())]

    async def publish(record: ProofRecord) -> None:
        await producer.send_and_wait(
            topics.settlement,
            encode(record),
            key=record.claims.request_id.encode(),  # beside its result's record
            headers=headers,
        )

    return publish
