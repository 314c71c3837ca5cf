"""Operator actions behind ``inference-node models zk-prepare NAME... [--export DIR]``.

Preparing ahead of time keeps worker start-up fast (``zk.prepare_on_start=false`` then serves
exactly what was prepared) and produces what settlement pins: ``--export DIR`` copies each
model's manifest, settings, verifying key and SRS (never the proving key) into settlement's
verifying-key store (``OG_SETTLEMENT_ZK__VK_STORE_DIR``).

Runs in the calling process: the CLI may block, and EZKL's output stays visible to the
operator. Uses the worker's settings, so it writes where the worker pods read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from worker.modelstore.cache import ModelCache
from worker.modelstore.refs import ModelFormat
from worker.zkml.artifacts import export_verifier, prepare_circuit
from worker.zkml.handler import ZkConfigError, srs_source
from worker.zkml.settings import ZkSettings

__all__ = ["zk_prepare"]


def zk_prepare(
    settings: ZkSettings,
    cache: ModelCache,
    cache_dir: Path,
    names: list[str],
    export_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Prepare (or find cached) the circuit of each named ONNX model; one summary per model."""
    index = cache.hub.index()
    srs = srs_source(settings)
    root = settings.artifacts_root(cache_dir)
    rows = []
    for name in names:
        try:
            ref = index.get(name)
        except KeyError:
            raise ZkConfigError(f"model {name} is not in the hub's index") from None
        if ref.format is not ModelFormat.ONNX:
            raise ZkConfigError(f"model {name} is {ref.format.value}; only ONNX models are proved")
        cached = cache.materialize(ref)
        try:
            prepared, reused = prepare_circuit(
                cached.path,
                model_id=name,
                model_digest=ref.digest,
                options=settings.circuit,
                root=root,
                srs=srs,
                lock_timeout_s=settings.prepare_timeout_s,
            )
        finally:
            cached.release()
        m = prepared.manifest
        row: dict[str, Any] = {
            "model": name,
            "digest": ref.digest,
            "cached": reused,
            "directory": str(prepared.directory),
            "logrows": m.logrows,
            "vk_digest": m.vk_digest,
            "srs_label": m.srs_label,
            "srs_dev": m.srs_dev,
            "output_tolerance": m.output_tolerance,
            "pk_bytes": prepared.pk_path.stat().st_size,
        }
        if export_dir is not None:
            row["exported"] = str(export_verifier(prepared, export_dir))
        rows.append(row)
    return rows
