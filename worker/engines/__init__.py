"""Engines: one loaded model each, behind the ``Engine`` protocol (see ``base``).

``load_engine`` picks the implementation from the model's format. Implementations are imported
on demand so that a worker serving only ONNX models never imports torch.
"""

from __future__ import annotations

from pathlib import Path

from worker.engines.base import Engine, EngineResult
from worker.models.refs import ModelFormat, ModelRef

__all__ = ["Engine", "EngineResult", "load_engine"]


async def load_engine(ref: ModelRef, path: Path) -> Engine:
    """Load ``ref`` from its materialised ``path`` (see ``ModelHub.materialize``)."""
    if ref.format is ModelFormat.ONNX:
        from worker.engines.onnx import OnnxEngine

        return await OnnxEngine.load(ref, path)
    if ref.format is ModelFormat.HF_CAUSAL_LM:
        from worker.engines.hf import HFCausalLMEngine

        return await HFCausalLMEngine.load(ref, path)
    if ref.format is ModelFormat.FIXED_LATENCY:
        from worker.engines.fixed import FixedLatencyEngine

        return await FixedLatencyEngine.load(ref, path)
    raise ValueError(f"model {ref.name}: no engine for format {ref.format}")
