"""Proving off the fast path: a bounded queue, at most N proofs at once, each in a child
process; a finished proof becomes a signed ``ProofRecord`` handed to an async publish callable.

``submit`` never waits and returns a ``SubmitOutcome``:

- ``queued``: the proof will be attempted; its ``ProofOutcome`` is counted in ``stats``;
- ``queue_full``: ``queue_size`` proofs are already waiting; no proof will follow for this
  result (it stays signed and settled, without a proof record);
- ``not_provable``: the input or output does not fit the model's circuit (shape, dtype), or
  the signed hashes cannot be reproduced from them;
- ``closed``: the queue is shutting down.

The queue lives in memory: a crash loses waiting proofs, never results (already published).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from schemas.codec import encode
from schemas.fixedpoint import element_float, felt_to_int
from schemas.limits import MAX_MESSAGE_BYTES
from schemas.proofs import PROOF_DOMAIN, ProofClaims, ProofRecord
from schemas.requests import MLInput, input_hash
from schemas.results import MLOutput, ResultEnvelope, output_hash
from schemas.verify.zkml import instance_problem
from worker.zkml.artifacts import PreparedCircuit
from worker.zkml.child import ChildFailed, ChildTimeout, run_child
from worker.zkml.settings import ZkSettings

__all__ = [
    "ProofJob",
    "ProofMetrics",
    "ProofOutcome",
    "ProofPublish",
    "ProofQueue",
    "ProofSigner",
    "SubmitOutcome",
    "fits_circuit",
]

log = logging.getLogger(__name__)

ProofPublish = Callable[[ProofRecord], Awaitable[None]]
Spawn = Callable[[str, Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class ProofSigner(Protocol):
    """The node identity (``schemas.signing.Signer`` is one)."""

    @property
    def node_id(self) -> str: ...

    def sign(self, domain: bytes, value: Any) -> str: ...


class ProofMetrics(Protocol):
    """The proof counters of ``worker.metrics.WorkerMetrics``."""

    def proof_queued(self, model: str) -> None: ...

    def proof_published(self, model: str, seconds: float | None = None) -> None: ...

    def proof_failed(self, model: str) -> None: ...


class SubmitOutcome(StrEnum):
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"
    NOT_PROVABLE = "not_provable"
    CLOSED = "closed"


class ProofOutcome(StrEnum):
    PUBLISHED = "published"
    OUT_OF_RANGE = "out_of_range"
    """The input drives the circuit past its calibrated range: no sound proof exists."""
    WITNESS_FAILED = "witness_failed"
    PROVER_FAILED = "prover_failed"
    TIMEOUT = "timeout"
    OUTPUT_MISMATCH = "output_mismatch"
    """The circuit's output is further from the signed output than the model's tolerance."""
    TOO_LARGE = "too_large"
    PUBLISH_FAILED = "publish_failed"


@dataclass(frozen=True)
class ProofJob:
    circuit: PreparedCircuit
    envelope: ResultEnvelope
    payload: MLInput
    output: MLOutput
    queued_monotonic_s: float = field(default_factory=time.monotonic)


def fits_circuit(circuit: PreparedCircuit, payload: MLInput, output: MLOutput) -> bool:
    """True when every circuit input and output is present with the circuit's shape."""
    m = circuit.manifest
    for spec in m.inputs:
        tensor = payload.tensors.get(spec.name)
        want = "float64" if spec.input_type == "F64" else "float32"
        if tensor is None or tensor.dtype != want or tensor.shape != spec.shape:
            return False
    if set(payload.tensors) != {t.name for t in m.inputs}:
        return False
    if set(output.tensors) != {t.name for t in m.outputs}:
        return False
    for spec in m.outputs:
        out = output.tensors.get(spec.name)
        if out is None or out.dtype not in {"float32", "float64"} or out.shape != spec.shape:
            return False
    return True


