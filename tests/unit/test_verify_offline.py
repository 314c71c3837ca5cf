"""``inference-node verify`` offline: signature, hashes, registration, attestation and policy,
through the command's own entry point (``schemas.verify.offline.main``), with real signatures
(ed25519), a real registration record and a development attestation from the real provider."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest
from nacl.public import PrivateKey

from nodecli.verify import main
from schemas import InferenceRequest, InferenceResult, MLInput, MLOutput, Tensor, Usage
from schemas.attestation import Attestation, encode_b64
from schemas.base import VerificationMode
from schemas.registry import RegistrationRecord
from schemas.requests import input_hash
from schemas.results import output_hash
from schemas.signing import Signer, envelope_digest
from schemas.verify.offline import load_policy
from tests.harness.admission import AUTHORITY, AdmissionFile
from tests.harness.nodes import TestNode
from worker.trust.attestation import DevProvider, attest_node

DATA = Path(__file__).parents[1] / "data" / "attestation"
NOW_MS = 1_795_000_000_000
DIGEST = "ab" * 32
ADMITTED = range(1, 8)
"""Nodes 1-7 are on the authority's list; node 9 registers and signs, but is not."""


def _node(seed: int) -> tuple[TestNode, str]:
    x25519 = PrivateKey(bytes([seed + 100]) * 32).public_key.encode().hex()
    return TestNode.seeded(seed), x25519


def _request(mode: VerificationMode) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-1",
        model="demo-mlp",
        mode=mode,
        created_unix_ms=NOW_MS,
        payload=MLInput(tensors={"x": Tensor(dtype="float32", shape=[1, 2], data=[0.5, 1.0])}),
    )


def _result(node: TestNode, request: InferenceRequest) -> InferenceResult:
    output = MLOutput(tensors={"y": Tensor(dtype="float32", shape=[1], data=[0.25])})
    envelope = node.envelope(
        request.request_id,
        model_id=request.model,
        model_digest=DIGEST,
        mode=request.mode,
        settlement=request.settlement,
        input_hash=input_hash(request.payload),
        output_hash=output_hash(output),
        usage=Usage(),
        request_created_unix_ms=request.created_unix_ms,
        signed_unix_ms=NOW_MS,
    )
    record = node.sign(envelope)
    return InferenceResult(
        request_id=request.request_id,
        envelope=envelope,
        signature=record.signature,
        chain_signature=record.chain_signature,
        output=output,
    )


def _dev_attestation(node: TestNode, x25519: str) -> Attestation:
    provider = DevProvider(bytes([9]) * 32, clock_ms=lambda: NOW_MS)
    return attest_node(
        provider,
        node_id=node.node_id,
        x25519_public_key=x25519,
        chain_address=node.chain_address,
    )


def _record(node: TestNode, x25519: str, attestation: Attestation | None) -> RegistrationRecord:
    return node.registration(
        models=("demo-mlp",),
        digest=DIGEST,
        modes=(VerificationMode.TEE,),
        heartbeat_unix_ms=NOW_MS,
        heartbeat_interval_s=10,
        x25519_public_key=x25519,
        attestation=attestation,
    )


