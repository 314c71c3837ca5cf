"""Engines: one loaded model each, behind the ``Engine`` protocol (see ``base``).

``load_engine`` picks the implementation from the model's format: ``onnx`` → ONNX Runtime,
``hf-causal-lm`` → torch/transformers on the CPU, ``vllm`` → vLLM on a GPU, ``fixed-latency``
→ the benchmark echo. Implementations are imported on demand so that a worker serving only ONNX
models never imports torch, and one without a GPU never imports vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from worker.engines.base import Engine, EngineResult
from worker.modelstore.refs import ModelFormat, ModelRef

__all__ = ["Engine", "EngineResult", "load_engine"]


async def load_engine(
    ref: ModelRef, path: Path, *, on_close: Callable[[], None] | None = None
) -> Engine:
    """Load ``ref`` from its materialised ``path`` (see ``ModelCache.materialize``).

    ``on_close`` runs once when the engine is closed: the cache's in-use lease on ``path``
    (``CachedModel.release``) is handed over this way, so the files stay pinned exactly as
    long as an engine may read them.
    """
    if ref.format is ModelFormat.ONNX:
        from worker.engines.onnx import OnnxEngine

        return await OnnxEngine.load(ref, path, on_close=on_close)
    if ref.format is ModelFormat.HF_CAUSAL_LM:
        from worker.engines.hf import HFCausalLMEngine

        return await HFCausalLMEngine.load(ref, path, on_close=on_close)
    if ref.format is ModelFormat.VLLM:
        from worker.engines.vllm import VLLMEngine

        return await VLLMEngine.load(ref, path, on_close=on_close)
    if ref.format is ModelFormat.FIXED_LATENCY:
        from worker.engines.fixed import FixedLatencyEngine

        return await FixedLatencyEngine.load(ref, path, on_close=on_close)
    raise ValueError(f"model {ref.name}: no engine for format {ref.format}")