class ProofQueue:
    def __init__(
        self,
        signer: ProofSigner,
        publish: ProofPublish,
        settings: ZkSettings,
        *,
        metrics: ProofMetrics | None = None,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        self._signer = signer
        self._publish = publish
        self._settings = settings
        self._metrics = metrics
        self._clock_ms = clock_ms
        self._queue: asyncio.Queue[ProofJob] = asyncio.Queue(maxsize=settings.queue_size)
        self._workers: list[asyncio.Task[None]] = []
        self._closed = False
        self.stats: Counter[str] = Counter()
        """How many submissions and proofs ended in each outcome (by its value)."""

    def start(self, spawn: Spawn | None = None) -> None:
        """Start the provers; ``spawn`` (a ``Supervisor.spawn``) supervises them, so a prover
        that dies fails the worker's readiness instead of leaving proofs silently queued."""
        spawn = spawn or (lambda name, coro: asyncio.create_task(coro, name=name))
        self._workers = [
            spawn(f"zk-prover-{i}", self._work())
            for i in range(self._settings.max_concurrent_proofs)
        ]

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, job: ProofJob) -> SubmitOutcome:
        """Queue ``job`` without waiting (safe from the pipeline's hot path)."""
        model = job.envelope.model_id
        if self._closed:
            outcome = SubmitOutcome.CLOSED
        elif (
            not fits_circuit(job.circuit, job.payload, job.output)
            or input_hash(job.payload) != job.envelope.input_hash
            or output_hash(job.output) != job.envelope.output_hash
        ):
            outcome = SubmitOutcome.NOT_PROVABLE
        else:
            try:
                self._queue.put_nowait(job)
                outcome = SubmitOutcome.QUEUED
            except asyncio.QueueFull:
                outcome = SubmitOutcome.QUEUE_FULL
        self.stats[outcome.value] += 1
        if self._metrics is not None:
            self._metrics.proof_queued(model)
            if outcome is not SubmitOutcome.QUEUED:
                self._metrics.proof_failed(model)
        if outcome is not SubmitOutcome.QUEUED:
            log.warning(
                "proof not queued",
                extra={"request_id": job.envelope.request_id, "outcome": outcome.value},
            )
        return outcome

    async def close(self, drain_timeout_s: float) -> None:
        """Stop taking jobs, give queued ones ``drain_timeout_s`` to finish, then cancel the
        rest (their child processes are killed)."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout_s):
                await self._queue.join()
        for task in self._workers:
            task.cancel()
        if self._workers:
            await asyncio.wait(self._workers, timeout=max(1.0, drain_timeout_s / 4))
        self._workers = []

    async def _work(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                outcome = await self.prove(job)
            except Exception as e:  # a bug must not kill the prover: count it and go on
                log.error("proof job failed", extra={"error_type": type(e).__name__})
                outcome = ProofOutcome.PROVER_FAILED
            finally:
                self._queue.task_done()
            self.stats[outcome.value] += 1
            if self._metrics is not None:
                if outcome is ProofOutcome.PUBLISHED:
                    elapsed = time.monotonic() - job.queued_monotonic_s
                    self._metrics.proof_published(job.envelope.model_id, elapsed)
                else:
                    self._metrics.proof_failed(job.envelope.model_id)
            if outcome is not ProofOutcome.PUBLISHED:
                log.warning(
                    "proof not published",
                    extra={"request_id": job.envelope.request_id, "outcome": outcome.value},
                )

    async def prove(self, job: ProofJob) -> ProofOutcome:
        """Prove one job in a child process and publish its record."""
        s = self._settings
        if s.work_dir is not None:
            s.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            dir=s.work_dir, prefix="og-proof-", ignore_cleanup_errors=True
        ) as tmp:
            scratch = Path(tmp)
            c = job.circuit
            data = {
                "input_data": [
                    [element_float(x) for x in job.payload.tensors[t.name].data]
                    for t in c.manifest.inputs
                ]
            }
            await asyncio.to_thread((scratch / "input.json").write_text, json.dumps(data))
            try:
                result = await run_child(
                    {
                        "kind": "prove",
                        "data": str(scratch / "input.json"),
                        "witness": str(scratch / "witness.json"),
                        "proof": str(scratch / "proof.json"),
                        "compiled": str(c.compiled_path),
                        "pk": str(c.pk_path),
                        "srs": str(c.srs_path),
                        "lookup_range": list(c.lookup_range),
                    },
                    scratch,
                    timeout_s=s.prove_timeout_s,
                    threads=s.prover_threads,
                    niceness=s.prover_niceness,
                )
            except ChildTimeout:
                return ProofOutcome.TIMEOUT
            except ChildFailed:
                return ProofOutcome.PROVER_FAILED
            if not result.get("ok"):
                return ProofOutcome(result.get("error", "prover_failed"))
            proof = json.loads(await asyncio.to_thread((scratch / "proof.json").read_bytes))
        record = self._record(job, proof)
        if isinstance(record, ProofOutcome):
            return record
        return await self._send(record)

    def _record(self, job: ProofJob, proof: dict[str, Any]) -> ProofRecord | ProofOutcome:
        m = job.circuit.manifest
        values = [felt_to_int(f) for column in proof["instances"] for f in column]
        public_inputs, public_outputs, at = [], [], 0
        for spec in m.inputs:
            public_inputs.append(values[at : at + spec.size])
            at += spec.size
        for spec in m.outputs:
            public_outputs.append(values[at : at + spec.size])
            at += spec.size
        if at != len(values):
            return ProofOutcome.PROVER_FAILED
        problem = instance_problem(m, job.payload, job.output, public_inputs, public_outputs)
        if problem is not None:
            # Outputs out of tolerance: the runtime and the circuit disagree on this input;
            # anything else: EZKL read the input another way than the protocol says.
            reason = problem[0]
            if reason == "output_out_of_tolerance":
                return ProofOutcome.OUTPUT_MISMATCH
            return ProofOutcome.PROVER_FAILED
        e = job.envelope
        try:
            claims = ProofClaims(
                request_id=e.request_id,
                node_id=self._signer.node_id,
                model_id=e.model_id,
                model_digest=e.model_digest,
                input_hash=e.input_hash,
                output_hash=e.output_hash,
                ezkl_version=m.ezkl_version,
                circuit_digest=m.circuit_digest,
                settings_digest=m.settings_digest,
                vk_digest=m.vk_digest,
                srs_label=m.srs_label,
                srs_digest=m.srs_digest,
                input=job.payload,
                output=job.output,
                public_inputs=public_inputs,
                public_outputs=public_outputs,
                proof=base64.b64encode(bytes(proof["proof"])).decode(),
                signed_unix_ms=self._clock_ms(),
            )
        except ValidationError:
            return ProofOutcome.TOO_LARGE  # instances beyond the safe-integer range
        return ProofRecord(claims=claims, signature=self._signer.sign(PROOF_DOMAIN, claims))

    async def _send(self, record: ProofRecord) -> ProofOutcome:
        if len(encode(record)) > MAX_MESSAGE_BYTES:
            return ProofOutcome.TOO_LARGE
        for attempt in range(self._settings.publish_attempts):
            try:
                await self._publish(record)
                return ProofOutcome.PUBLISHED
            except Exception as e:
                log.warning(
                    "proof publish failed",
                    extra={"error_type": type(e).__name__, "attempt": attempt + 1},
                )
                await asyncio.sleep(0.5 * 2**attempt)
        return ProofOutcome.PUBLISH_FAILED
