"""ZKML proofs with real EZKL: a real proof made in the prover's child process
(``worker.zkml.prover``), bound to the signed result, and settlement's verifier
(``settlement.proofs``) refusing every kind of tampering; an input outside the calibrated range
is refused, not hung. The in-process parts (artifacts, handler) are in tests/unit/test_zkml.py.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.canonical import sha256_hex
from schemas.codec import encode
from schemas.fixedpoint import quantize
from schemas.proofs import PROOF_DOMAIN, ProofClaims, ProofRecord
from schemas.requests import MLInput, Tensor, input_hash
from schemas.results import MLOutput, output_hash
from schemas.signing import Signer
from schemas.verify.record import Rejected
from settlement.proofs import ProofRejected, ProofVerified, VkStore, verify_proof_record
from tests.harness.zkml import (
    NOW_MS,
    SIGNER,
    demo_mlp_path,
    onnx_output,
    prepare_demo_circuit,
    result_envelope,
    zk_settings,
)
from worker.zkml import PreparedCircuit, ProofOutcome, export_verifier
from worker.zkml.prover import ProofJob, ProofQueue


@pytest.fixture(scope="module")
def zk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zk")


@pytest.fixture(scope="module")
def circuit(demo_hub: Path, zk_root: Path) -> PreparedCircuit:
    return prepare_demo_circuit(demo_hub, zk_root)


@pytest.fixture(scope="module")
def model_path(demo_hub: Path) -> Path:
    return demo_mlp_path(demo_hub)


@pytest.fixture(scope="module")
def store(circuit: PreparedCircuit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vk-store")
    export_verifier(circuit, root)
    return root


async def _prove(
    circuit: PreparedCircuit, model_path: Path, x: list[float], work_dir: Path
) -> tuple[ProofOutcome, list[ProofRecord]]:
    payload = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=x)})
    output = onnx_output(model_path, x)
    published: list[ProofRecord] = []

    async def publish(record: ProofRecord) -> None:
        published.append(record)

    queue = ProofQueue(SIGNER, publish, zk_settings(work_dir=work_dir), clock_ms=lambda: NOW_MS)
    job = ProofJob(circuit, result_envelope(payload, output, circuit), payload, output)
    outcome = await queue.prove(job)
    assert list(work_dir.iterdir()) == []  # the scratch (request tensors) is gone
    return outcome, published


@pytest.fixture(scope="module")
def record(
    circuit: PreparedCircuit, model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> ProofRecord:
    work_dir = tmp_path_factory.mktemp("scratch")
    outcome, published = asyncio.run(_prove(circuit, model_path, [0.5, -1.0, 2.0, 0.25], work_dir))
    assert outcome is ProofOutcome.PUBLISHED
    (record,) = published
    return record


def _verify(raw: bytes, store: Path, *, allow_dev_srs: bool = True) -> ProofVerified | Rejected:
    return verify_proof_record(raw, VkStore(store), allow_dev_srs=allow_dev_srs, now_ms=NOW_MS)


def _resign(record: ProofRecord, signer: Signer = SIGNER, **changes: Any) -> bytes:
    claims = ProofClaims.model_validate({**record.claims.model_dump(mode="json"), **changes})
    return encode(ProofRecord(claims=claims, signature=signer.sign(PROOF_DOMAIN, claims)))


# --- proof records ---------------------------------------------------------------------------


def test_real_proof_verifies_and_binds_the_signed_result(
    record: ProofRecord, store: Path, circuit: PreparedCircuit
) -> None:
    c = record.claims
    assert c.vk_digest == circuit.manifest.vk_digest
    assert c.input_hash == sha256_hex(c.input) and c.output_hash == sha256_hex(c.output)
    assert c.public_inputs == [[quantize(x, 7) for x in (0.5, -1.0, 2.0, 0.25)]]  # type: ignore[arg-type]
    assert len(encode(record)) < 20_000
    outcome = _verify(encode(record), store)
    assert isinstance(outcome, ProofVerified), outcome


def test_dev_srs_is_refused_unless_allowed(record: ProofRecord, store: Path) -> None:
    outcome = _verify(encode(record), store, allow_dev_srs=False)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "dev_srs_refused"
    assert outcome.record == record  # signed by its node: the rejection is attributable


def test_tampered_claims_fail_the_signature(record: ProofRecord, store: Path) -> None:
    doc = json.loads(encode(record))
    doc["claims"]["output_hash"] = "0" * 64
    outcome = _verify(json.dumps(doc).encode(), store)
    assert isinstance(outcome, Rejected) and outcome.reason == "proof_bad_signature"
    assert not isinstance(outcome, ProofRejected)


def test_another_output_hash_resigned_is_rejected(record: ProofRecord, store: Path) -> None:
    outcome = _verify(_resign(record, output_hash="ab" * 32), store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "output_hash_mismatch"


def test_swapped_public_outputs_with_matching_output_fail_the_snark(
    record: ProofRecord, store: Path
) -> None:
    c = record.claims
    swapped = [list(reversed(c.public_outputs[0]))]
    tensor = c.output.tensors["probabilities"]
    output = MLOutput(
        tensors={
            "probabilities": Tensor(
                dtype="float32", shape=[1, 3], data=[q / 128 for q in swapped[0]]
            )
        }
    )
    assert swapped != c.public_outputs and tensor.data != output.tensors["probabilities"].data
    raw = _resign(
        record,
        public_outputs=swapped,
        output=output.model_dump(mode="json"),
        output_hash=output_hash(output),
    )
    outcome = _verify(raw, store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "bad_proof"


def test_public_output_off_by_one_quantum_fails_the_snark(record: ProofRecord, store: Path) -> None:
    outputs = [list(record.claims.public_outputs[0])]
    outputs[0][0] += 1  # still within tolerance of the signed output: only the SNARK can tell
    outcome = _verify(_resign(record, public_outputs=outputs), store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "bad_proof"


def test_output_beyond_tolerance_is_rejected(record: ProofRecord, store: Path) -> None:
    data = [float(v) + 0.5 for v in record.claims.output.tensors["probabilities"].data]  # type: ignore[arg-type]
    output = MLOutput(tensors={"probabilities": Tensor(dtype="float32", shape=[1, 3], data=data)})
    raw = _resign(record, output=output.model_dump(mode="json"), output_hash=output_hash(output))
    outcome = _verify(raw, store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "output_out_of_tolerance"


def test_input_other_than_the_instances_is_rejected(record: ProofRecord, store: Path) -> None:
    payload = MLInput(
        tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=[1.0, 1.0, 1.0, 1.0])}
    )
    raw = _resign(record, input=payload.model_dump(mode="json"), input_hash=input_hash(payload))
    outcome = _verify(raw, store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "input_instances_mismatch"


def test_vk_digest_mismatch_is_rejected(record: ProofRecord, store: Path, tmp_path: Path) -> None:
    outcome = _verify(_resign(record, vk_digest="cd" * 32), store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "vk_mismatch"
    # A store whose vk file no longer matches its pinned digest pins nothing.
    swapped = tmp_path / "store"
    shutil.copytree(store, swapped)
    vk = swapped / record.claims.model_digest / "vk.key"
    data = vk.read_bytes()
    vk.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    outcome = _verify(encode(record), swapped)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "unknown_circuit"


def test_unknown_model_digest_and_garbage(record: ProofRecord, store: Path) -> None:
    outcome = _verify(_resign(record, model_digest="ef" * 32), store)
    assert isinstance(outcome, ProofRejected) and outcome.reason == "unknown_circuit"
    outcome = _verify(b'{"type": "proof_record"}', store)
    assert isinstance(outcome, Rejected) and outcome.reason == "proof_not_decodable"
    other = Signer(b"\x06" * 32)
    forged = _resign(record, signer=other)  # signed by a key other than claims.node_id
    assert isinstance(_verify(forged, store), Rejected)
    assert _verify(forged, store).reason == "proof_bad_signature"  # type: ignore[union-attr]


# --- the prover's limits ---------------------------------------------------------------------


async def test_input_outside_the_calibrated_range_is_refused_not_hung(
    circuit: PreparedCircuit, model_path: Path, tmp_path: Path
) -> None:
    started = time.perf_counter()
    outcome, published = await _prove(circuit, model_path, [30.0, -30.0, 30.0, 30.0], tmp_path)
    assert outcome is ProofOutcome.OUT_OF_RANGE and published == []
    assert time.perf_counter() - started < 60
