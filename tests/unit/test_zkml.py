"""ZKML with real EZKL: circuit artifacts prepared once and cached, real proofs made in the
prover's child process, and settlement's verifier refusing every kind of tampering.

The demo MLP is proved at scale 7 (2^11 rows): about half a second a proof."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.base import VerificationMode
from schemas.canonical import sha256_hex
from schemas.codec import encode
from schemas.proofs import (
    PROOF_DOMAIN,
    ProofClaims,
    ProofRecord,
    felt_hex,
    felt_to_int,
    quantize,
)
from schemas.requests import InferenceRequest, MLInput, Tensor, input_hash
from schemas.results import MLOutput, ResultEnvelope, Usage, output_hash
from settlement.proofs import ProofRejected, ProofVerified, VkStore, verify_proof_record
from settlement.verify import Rejected
from worker.engines.base import EngineResult
from worker.models.local_hub import LocalHub
from worker.trust.signer import Signer
from worker.zkml import (
    CircuitOptions,
    DevSrs,
    PreparedCircuit,
    PrepareError,
    ProofOutcome,
    SrsFile,
    SubmitOutcome,
    ZkmlModeHandler,
    ZkSettings,
    export_verifier,
    prepare_circuit,
)
from worker.zkml.artifacts import load_ezkl
from worker.zkml.prover import ProofJob, ProofQueue

OPTIONS = CircuitOptions(scales=[7])
SIGNER = Signer(b"\x05" * 32)
NOW_MS = 1_800_000_000_000


@pytest.fixture(scope="module")
def zk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zk")


@pytest.fixture(scope="module")
def circuit(demo_hub: Path, zk_root: Path) -> PreparedCircuit:
    ref = LocalHub(demo_hub).resolve("demo-mlp")
    prepared, reused = prepare_circuit(
        demo_hub / ref.uri,
        model_id=ref.name,
        model_digest=ref.digest,
        options=OPTIONS,
        root=zk_root,
        srs=DevSrs(),
    )
    assert not reused
    return prepared


@pytest.fixture(scope="module")
def store(circuit: PreparedCircuit, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vk-store")
    export_verifier(circuit, root)
    return root


def _envelope(payload: MLInput, output: MLOutput, circuit: PreparedCircuit) -> ResultEnvelope:
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
    )


@pytest.fixture(scope="module")
def model_path(demo_hub: Path) -> Path:
    return demo_hub / LocalHub(demo_hub).resolve("demo-mlp").uri


def _onnx_output(model_path: Path, x: list[float]) -> MLOutput:
    import numpy as np
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model_path))
    (probs,) = session.run(None, {"x": np.array([x], dtype=np.float32)})
    data = probs.ravel().tolist()
    return MLOutput(tensors={"probabilities": Tensor(dtype="float32", shape=[1, 3], data=data)})


def _settings(**changes: Any) -> ZkSettings:
    return ZkSettings(allow_dev_srs=True, circuit=OPTIONS, **changes)


async def _prove(
    circuit: PreparedCircuit, model_path: Path, x: list[float], work_dir: Path
) -> tuple[ProofOutcome, list[ProofRecord]]:
    payload = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 4], data=x)})
    output = _onnx_output(model_path, x)
    published: list[ProofRecord] = []

    async def publish(record: ProofRecord) -> None:
        published.append(record)

    queue = ProofQueue(SIGNER, publish, _settings(work_dir=work_dir), clock_ms=lambda: NOW_MS)
    job = ProofJob(circuit, _envelope(payload, output, circuit), payload, output)
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


# --- artifacts ---------------------------------------------------------------------------------


def test_prepare_is_cached_and_never_sets_up_again(
    circuit: PreparedCircuit, demo_hub: Path, zk_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ezkl = load_ezkl()

    def forbidden(*_: Any, **__: Any) -> None:
        raise AssertionError("ezkl was called for a cached circuit")

    for name in ("gen_settings", "calibrate_settings", "compile_circuit", "setup", "gen_srs"):
        monkeypatch.setattr(ezkl, name, forbidden)
    ref = LocalHub(demo_hub).resolve("demo-mlp")
    started = time.perf_counter()
    again, reused = prepare_circuit(
        demo_hub / ref.uri,
        model_id=ref.name,
        model_digest=ref.digest,
        options=OPTIONS,
        root=zk_root,
        srs=DevSrs(),
    )
    assert reused and again == circuit
    assert time.perf_counter() - started < 1.0
    m = circuit.manifest
    assert m.srs_dev and m.srs_label.startswith("dev-k") and m.logrows == 11
    assert [t.name for t in m.inputs] == ["x"] and [t.name for t in m.outputs] == ["probabilities"]
    assert m.visibility == {"input": "public", "output": "public", "param": "fixed"}
    assert 0 < m.output_tolerance < 0.25
    assert not list(circuit.directory.parent.glob(".staging-*"))


def test_concurrent_preparers_build_once(demo_hub: Path, tmp_path: Path) -> None:
    """Two preparers at once (two lock holders on one file): one builds, the other waits
    and reuses its result; the directory appears complete or not at all."""
    ref = LocalHub(demo_hub).resolve("demo-mlp")
    tiny = CircuitOptions(scales=[5], calibration_samples=4)
    results: list[bool] = []

    def run() -> None:
        _, reused = prepare_circuit(
            demo_hub / ref.uri,
            model_id=ref.name,
            model_digest=ref.digest,
            options=tiny,
            root=tmp_path,
            srs=DevSrs(),
        )
        results.append(reused)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [False, True]


def test_a_ceremony_srs_file_is_used_as_given_and_too_small_is_refused(
    circuit: PreparedCircuit, model_path: Path, tmp_path: Path
) -> None:
    ceremony = tmp_path / "ceremony.srs"
    shutil.copyfile(circuit.srs_path, ceremony)  # stands in for a downloaded ceremony file
    prepared, _ = prepare_circuit(
        model_path,
        model_id="demo-mlp",
        model_digest=circuit.manifest.model_digest,
        options=OPTIONS,
        root=tmp_path / "zk",
        srs=SrsFile(ceremony, "ceremony-k11"),
    )
    m = prepared.manifest
    assert (m.srs_label, m.srs_dev, m.srs_digest) == (
        "ceremony-k11",
        False,
        circuit.manifest.srs_digest,
    )
    tiny = tmp_path / "tiny.srs"
    tiny.write_bytes((5).to_bytes(4, "little") + b"\x00" * 64)
    with pytest.raises(PrepareError, match="2\\^5 rows"):
        prepare_circuit(
            model_path,
            model_id="demo-mlp",
            model_digest=circuit.manifest.model_digest,
            options=OPTIONS,
            root=tmp_path / "zk2",
            srs=SrsFile(tiny, "too-small"),
        )
    assert not list((tmp_path / "zk2" / circuit.manifest.model_digest).iterdir())


# --- encoding helpers against EZKL itself ----------------------------------------------------


@pytest.mark.parametrize(
    "value", [0.5, -1.0, 0.1, 2.5 / 128, -2.5 / 128, 0.5 / 128, (0.5 - 1e-9) / 128, 1e-30, 3.75]
)
def test_quantize_and_felts_match_ezkl(value: float) -> None:
    ezkl = load_ezkl()
    felt = ezkl.float_to_felt(value, 7, ezkl.PyInputType.F32)
    assert felt_hex(quantize(value, 7, "F32")) == felt
    assert felt_to_int(felt) == ezkl.felt_to_int(felt) == quantize(value, 7, "F32")


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


# --- the mode handler and the queue ------------------------------------------------------------


def _request(x: list[float], shape: list[int] | None = None) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-zk-h",
        model="demo-mlp",
        mode=VerificationMode.ZKML,
        created_unix_ms=NOW_MS,
        payload=MLInput(tensors={"x": Tensor(dtype="float32", shape=shape or [1, 4], data=x)}),
    )


async def test_handler_accepts_prepared_models_and_reports_typed_outcomes(
    circuit: PreparedCircuit, model_path: Path
) -> None:
    async def publish(_: ProofRecord) -> None:
        raise AssertionError("nothing is proved in this test")

    handler = ZkmlModeHandler({"demo-mlp": circuit}, SIGNER, publish, _settings(queue_size=1))
    assert handler.accepts("demo-mlp") and not handler.accepts("demo-lm")
    x = [0.5, -1.0, 2.0, 0.25]
    request, output = _request(x), _onnx_output(model_path, x)
    envelope = _envelope(request.payload, output, circuit)  # type: ignore[arg-type]
    result = EngineResult(output=output)
    # Not started: the first job waits in the queue, the second finds it full.
    assert handler.submit(request, result, envelope) is SubmitOutcome.QUEUED
    assert handler.submit(request, result, envelope) is SubmitOutcome.QUEUE_FULL
    two = _request(x * 2, shape=[2, 4])
    assert handler.submit(two, result, envelope) is SubmitOutcome.NOT_PROVABLE
    other = envelope.model_copy(update={"output_hash": "0" * 64})
    assert handler.submit(request, result, other) is SubmitOutcome.NOT_PROVABLE
    await handler.close(drain_timeout_s=0.1)
    assert handler.submit(request, result, envelope) is SubmitOutcome.CLOSED
    assert handler.queue.stats == {"queued": 1, "queue_full": 1, "not_provable": 2, "closed": 1}


async def test_input_outside_the_calibrated_range_is_refused_not_hung(
    circuit: PreparedCircuit, model_path: Path, tmp_path: Path
) -> None:
    started = time.perf_counter()
    outcome, published = await _prove(circuit, model_path, [30.0, -30.0, 30.0, 30.0], tmp_path)
    assert outcome is ProofOutcome.OUT_OF_RANGE and published == []
    assert time.perf_counter() - started < 60