class Cli:
    """The command with the deployment's pinned authority (``--admission authority``) unless a
    test names another admission."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.tmp, self.capsys = tmp_path, capsys
        self.admission = AdmissionFile(tmp_path / "admission.json")
        self.admission.admit_all(
            (TestNode.seeded(n).node_id, TestNode.seeded(n).chain_address) for n in ADMITTED
        )

    def file(self, name: str, value: Any) -> str:
        path = self.tmp / name
        if hasattr(value, "model_dump_json"):
            path.write_text(value.model_dump_json())
        else:
            path.write_text(json.dumps(value))
        return str(path)

    def run(self, *argv: str) -> tuple[int, dict[str, Any]]:
        args = list(argv)
        if argv and "--admission" not in argv:
            args += ["--admission", "authority", "--authority-key", AUTHORITY.node_id]
            args += ["--admission-list", str(self.admission.path)]
        code = main(args)
        out = self.capsys.readouterr().out
        body = out[: out.rindex("}") + 1] if "}" in out else "{}"
        return code, json.loads(body)


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def _failed(report: dict[str, Any]) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["ok"]}


def test_vanilla_result_with_request(cli: Cli) -> None:
    node, _ = _node(1)
    request = _request(VerificationMode.VANILLA)
    reply = cli.file("reply.json", _result(node, request))
    code, report = cli.run(reply, "--request", cli.file("request.json", request))
    assert code == 0 and report["verified"] is True
    names = [c["name"] for c in report["checks"]]
    assert {"signature", "output_hash", "input_hash"} <= set(names)


def test_a_node_nobody_admitted_does_not_verify_however_well_it_signs(cli: Cli) -> None:
    intruder, _ = _node(9)
    request = _request(VerificationMode.VANILLA)
    reply = cli.file("reply.json", _result(intruder, request))
    code, report = cli.run(reply, "--request", cli.file("request.json", request))
    assert code == 1 and _failed(report) == {"admitted", "chain_signature"}
    # "open" admission (closed development networks) counts it, and says so; still nothing
    # ties its chain key to it.
    code, report = cli.run(reply, "--admission", "open")
    assert code == 1 and _failed(report) == {"chain_signature"}
    (admitted,) = [c for c in report["checks"] if c["name"] == "admitted"]
    assert admitted["detail"] == "open"


def test_a_chain_signature_by_another_key_fails(cli: Cli) -> None:
    node, _ = _node(1)
    result = _result(node, _request(VerificationMode.VANILLA))
    other = TestNode.seeded(2).chain.sign_digest(envelope_digest(result.envelope))
    forged = cli.file("forged.json", result.model_copy(update={"chain_signature": other}))
    code, report = cli.run(forged)
    assert code == 1 and _failed(report) == {"chain_signature"}


def test_an_unreadable_or_unsigned_admission_list_verifies_nothing(cli: Cli) -> None:
    node, _ = _node(1)
    reply = cli.file("reply.json", _result(node, _request(VerificationMode.VANILLA)))
    forged = AdmissionFile(cli.tmp / "forged.json", authority=Signer(b"\x0e" * 32))
    forged.admit_all([(node.node_id, node.chain_address)])
    args = ["--admission", "authority", "--authority-key", AUTHORITY.node_id]
    code, report = cli.run(reply, *args, "--admission-list", str(forged.path))
    assert code == 1 and "admitted" in _failed(report)
    code, report = cli.run(reply, *args, "--admission-list", cli.file("junk.json", {"a": 1}))
    assert code == 1 and "admitted" in _failed(report)


def test_tampered_output_and_wrong_request_fail(cli: Cli) -> None:
    node, _ = _node(1)
    request = _request(VerificationMode.VANILLA)
    data = _result(node, request).model_dump(mode="json")
    data["output"]["tensors"]["y"]["data"] = [0.5]
    code, report = cli.run(cli.file("reply.json", data))
    assert code == 1 and _failed(report) == {"output_hash"}
    other = _request(VerificationMode.VANILLA).model_copy(
        update={"payload": MLInput(tensors={"x": Tensor(dtype="float32", shape=[1], data=[2.0])})}
    )
    good = cli.file("good.json", _result(node, request))
    code, report = cli.run(good, "--request", cli.file("other.json", other))
    assert code == 1 and _failed(report) == {"input_hash"}


def test_tee_result_needs_a_verified_registration(cli: Cli) -> None:
    node, x25519 = _node(2)
    request = _request(VerificationMode.TEE)
    reply = cli.file("reply.json", _result(node, request))
    code, report = cli.run(reply)
    assert code == 1 and _failed(report) == {"admitted", "attestation"}

    record = cli.file("reg.json", _record(node, x25519, _dev_attestation(node, x25519)))
    at = str(NOW_MS + 1000)
    code, report = cli.run(reply, "--registration", record, "--at-unix-ms", at)
    assert code == 1 and _failed(report) == {"attestation"}
    (att,) = [c for c in report["checks"] if c["name"] == "attestation"]
    assert "dev_not_allowed" in att["detail"]

    code, report = cli.run(reply, "--registration", record, "--at-unix-ms", at, "--allow-dev")
    assert code == 0, report
    assert {c["name"] for c in report["checks"]} >= {
        "registration_signature",
        "registration_node",
        "registration_model",
        "attestation_binding",
        "attestation",
    }


def test_bare_registration_document(cli: Cli) -> None:
    node, x25519 = _node(3)
    reply = cli.file("reply.json", _result(node, _request(VerificationMode.TEE)))
    bare = {
        "node_id": node.node_id,
        "x25519_public_key": x25519,
        "chain_address": node.chain_address,
        "attestation": _dev_attestation(node, x25519).model_dump(mode="json"),
    }
    args = ("--at-unix-ms", str(NOW_MS + 1000), "--allow-dev")
    code, report = cli.run(reply, "--registration", cli.file("bare.json", bare), *args)
    assert code == 0, report
    assert "registration_signature" not in {c["name"] for c in report["checks"]}
    missing = {k: v for k, v in bare.items() if k != "chain_address"}
    code, report = cli.run(reply, "--registration", cli.file("m.json", missing), *args)
    assert code == 1 and _failed(report) == {"registration"}


def test_registration_of_another_node_or_keys_fails(cli: Cli) -> None:
    node, x25519 = _node(4)
    other, other_x = _node(5)
    reply = cli.file("reply.json", _result(node, _request(VerificationMode.TEE)))
    args = ("--at-unix-ms", str(NOW_MS + 1000), "--allow-dev")
    # the other node's own, valid registration does not vouch for this result
    foreign = cli.file("foreign.json", _record(other, other_x, _dev_attestation(other, other_x)))
    code, report = cli.run(reply, "--registration", foreign, *args)
    assert code == 1 and _failed(report) == {"registration_node"}
    # our registration carrying evidence made for other keys: the binding check catches it
    stolen = cli.file("stolen.json", _record(node, x25519, _dev_attestation(other, other_x)))
    code, report = cli.run(reply, "--registration", stolen, *args)
    assert code == 1 and _failed(report) == {"attestation_binding", "attestation"}
    # a registration altered after signing
    data = _record(node, x25519, _dev_attestation(node, x25519)).model_dump(mode="json")
    data["registration"]["software_version"] = "9.9.9"
    code, report = cli.run(reply, "--registration", cli.file("altered.json", data), *args)
    assert code == 1 and _failed(report) == {"registration_signature"}


def test_genuine_evidence_of_another_machine_is_not_ours(cli: Cli) -> None:
    """A real Intel-signed TDX quote, replayed in our registration, does not bind our keys."""
    node, x25519 = _node(6)
    reply = cli.file("reply.json", _result(node, _request(VerificationMode.TEE)))
    quote = (DATA / "tdx_quote_v4.bin").read_bytes()
    collateral = json.loads((DATA / "tdx_quote_v4_collateral.json").read_text())
    sample_rd = dcap_qvl.parse_quote(quote).report.report_data
    replayed = Attestation(
        kind="tdx",
        evidence=encode_b64(quote),
        report_data=sample_rd.hex(),
        issued_unix_ms=1_750_329_147_000,
        collateral=collateral,
    )
    record = cli.file("reg.json", _record(node, x25519, replayed))
    code, report = cli.run(reply, "--registration", record, "--at-unix-ms", "1750329147000")
    assert code == 1 and _failed(report) == {"attestation_binding", "attestation"}
    (att,) = [c for c in report["checks"] if c["name"] == "attestation"]
    detail = json.loads(att["detail"])
    assert detail["kind"] == "tdx" and "report_data_mismatch" in detail["reasons"]
    assert detail["measurement"] is not None  # the quote itself verified: it is only not ours


def test_policy_file_and_options(cli: Cli, tmp_path: Path) -> None:
    policy = load_policy(
        {"allowed_measurements": {"tdx": ["AB" * 4]}, "allow_dev": True, "max_age_s": 60}
    )
    assert policy.allowed_measurements == {"tdx": frozenset({"ab" * 4})}
    assert policy.allow_dev and policy.max_age_s == 60
    with pytest.raises(ValueError, match="allow_everything"):
        load_policy({"allow_everything": True})
    with pytest.raises(ValueError, match="not hex"):
        load_policy({"allowed_measurements": {"tdx": ["zz"]}})
    with pytest.raises(ValueError, match="allowed_measurements"):
        load_policy({"allowed_measurements": {"sgx": ["00"]}})
    assert load_policy({}).allowed_measurements == {} and not load_policy({}).allow_dev
    node, x25519 = _node(7)
    reply = cli.file("reply.json", _result(node, _request(VerificationMode.TEE)))
    att = _dev_attestation(node, x25519)
    record = cli.file("reg.json", _record(node, x25519, att))
    dev_key = json.loads(base64.b64decode(att.evidence))["statement"]["public_key"]
    policy_file = cli.file("policy.json", {"allow_dev": True, "now_unix_ms": NOW_MS + 1000})
    code, _ = cli.run(reply, "--registration", record, "--attestation-policy", policy_file)
    assert code == 0
    pin = f"dev={'00' * 32}"
    code, report = cli.run(
        reply, "--registration", record, "--attestation-policy", policy_file,
        "--allow-measurement", pin,
    )  # fmt: skip
    assert code == 1 and "measurement_not_allowed" in json.dumps(report)
    code, _ = cli.run(
        reply, "--registration", record, "--attestation-policy", policy_file,
        "--allow-measurement", f"dev={dev_key}",
    )  # fmt: skip
    assert code == 0
    stale = cli.file("stale.json", {"allow_dev": True, "now_unix_ms": NOW_MS + 8 * 86_400_000})
    code, report = cli.run(reply, "--registration", record, "--attestation-policy", stale)
    assert code == 1 and "stale" in json.dumps(report)
    assert cli.run(reply, "--allow-measurement", "nonsense")[0] == 1
    assert cli.run()[0] == 2
    assert cli.run("--registration", record)[0] == 2
