"""Signatures end to end without a broker: the real demo ONNX model, the real pipeline and an
ed25519 signer; every envelope field is covered by the signature, and the key file on disk is
guarded."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from schemas.base import SettlementMode, VerificationMode
from schemas.payer import Payer
from schemas.requests import InferenceRequest, MLInput, Tensor, input_hash
from schemas.results import InferenceResult, MLOutput, ResultEnvelope, Usage, output_hash
from schemas.signing import ChainSigner, Signer, envelope_digest, verify_envelope_signature
from schemas.verify.result import Trust, VerificationReport, verify_result
from tests.harness.admission import trust_in
from tests.harness.pipeline import CHAIN_SIGNER
from worker.engines import load_engine
from worker.modelstore.local_hub import LocalHub
from worker.pipeline import Pipeline
from worker.trust.keys import KeyFileError, load_or_create_seed

SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
NOW_MS = 1_700_000_000_000


def _request(data: list[bool | int | float | str] | None = None) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-sign-1",
        model="demo-mlp",
        created_unix_ms=NOW_MS - 5,
        payload=MLInput(
            tensors={
                "x": Tensor(dtype="float32", shape=[1, 4], data=data or [0.5, -1.0, 2.0, 0.25])
            }
        ),
    )


@pytest.fixture
def signer() -> Signer:
    return Signer(SEED)


@pytest.fixture
async def signed(demo_hub: Path, tmp_path: Path, signer: Signer) -> InferenceResult:
    hub = LocalHub(demo_hub)
    ref = hub.resolve("demo-mlp")
    engine = await load_engine(ref, hub.materialize(ref, tmp_path))
    try:
        pipeline = Pipeline({"demo-mlp": engine}, signer, CHAIN_SIGNER, clock_ms=lambda: NOW_MS)
        outcome = await pipeline.handle(_request())
    finally:
        await engine.close()
    assert isinstance(outcome.reply, InferenceResult), outcome.reply
    return outcome.reply


def _trust(signer: Signer) -> Trust:
    return trust_in([(signer.node_id, CHAIN_SIGNER.address)], NOW_MS)


def _failed(report: VerificationReport) -> set[str]:
    return {c.name for c in report.checks if not c.ok}


def test_real_result_verifies(signed: InferenceResult, signer: Signer) -> None:
    report = verify_result(signed, _request(), trust=_trust(signer))
    assert report.ok, report.as_dict()
    assert {c.name for c in report.checks} == {
        "signature",
        "admitted",
        "chain_signature",
        "request_id",
        "output_hash",
        "request_match",
        "model",
        "mode",
        "request_terms",
        "input_hash",
    }
    assert verify_envelope_signature(signed.envelope, signed.signature)
    assert isinstance(signed.output, MLOutput)
    assert signed.output.tensors["probabilities"].shape == [1, 3]


def test_signature_is_deterministic_ed25519_over_domain_digest(
    signed: InferenceResult, signer: Signer
) -> None:
    assert signer.sign_envelope(signed.envelope) == signed.signature
    expected = SigningKey(SEED).sign(envelope_digest(signed.envelope)).signature.hex()
    assert signed.signature == expected


def _alternatives(env: ResultEnvelope) -> dict[str, Any]:
    """A different, valid value for every envelope field (nested usage fields included)."""
    return {
        # Literal[2]: there is no other valid version; a changed one must still break the
        # signature rather than be ignored.
        "schema_version": 3,
        "request_id": env.request_id + "x",
        "model_id": "demo-lm",
        "model_digest": "0" * 64 if env.model_digest != "0" * 64 else "1" * 64,
        "mode": VerificationMode.TEE,
        "input_hash": "0" * 64,
        "output_hash": "0" * 64,
        "usage.input_tokens": env.usage.input_tokens + 1,
        "usage.output_tokens": env.usage.output_tokens + 1,
        "settlement": SettlementMode.PRIVATE,
        "request_created_unix_ms": env.request_created_unix_ms - 1,
        "max_output_tokens": 7,
        "payer": Payer(scheme="ed25519", key="11" * 32, signature="22" * 64),
        "node_id": Signer(OTHER_SEED).node_id,
        "signed_unix_ms": env.signed_unix_ms + 1,
    }


def test_every_envelope_field_is_covered_by_the_signature(
    signed: InferenceResult, signer: Signer
) -> None:
    env = signed.envelope
    trust = _trust(signer)
    alternatives = _alternatives(env)
    top_level = {k.split(".")[0] for k in alternatives}
    assert top_level == set(ResultEnvelope.model_fields), "a new field needs a tamper case"
    usage_fields = {k.split(".")[1] for k in alternatives if k.startswith("usage.")}
    assert usage_fields == set(Usage.model_fields)

    for path, value in alternatives.items():
        if path.startswith("usage."):
            usage = env.usage.model_copy(update={path.split(".")[1]: value})
            tampered = env.model_copy(update={"usage": usage})
        else:
            assert getattr(env, path) != value, path
            tampered = env.model_copy(update={path: value})
        assert tampered != env, path
        assert not verify_envelope_signature(tampered, signed.signature), path
        report = verify_result(signed.model_copy(update={"envelope": tampered}), trust=trust)
        assert {"signature", "chain_signature"} <= _failed(report), path


@pytest.mark.parametrize("bit", [0, 7, 8 * 31 + 3, 8 * 32, 8 * 63 + 7])
def test_flipping_any_signature_bit_fails(signed: InferenceResult, bit: int) -> None:
    sig = bytearray(bytes.fromhex(signed.signature))
    sig[bit // 8] ^= 1 << (bit % 8)
    assert not verify_envelope_signature(signed.envelope, sig.hex())


@pytest.mark.parametrize("signature", ["", "00", "zz" * 64, "ab" * 63, "ab" * 65])
def test_malformed_signature_fails_without_raising(signed: InferenceResult, signature: str) -> None:
    assert verify_envelope_signature(signed.envelope, signature) is False


def test_signature_from_another_key_fails(signed: InferenceResult, signer: Signer) -> None:
    forged = SigningKey(OTHER_SEED).sign(envelope_digest(signed.envelope)).signature.hex()
    assert not verify_envelope_signature(signed.envelope, forged)
    report = verify_result(signed.model_copy(update={"signature": forged}), trust=_trust(signer))
    assert _failed(report) == {"signature"}


def test_a_node_nobody_admitted_signing_its_own_copy_is_refused(
    signed: InferenceResult, signer: Signer
) -> None:
    other, other_chain = Signer(OTHER_SEED), ChainSigner(b"\x05" * 32)
    env = signed.envelope.model_copy(update={"node_id": other.node_id})
    digest = envelope_digest(env)
    forged = signed.model_copy(
        update={
            "envelope": env,
            "signature": other.sign_envelope(env),
            "chain_signature": other_chain.sign_digest(digest),
        }
    )
    report = verify_result(forged, _request(), trust=_trust(signer))
    assert _failed(report) == {"admitted", "chain_signature"}
    # With no admission facts at all, nothing verifies.
    assert "admitted" in _failed(verify_result(signed, _request()))


def test_tampered_output_fails_output_hash(signed: InferenceResult, signer: Signer) -> None:
    assert isinstance(signed.output, MLOutput)
    probs = signed.output.tensors["probabilities"]
    data = list(probs.data)
    data[0] = float(data[0]) + 0.125  # type: ignore[arg-type]
    output = MLOutput(tensors={"probabilities": probs.model_copy(update={"data": data})})
    assert output_hash(output) != signed.envelope.output_hash

    report = verify_result(
        signed.model_copy(update={"output": output}), _request(), trust=_trust(signer)
    )
    assert _failed(report) == {"output_hash"}
    assert not report.ok


def test_different_request_payload_fails_input_hash(
    signed: InferenceResult, signer: Signer
) -> None:
    other = _request([0.5, -1.0, 2.0, 0.5])
    assert input_hash(other.payload) != signed.envelope.input_hash
    assert _failed(verify_result(signed, other, trust=_trust(signer))) == {"input_hash"}


def test_other_request_terms_fail_request_terms(signed: InferenceResult, signer: Signer) -> None:
    for update in (
        {"settlement": SettlementMode.INDIVIDUAL},
        {"created_unix_ms": NOW_MS - 6},
    ):
        other = _request().model_copy(update=update)
        assert _failed(verify_result(signed, other, trust=_trust(signer))) == {"request_terms"}


def test_reply_request_id_must_match_envelope(signed: InferenceResult, signer: Signer) -> None:
    report = verify_result(
        signed.model_copy(update={"request_id": "someone-else"}), trust=_trust(signer)
    )
    assert _failed(report) == {"request_id"}


def test_signer_repr_hides_the_key(signer: Signer) -> None:
    secret_forms = [SEED.hex(), SigningKey(SEED).encode().hex(), bytes(SigningKey(SEED)).hex()]
    for text in (repr(signer), str(signer), f"{signer!r}"):
        for secret in secret_forms:
            assert secret not in text
            assert secret[:16] not in text
    assert signer.node_id[:16] in repr(signer)


def test_signer_node_id_is_the_public_key(signer: Signer) -> None:
    assert signer.node_id == SigningKey(SEED).verify_key.encode().hex()
    assert signer.node_id != Signer(OTHER_SEED).node_id


def test_signer_refuses_envelope_naming_another_node(
    signed: InferenceResult, signer: Signer
) -> None:
    env = signed.envelope.model_copy(update={"node_id": Signer(OTHER_SEED).node_id})
    with pytest.raises(ValueError, match="another node"):
        signer.sign_envelope(env)


# --- key file ---------------------------------------------------------------------------------


def test_seed_file_created_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    seed = load_or_create_seed(path)
    assert len(seed) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == seed.hex()
    assert load_or_create_seed(path) == seed
    assert load_or_create_seed(tmp_path / "keys" / "other.key") != seed


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_seed_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    load_or_create_seed(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_seed(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("zz" * 32, "hex"),
        ("not a key", "hex"),
        ("ab" * 31, "31 bytes"),
        ("ab" * 33, "33 bytes"),
        ("", "0 bytes"),
    ],
)
def test_seed_file_with_bad_content_refused(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "node.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=match):
        load_or_create_seed(path)
    assert path.read_text() == content  # never overwritten
