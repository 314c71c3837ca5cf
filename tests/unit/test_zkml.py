"""ZKML with real EZKL, in this process: circuit artifacts prepared once and cached, EZKL's
encodings, and the mode handler's typed outcomes. Real proofs, made in the prover's child
process, and settlement's verifier refusing tampered ones are in
tests/integration/test_zkml_proofs.py."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from schemas.base import VerificationMode
from schemas.fixedpoint import felt_hex, felt_to_int, quantize
from schemas.proofs import ProofRecord
from schemas.requests import InferenceRequest, MLInput, Tensor
from tests.harness.zkml import (
    NOW_MS,
    OPTIONS,
    SIGNER,
    demo_mlp_path,
    onnx_output,
    prepare_demo_circuit,
    result_envelope,
    zk_settings,
)
from worker.engines.base import EngineResult
from worker.modelstore.local_hub import LocalHub
from worker.zkml import (
    CircuitOptions,
    DevSrs,
    PreparedCircuit,
    PrepareError,
    SrsFile,
    SubmitOutcome,
    ZkmlModeHandler,
    prepare_circuit,
)
from worker.zkml.artifacts import load_ezkl


@pytest.fixture(scope="module")
def zk_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zk")


@pytest.fixture(scope="module")
def circuit(demo_hub: Path, zk_root: Path) -> PreparedCircuit:
    return prepare_demo_circuit(demo_hub, zk_root)


@pytest.fixture(scope="module")
def model_path(demo_hub: Path) -> Path:
    return demo_mlp_path(demo_hub)


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

    handler = ZkmlModeHandler({"demo-mlp": circuit}, SIGNER, publish, zk_settings(queue_size=1))
    assert handler.accepts("demo-mlp") and not handler.accepts("demo-lm")
    x = [0.5, -1.0, 2.0, 0.25]
    request, output = _request(x), onnx_output(model_path, x)
    envelope = result_envelope(request.payload, output, circuit)  # type: ignore[arg-type]
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
