"""ZKML proofs (EZKL) for ONNX models: circuit artifacts, a background prover and the
``ZKML`` mode handler of the pipeline. The wire format is ``schemas.proofs``; the rules are in
``docs/protocol/zkml.md``.

``ezkl`` (the ``zk`` extra) is imported only when a circuit is prepared or a proof is made.
"""

from worker.zkml.artifacts import (
    PreparedCircuit,
    PrepareError,
    export_verifier,
    load_prepared,
    prepare_circuit,
)
from worker.zkml.handler import (
    ZkConfigError,
    ZkmlModeHandler,
    prepare_circuits,
    proof_publisher,
    srs_source,
)
from worker.zkml.operator import zk_prepare
from worker.zkml.prover import ProofOutcome, ProofQueue, SubmitOutcome
from worker.zkml.settings import CircuitOptions, ZkSettings
from worker.zkml.srs import DevSrs, SrsFile

__all__ = [
    "CircuitOptions",
    "DevSrs",
    "PrepareError",
    "PreparedCircuit",
    "ProofOutcome",
    "ProofQueue",
    "SrsFile",
    "SubmitOutcome",
    "ZkConfigError",
    "ZkSettings",
    "ZkmlModeHandler",
    "export_verifier",
    "load_prepared",
    "prepare_circuit",
    "prepare_circuits",
    "proof_publisher",
    "srs_source",
    "zk_prepare",
]
