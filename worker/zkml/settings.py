"""ZKML settings: one nested ``zk`` field of ``WorkerSettings`` (``OG_WORKER_ZK__*``).

Example: ``OG_WORKER_ZK__ENABLED=true OG_WORKER_ZK__SRS_PATH=/srs/kzg17.srs
OG_WORKER_ZK__SRS_LABEL=ezkl-kzg17``. Without an SRS file a worker may generate a local one
only with ``allow_dev_srs`` (development): it is labelled ``dev-…`` and settlement refuses
proofs made with it unless configured to accept them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from schemas.proofs import SrsLabel

__all__ = ["CircuitOptions", "ZkSettings"]


class CircuitOptions(BaseModel):
    """How a model becomes a circuit. Changing any of these makes a new circuit (new keys), so
    they are part of the artifact cache key (``digest``)."""

    scales: list[int] | None = Field(
        default=None,
        description="fixed-point scales (bits) calibration may pick from; None lets EZKL choose"
        " (most accurate, largest circuit). Smaller scales prove much faster, with coarser"
        " outputs: demo-mlp proves in ~0.5 s at scale 7 and ~9 s as calibrated (scale 11)",
    )
    decomp_base: int = Field(
        default=256,
        ge=2,
        description="range checks decompose values into digits of this base: its table needs"
        " base rows, so EZKL's default 16384 alone sets the circuit at 2^15 rows",
    )
    decomp_legs: int = Field(default=4, ge=1, le=16, description="digits per range check")
    lookup_safety_margin: float = Field(default=1.0, ge=1.0)
    calibration_samples: int = Field(default=32, ge=1, le=1024)
    calibration_bound: float = Field(
        default=4.0,
        gt=0,
        description="calibration inputs are uniform in [-bound, bound]; inputs that push the"
        " circuit's lookups past what calibration saw are not proved (outcome out_of_range)",
    )
    max_logrows: int = Field(default=20, ge=8, le=26)
    tolerance_factor: float = Field(
        default=4.0,
        ge=1.0,
        description="output_tolerance = factor x the largest |circuit - ONNX Runtime| output"
        " error seen over the calibration inputs (at least one quantum, 2^-scale)",
    )
    seed: int = 7

    @property
    def digest(self) -> str:
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class ZkSettings(BaseModel):
    enabled: bool = False
    models: list[str] = Field(
        default_factory=list,
        description="models served in ZKML mode; empty: every served ONNX model",
    )
    artifacts_dir: Path | None = Field(
        default=None,
        description="circuit artifacts (settings, compiled circuit, keys, SRS) by model digest;"
        " default <cache_dir>/zk. Proving keys are large (tens to hundreds of MB per model)",
    )
    prepare_on_start: bool = Field(
        default=True,
        description="prepare missing artifacts at start-up (seconds per model, once); false:"
        " serve ZKML only for models prepared beforehand (inference-node models zk-prepare)",
    )
    srs_path: Path | None = Field(default=None, description="KZG SRS file (a ceremony's)")
    srs_label: SrsLabel | None = Field(default=None, description="name recorded in proofs")
    allow_dev_srs: bool = Field(
        default=False, description="without srs_path, generate a local, labelled dev SRS"
    )
    circuit: CircuitOptions = Field(default_factory=CircuitOptions)
    max_concurrent_proofs: int = Field(default=1, ge=1, le=64)
    queue_size: int = Field(
        default=64, ge=1, le=100_000, description="proofs waiting; beyond it: queue_full"
    )
    prove_timeout_s: float = Field(default=300.0, gt=0)
    prepare_timeout_s: float = Field(default=1800.0, gt=0)
    prover_threads: int | None = Field(
        default=None, ge=1, description="threads per proof (RAYON_NUM_THREADS); None: all cores"
    )
    prover_niceness: int = Field(
        default=10, ge=0, le=19, description="proofs run below the inference fast path"
    )
    work_dir: Path | None = Field(
        default=None,
        description="scratch for witness and proof files (deleted after each proof); default:"
        " the system temp directory. They hold request tensors: keep it private",
    )
    publish_attempts: int = Field(default=3, ge=1, le=20)

    @model_validator(mode="after")
    def _srs_source(self) -> ZkSettings:
        if self.srs_path is not None and self.srs_label is None:
            raise ValueError("zk.srs_path needs zk.srs_label")
        if self.srs_label is not None and self.srs_label.startswith("dev-"):
            raise ValueError("zk.srs_label must not start with 'dev-' (reserved for dev SRS)")
        if self.enabled and self.srs_path is None and not self.allow_dev_srs:
            raise ValueError("zk.enabled needs zk.srs_path, or zk.allow_dev_srs for development")
        return self

    def artifacts_root(self, cache_dir: Path) -> Path:
        return self.artifacts_dir if self.artifacts_dir is not None else cache_dir / "zk"
