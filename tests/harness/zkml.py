"""The demo MLP's ZKML circuit and the pieces of a result around it, shared by the ZKML unit
tests (artifacts, handler) and integration tests (real proofs in the prover's child process).

The demo MLP is proved at scale 7 (2^11 rows): about half a second a proof."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas.base import SettlementMode, VerificationMode
from schemas.requests import MLInput, Tensor, input_hash
from schemas.results import MLOutput, ResultEnvelope, Usage, output_hash
from schemas.signing import Signer
from worker.modelstore.local_hub import LocalHub
from worker.zkml import CircuitOptions, DevSrs, PreparedCircuit, ZkSettings, prepare_circuit

__all__ = [
    "NOW_MS",
    "OPTIONS",
    "SIGNER",
    "demo_mlp_path",
    "onnx_output",
    "prepare_demo_circuit",
    "result_envelope",
    "zk_settings",
]

OPTIONS = CircuitOptions(scales=[7])
SIGNER = Signer(b"\x05" * 32)
NOW_MS = 1_800_000_000_000


def prepare_demo_circuit(demo_hub: Path, root: Path) -> PreparedCircuit:
    """Prepare the demo MLP's circuit under ``root`` with a dev SRS; it must be a fresh build."""
    ref = LocalHub(demo_hub).resolve("demo-mlp")
    prepared, reused = prepare_circuit(
        demo_hub / ref.uri,
        model_id=ref.name,
        model_digest=ref.digest,
        options=OPTIONS,
        root=root,
        srs=DevSrs(),
    )
    assert not reused
    return prepared


def demo_mlp_path(demo_hub: Path) -> Path:
    """The demo MLP's ONNX file in ``demo_hub``."""
    return demo_hub / LocalHub(demo_hub).resolve("demo-mlp").uri


def result_envelope(payload: MLInput, output: MLOutput, circuit: PreparedCircuit) -> ResultEnvelope:
    """The ZKML result envelope ``SIGNER`` signs for ``payload`` and ``output``."""
    return ResultEnvelope(
        request_id="req-zk-1",
        model_id="demo-mlp",
        model_digest=circuit.manifest.model_digest,
        mode=VerificationMode.ZKML,
        input_hash=input_hash(payload),
        output_hash=output_hash(output),
        usage=Usage(),
        node_id=SIGNER.node_id,
        signed_unix_ms=NOW_MS,
        settlement=SettlementMode.BATCH,
        request_created_unix_ms=NOW_MS - 100,
        max_output_tokens=None,
        payer=None,
    )


def onnx_output(model_path: Path, x: list[float]) -> MLOutput:
    """What onnxruntime answers for one row ``x`` of the demo MLP."""
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path))
    (probs,) = session.run(None, {"x": np.array([x], dtype=np.float32)})
    data = probs.ravel().tolist()
    return MLOutput(tensors={"probabilities": Tensor(dtype="float32", shape=[1, 3], data=data)})


def zk_settings(**changes: Any) -> ZkSettings:
    """ZKML settings for ``OPTIONS`` with the dev SRS allowed."""
    return ZkSettings(allow_dev_srs=True, circuit=OPTIONS, **changes)
