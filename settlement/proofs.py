"""ZKML proof record verification. Returns ``ProofVerified`` or a ``Rejected`` (with a reason
safe to store and count), never raises for bad input.

Checks, in order (reason on failure)::

    decodes as a ProofRecord                                proof_not_decodable
    ed25519 signature of claims.node_id over the claims     proof_bad_signature
    signed_unix_ms not beyond the clock skew                proof_future_timestamp
    a pinned circuit for claims.model_digest                unknown_circuit
    circuit, settings, vk digests and EZKL version pinned   vk_mismatch
    SRS digest and label pinned                             srs_mismatch
    not a dev SRS, unless allowed                           dev_srs_refused
    H(input) == input_hash                                  input_hash_mismatch
    H(output) == output_hash                                output_hash_mismatch
    instances shaped as the circuit's inputs and outputs    bad_instances
    input instances == quantize(carried input)              input_instances_mismatch
    |output instance / 2^scale - signed output| <= tol      output_out_of_tolerance
    the SNARK verifies (EZKL, pinned vk and SRS)            bad_proof / verifier_timeout

Rejections after the signature check are ``ProofRejected`` with the record: the node vouched
for it, so the ledger records the proof as rejected for its (request, node). The ledger then
links a verified proof to the stored result record (``result_mismatch`` when the hashes
differ: a valid proof of some other computation).

The pinned circuits come from a verifying-key store directory written by the operator
(``worker.zkml.export_verifier``), never from records. EZKL holds the GIL for the whole
verification, so the service runs the SNARK checks of a batch in a child process
(``verify_snarks``); ``verify_proof_record`` does everything in-process (tests, tools).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.children import run_python_module
from schemas.canonical import sha256_hex
from schemas.codec import Decoded, decode
from schemas.proofs import (
    DEV_SRS_PREFIX,
    CircuitManifest,
    ProofRecord,
    proof_bytes,
    proof_instances,
    verify_proof_signature,
)
from schemas.verify.record import Rejected
from schemas.verify.zkml import instance_problem

__all__ = [
    "PinnedCircuit",
    "ProofChecked",
    "ProofRejected",
    "ProofVerified",
    "VkStore",
    "check_proof_record",
    "main",
    "snark_rejection",
    "snark_verify",
    "verify_proof_record",
    "verify_snarks",
]

_INSTALL_HINT = "pip install 'verifiable-inference-node[zk]'"


@dataclass(frozen=True)
class PinnedCircuit:
    manifest: CircuitManifest
    settings_path: Path
    vk_path: Path
    srs_path: Path


@dataclass(frozen=True)
class ProofVerified:
    record: ProofRecord


@dataclass(frozen=True)
class ProofChecked:
    """Passed every check but the SNARK."""

    record: ProofRecord
    circuit: PinnedCircuit


@dataclass(frozen=True)
class ProofRejected(Rejected):
    record: ProofRecord | None = None
    """The record, when its node's signature was valid (the rejection is the node's)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class VkStore:
    """Pinned circuits by model digest, read from ``root`` (see module doc) and cached. Every
    file is checked against the manifest's digests once, when first used."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._circuits: dict[str, PinnedCircuit | None] = {}

    def circuit(self, model_digest: str) -> PinnedCircuit | None:
        if model_digest not in self._circuits:
            self._circuits[model_digest] = self._load(model_digest)
        return self._circuits[model_digest]

    def _load(self, model_digest: str) -> PinnedCircuit | None:
        directory = self.root / model_digest
        try:
            manifest = CircuitManifest.model_validate_json(
                (directory / "manifest.json").read_bytes()
            )
            srs_path = self.root / "srs" / f"{manifest.srs_digest}.srs"
            if (
                manifest.model_digest != model_digest
                or _sha256(directory / "vk.key") != manifest.vk_digest
                or _sha256(directory / "settings.json") != manifest.settings_digest
                or _sha256(srs_path) != manifest.srs_digest
            ):
                return None
        except (OSError, ValueError):
            return None
        return PinnedCircuit(manifest, directory / "settings.json", directory / "vk.key", srs_path)


def check_proof_record(
    raw: bytes | None,
    store: VkStore | None,
    *,
    allow_dev_srs: bool,
    max_clock_skew_s: float,
    now_ms: int,
) -> ProofChecked | Rejected:
    """Every check but the SNARK (see module doc)."""
    decoded = decode(raw, ProofRecord)
    if not isinstance(decoded, Decoded):
        return Rejected("proof_not_decodable", decoded.reason, decoded.request_id)
    record = decoded.message
    c = record.claims
    if not verify_proof_signature(record):
        return Rejected("proof_bad_signature", "", c.request_id, c.node_id)
    if c.signed_unix_ms > now_ms + max_clock_skew_s * 1000:
        return Rejected("proof_future_timestamp", "", c.request_id, c.node_id)

    def reject(reason: str, detail: str = "") -> ProofRejected:
        return ProofRejected(reason, detail, c.request_id, c.node_id, record)

    circuit = store.circuit(c.model_digest) if store is not None else None
    if circuit is None:
        return reject("unknown_circuit", "no pinned verifying key for this model digest")
    m = circuit.manifest
    if (c.circuit_digest, c.settings_digest, c.vk_digest, c.ezkl_version) != (
        m.circuit_digest,
        m.settings_digest,
        m.vk_digest,
        m.ezkl_version,
    ):
        return reject("vk_mismatch")
    if (c.srs_digest, c.srs_label) != (m.srs_digest, m.srs_label):
        return reject("srs_mismatch")
    if (m.srs_dev or c.srs_label.startswith(DEV_SRS_PREFIX)) and not allow_dev_srs:
        return reject("dev_srs_refused", "made with a development SRS")
    if sha256_hex(c.input) != c.input_hash:
        return reject("input_hash_mismatch")
    if sha256_hex(c.output) != c.output_hash:
        return reject("output_hash_mismatch")
    problem = instance_problem(m, c.input, c.output, c.public_inputs, c.public_outputs)
    if problem is not None:
        return reject(*problem)
    try:
        proof_bytes(c)
    except ValueError:
        return reject("bad_proof", "proof is not canonical base64")
    return ProofChecked(record, circuit)


def _load_ezkl() -> Any:
    try:
        import ezkl  # type: ignore[import-untyped,unused-ignore]
    except ImportError as e:
        raise ImportError(f"verifying ZKML proofs needs ezkl: {_INSTALL_HINT}") from e
    return ezkl


def _proof_json(record: ProofRecord) -> str:
    return json.dumps(
        {"instances": proof_instances(record.claims), "proof": list(proof_bytes(record.claims))}
    )


def _ezkl_verify(proof_path: str, settings: str, vk: str, srs: str) -> bool:
    try:
        return bool(_load_ezkl().verify(proof_path, settings, vk, srs, False))
    except RuntimeError:  # EZKL reports an unsatisfied proof as an error
        return False


def snark_verify(checked: ProofChecked) -> bool:
    """EZKL's verification, in this process (blocks; holds the GIL for its duration)."""
    c = checked.circuit
    with tempfile.TemporaryDirectory(prefix="og-proof-check-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_text(_proof_json(checked.record))
        return _ezkl_verify(str(path), str(c.settings_path), str(c.vk_path), str(c.srs_path))


def verify_proof_record(
    raw: bytes | None,
    store: VkStore | None,
    *,
    allow_dev_srs: bool = False,
    max_clock_skew_s: float = 300.0,
    now_ms: int,
    snark: Callable[[ProofChecked], bool] = snark_verify,
) -> ProofVerified | Rejected:
    """All checks of the module doc, the SNARK included, in this process."""
    checked = check_proof_record(
        raw, store, allow_dev_srs=allow_dev_srs, max_clock_skew_s=max_clock_skew_s, now_ms=now_ms
    )
    if not isinstance(checked, ProofChecked):
        return checked
    if not snark(checked):
        return snark_rejection(checked, "bad_proof")
    return ProofVerified(checked.record)


def snark_rejection(checked: ProofChecked, reason: str) -> ProofRejected:
    c = checked.record.claims
    return ProofRejected(reason, "", c.request_id, c.node_id, checked.record)


async def verify_snarks(checked: Sequence[ProofChecked], *, timeout_s: float) -> list[bool] | None:
    """SNARK-verify ``checked`` in one child process; None when it timed out or crashed."""
    if not checked:
        return []
    with tempfile.TemporaryDirectory(prefix="og-proof-check-") as tmp:
        jobs = []
        for i, item in enumerate(checked):
            proof_path = Path(tmp) / f"proof-{i}.json"
            await asyncio.to_thread(proof_path.write_text, _proof_json(item.record))
            c = item.circuit
            jobs.append([str(proof_path), str(c.settings_path), str(c.vk_path), str(c.srs_path)])
        jobs_path, results_path = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        await asyncio.to_thread(jobs_path.write_text, json.dumps(jobs))
        try:
            await run_python_module(
                "settlement.proofs", [str(jobs_path), str(results_path)], timeout_s=timeout_s
            )
        except TimeoutError:
            return None
        try:
            results = json.loads(await asyncio.to_thread(results_path.read_bytes))
        except (OSError, ValueError):
            return None
    if not isinstance(results, list) or len(results) != len(checked):
        return None
    return [r is True for r in results]


def main(argv: list[str]) -> int:
    """Child entry: verify every job of ``argv[1]``, write a list of booleans to ``argv[2]``."""
    jobs = json.loads(Path(argv[1]).read_bytes())
    results = [_ezkl_verify(*job) for job in jobs]
    Path(argv[2]).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
