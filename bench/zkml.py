"""ZKML benchmark: what proving costs for the bundled ONNX models.

Run with ``python -m bench.zkml`` (``--configs fast`` for the quick one only, ``--repeat N``
proofs per configuration, ``--json PATH`` to keep the figures; ``--smoke``: the fast
configuration and one proof, to keep the script working).

For each bundled ONNX model and circuit configuration (``fast``: scale 7; ``calibrated``: the
scales EZKL's calibration picks, most accurate), with a dev SRS generated on the spot:

- **setup**: preparing the circuit from nothing (settings, calibration, compile, SRS
  generation, key generation, tolerance measurement), and loading it from the cache again;
- **prove**: ``gen_witness`` + ``ezkl.prove`` in this process, and the worker's full path
  (``ProofQueue.prove``: a child interpreter, witness, range check, mock, prove, signed
  record);
- **verify**: ``ezkl.verify`` in this process (what settlement's child does per proof), and
  settlement's whole check of an encoded record (``verify_proof_record``);
- **sizes**: proof bytes, the encoded ``ProofRecord``, proving and verifying keys, SRS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import demo_hub, table
from schemas.base import SettlementMode, VerificationMode
from schemas.codec import encode
from schemas.proofs import ProofRecord, proof_bytes
from schemas.requests import MLInput, Tensor, input_hash
from schemas.results import MLOutput, ResultEnvelope, Usage, output_hash
from schemas.signing import Signer
from settlement.proofs import ProofVerified, VkStore, verify_proof_record
from worker.modelstore.local_hub import LocalHub
from worker.modelstore.refs import HubIndex, ModelFormat
from worker.zkml import CircuitOptions, DevSrs, ZkSettings, export_verifier, prepare_circuit
from worker.zkml.artifacts import PreparedCircuit, load_ezkl
from worker.zkml.prover import ProofJob, ProofOutcome, ProofQueue

CONFIGS = {"fast": CircuitOptions(scales=[7]), "calibrated": CircuitOptions()}
SIGNER = Signer(b"\x0b" * 32)


def _output(model_path: Path, payload: MLInput) -> MLOutput:
    import numpy as np
    import onnxruntime  # type: ignore[import-untyped,unused-ignore]

    session = onnxruntime.InferenceSession(str(model_path))
    feeds = {
        name: np.array(t.data, dtype=np.float32).reshape(t.shape)
        for name, t in payload.tensors.items()
    }
    names = [o.name for o in session.get_outputs()]
    tensors = {
        name: Tensor(dtype="float32", shape=list(v.shape), data=v.ravel().tolist())
        for name, v in zip(names, session.run(names, feeds), strict=True)
    }
    return MLOutput(tensors=tensors)


def _ezkl_prove_s(circuit: PreparedCircuit, payload: MLInput, scratch: Path) -> float:
    ezkl = load_ezkl()
    data = scratch / "input.json"
    data.write_text(
        json.dumps({"input_data": [payload.tensors[t.name].data for t in circuit.manifest.inputs]})
    )
    started = time.perf_counter()
    ezkl.gen_witness(str(data), str(circuit.compiled_path), str(scratch / "w.json"), None, None)
    ezkl.prove(
        str(scratch / "w.json"),
        str(circuit.compiled_path),
        str(circuit.pk_path),
        str(scratch / "p.json"),
        str(circuit.srs_path),
    )
    return time.perf_counter() - started


def _ezkl_verify_s(circuit: PreparedCircuit, scratch: Path) -> float:
    ezkl = load_ezkl()
    started = time.perf_counter()
    ok = ezkl.verify(
        str(scratch / "p.json"),
        str(circuit.settings_path),
        str(circuit.vk_path),
        str(circuit.srs_path),
        False,
    )
    elapsed = time.perf_counter() - started
    assert ok
    return elapsed


async def _worker_prove(
    circuit: PreparedCircuit, payload: MLInput, output: MLOutput
) -> tuple[float, ProofRecord]:
    published: list[ProofRecord] = []

    async def publish(record: ProofRecord) -> None:
        published.append(record)

    now_ms = time.time_ns() // 1_000_000
    envelope = ResultEnvelope(
        request_id="bench-zk",
        model_id=circuit.manifest.model_id,
        model_digest=circuit.manifest.model_digest,
        mode=VerificationMode.ZKML,
        settlement=SettlementMode.BATCH,
        input_hash=input_hash(payload),
        output_hash=output_hash(output),
        usage=Usage(),
        request_created_unix_ms=now_ms - 1,
        max_output_tokens=None,
        payer=None,
        node_id=SIGNER.node_id,
        signed_unix_ms=now_ms,
    )
    queue = ProofQueue(SIGNER, publish, ZkSettings(allow_dev_srs=True, prover_niceness=0))
    started = time.perf_counter()
    outcome = await queue.prove(ProofJob(circuit, envelope, payload, output))
    elapsed = time.perf_counter() - started
    if outcome is not ProofOutcome.PUBLISHED:
        raise RuntimeError(f"proof not made: {outcome.value}")
    return elapsed, published[0]


def bench_model(name: str, hub: Path, root: Path, config: str, repeat: int) -> dict[str, Any]:
    ref = LocalHub(hub).resolve(name)
    options = CONFIGS[config]
    started = time.perf_counter()
    circuit, reused = prepare_circuit(
        hub / ref.uri,
        model_id=name,
        model_digest=ref.digest,
        options=options,
        root=root,
        srs=DevSrs(),
    )
    setup_s = time.perf_counter() - started
    assert not reused
    started = time.perf_counter()
    prepare_circuit(
        hub / ref.uri,
        model_id=name,
        model_digest=ref.digest,
        options=options,
        root=root,
        srs=DevSrs(),
    )
    cached_s = time.perf_counter() - started
    payload = MLInput.model_validate(ref.example_input)
    output = _output(hub / ref.uri, payload)
    proves, verifies, worker_proves, record_checks = [], [], [], []
    record: ProofRecord | None = None
    store = root / "vk-store"
    export_verifier(circuit, store)
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            proves.append(_ezkl_prove_s(circuit, payload, Path(tmp)))
            verifies.append(_ezkl_verify_s(circuit, Path(tmp)))
        seconds, record = asyncio.run(_worker_prove(circuit, payload, output))
        worker_proves.append(seconds)
        started = time.perf_counter()
        outcome = verify_proof_record(
            encode(record), VkStore(store), allow_dev_srs=True, now_ms=time.time_ns() // 10**6
        )
        record_checks.append(time.perf_counter() - started)
        assert isinstance(outcome, ProofVerified), outcome
    assert record is not None
    m = circuit.manifest
    return {
        "model": name,
        "config": config,
        "logrows": m.logrows,
        "scale": m.inputs[0].scale,
        "tolerance": m.output_tolerance,
        "setup_s": setup_s,
        "cached_load_ms": cached_s * 1000,
        "prove_s": statistics.median(proves),
        "worker_prove_s": statistics.median(worker_proves),
        "verify_ms": statistics.median(verifies) * 1000,
        "record_check_ms": statistics.median(record_checks) * 1000,
        "proof_bytes": len(proof_bytes(record.claims)),
        "record_bytes": len(encode(record)),
        "pk_bytes": circuit.pk_path.stat().st_size,
        "vk_bytes": circuit.vk_path.stat().st_size,
        "srs_bytes": circuit.srs_path.stat().st_size,
    }


_COLUMNS = [
    ("model", "model", "{}"),
    ("config", "config", "{}"),
    ("logrows", "k", "{}"),
    ("scale", "scale", "{}"),
    ("tolerance", "tol", "{:.4f}"),
    ("setup_s", "setup s", "{:.2f}"),
    ("cached_load_ms", "cached ms", "{:.1f}"),
    ("prove_s", "prove s", "{:.2f}"),
    ("worker_prove_s", "worker prove s", "{:.2f}"),
    ("verify_ms", "verify ms", "{:.1f}"),
    ("record_check_ms", "record check ms", "{:.1f}"),
    ("proof_bytes", "proof B", "{:,}"),
    ("record_bytes", "record B", "{:,}"),
    ("pk_bytes", "pk B", "{:,}"),
    ("vk_bytes", "vk B", "{:,}"),
    ("srs_bytes", "srs B", "{:,}"),
]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The figures as a Markdown table, with the worker's proving path against bare EZKL."""
    heads = [head for _, head, _ in _COLUMNS] + ["worker / ezkl prove"]
    cells = [
        [fmt.format(row[key]) for key, _, fmt in _COLUMNS]
        + [f"{row['worker_prove_s'] / row['prove_s']:.2f}"]
        for row in rows
    ]
    return table(heads, cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--configs", default="fast,calibrated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here (bench/zkml.json)")
    parser.add_argument("--smoke", action="store_true", help="the fast configuration, one proof")
    parser.add_argument("--hub", type=Path, help="a demo hub built already (copied)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.configs, args.repeat = "fast", 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-zkml-") as tmp:
        hub = demo_hub(Path(tmp), args.hub)
        index = HubIndex.model_validate_json((hub / "index.json").read_bytes())
        models = [r.name for r in index.models if r.format is ModelFormat.ONNX]
        for config in args.configs.split(","):
            for name in models:
                root = Path(tmp) / f"zk-{config}"
                rows.append(bench_model(name, hub, root, config, args.repeat))
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
