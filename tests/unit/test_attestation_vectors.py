"""The attestation test vectors, recomputed from first principles (hashlib, RFC 8785, ed25519)
and checked against our implementation, so docs/protocol/attestation.md, the vectors and the
code agree; plus the binding's input rules and the wire model's encodings."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from nacl.public import PrivateKey
from nacl.signing import SigningKey, VerifyKey
from pydantic import ValidationError

from schemas.attestation import Attestation, binding_report_data
from schemas.verify.attestation import AttestationPolicy, verify_node_attestation

VECTORS = Path(__file__).parents[2] / "docs" / "vectors"
BINDING = json.loads((VECTORS / "attestation-binding-v1.json").read_text())
DEV = json.loads((VECTORS / "attestation-dev-v1.json").read_text())
BINDING_DOMAIN = b"og-inference-node/attestation-binding/v1"
DEV_DOMAIN = b"og-inference-node/dev-attestation/v1"


def _binding(node_id: str, x25519_public_key: str, chain_address: str) -> bytes:
    payload = rfc8785.dumps(
        {"node_id": node_id, "x25519_public_key": x25519_public_key, "chain_address": chain_address}
    )
    return hashlib.sha512(BINDING_DOMAIN + b"\x00" + payload).digest()


@pytest.mark.parametrize("v", BINDING["vectors"], ids=[v["name"] for v in BINDING["vectors"]])
def test_binding_vector_from_first_principles(v: dict[str, Any]) -> None:
    assert BINDING["domain"].encode() == BINDING_DOMAIN
    seeds = v["seeds"]
    assert (
        SigningKey(bytes.fromhex(seeds["ed25519_seed_hex"])).verify_key.encode().hex()
        == (v["node_id"])
    )
    x25519 = PrivateKey(bytes.fromhex(seeds["x25519_seed_hex"])).public_key.encode().hex()
    assert x25519 == v["x25519_public_key"]
    keys = {k: v[k] for k in ("node_id", "x25519_public_key", "chain_address")}
    assert rfc8785.dumps(keys).decode() == v["canonical_payload"]
    expected = _binding(**keys)
    assert len(expected) == 64
    assert expected.hex() == v["report_data_hex"]
    assert binding_report_data(**keys) == expected


def test_dev_vector_from_first_principles() -> None:
    (v,) = DEV["vectors"]
    node, statement, attestation = v["node"], v["statement"], v["attestation"]
    assert statement["report_data"] == _binding(**node).hex() == attestation["report_data"]
    key = SigningKey(bytes.fromhex(v["dev_seed_hex"]))
    assert key.verify_key.encode().hex() == v["dev_public_key"] == statement["public_key"]
    assert rfc8785.dumps(statement).decode() == v["canonical_statement"]
    digest = hashlib.sha256(DEV_DOMAIN + b"\x00" + rfc8785.dumps(statement)).digest()
    assert digest.hex() == v["signing_digest_hex"]
    assert key.sign(digest).signature.hex() == v["signature"]
    VerifyKey(key.verify_key.encode()).verify(digest, bytes.fromhex(v["signature"]))
    evidence = rfc8785.dumps({"statement": statement, "signature": v["signature"]})
    assert evidence.decode() == v["canonical_evidence"]
    assert base64.b64decode(attestation["evidence"], validate=True) == evidence
    assert attestation["kind"] == "dev"


def test_dev_vector_verifies_with_our_code_only_when_allowed() -> None:
    (v,) = DEV["vectors"]
    att = Attestation.model_validate(v["attestation"])
    at = att.issued_unix_ms + 1000
    allowed = AttestationPolicy(now_unix_ms=at, allow_dev=True)
    assert verify_node_attestation(**v["node"], attestation=att, policy=allowed).ok
    default = AttestationPolicy(now_unix_ms=at)
    assert not verify_node_attestation(**v["node"], attestation=att, policy=default).ok


@pytest.mark.parametrize(
    "bad",
    [
        {"node_id": "AA" * 32},
        {"node_id": "aa" * 31},
        {"x25519_public_key": "0x" + "bb" * 32},
        {"chain_address": "0x" + "Cc" * 20},  # EIP-55 spelling: one key, one binding
        {"chain_address": "cc" * 20},
    ],
)
def test_binding_inputs_have_one_spelling(bad: dict[str, str]) -> None:
    keys = {"node_id": "aa" * 32, "x25519_public_key": "bb" * 32, "chain_address": "0x" + "cc" * 20}
    keys.update(bad)
    with pytest.raises(ValueError):
        binding_report_data(**keys)


def test_attestation_wire_model() -> None:
    good: dict[str, Any] = {
        "kind": "tdx",
        "evidence": "AAEC",
        "report_data": "00" * 64,
        "issued_unix_ms": 1,
    }
    att = Attestation.model_validate(good)
    assert att.evidence_bytes() == b"\x00\x01\x02" and att.certificates == []
    for field, value in [
        ("kind", "sgx"),
        ("evidence", "AAE"),  # unpadded
        ("evidence", "AA EC"),
        ("evidence", "AAE-"),  # url-safe alphabet
        ("report_data", "00" * 32),
        ("report_data", "AA" * 64),
    ]:
        with pytest.raises(ValidationError):
            Attestation.model_validate({**good, field: value})
    with pytest.raises(ValidationError):
        Attestation.model_validate({**good, "extra": 1})
    # round trip through the canonical JSON form keeps every byte
    assert Attestation.model_validate_json(att.model_dump_json()) == att
