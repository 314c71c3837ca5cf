"""Nitro documents that bind OUR keys. No real enclave is reachable here, so this test builds
its own PKI (a P-384 root, an intermediate and a leaf, like AWS's chain) and COSE_Sign1 /
ES384 documents with cryptography and cbor2, shaped exactly like the NSM's. The real AWS
document in test_verify_attestation.py shows the same verifier accepts genuine AWS output;
here we check the binding and every rule that the real sample cannot exercise."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from schemas.attestation import Attestation, binding_report_data, encode_b64
from schemas.verify.attestation import AttestationPolicy, Reason, registration_check
from schemas.verify.attestation import verify_node_attestation as verify_node

NOW = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)
KEYS = {
    "node_id": "11" * 32,
    "x25519_public_key": "22" * 32,
    "chain_address": "0x" + "ab" * 20,
}
PCRS = {i: bytes([i + 1]) * 48 if i < 3 else bytes(48) for i in range(16)}
MEASUREMENT = (PCRS[0] + PCRS[1] + PCRS[2]).hex()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
    not_after: datetime,
) -> x509.Certificate:
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    return builder.sign(issuer_key, hashes.SHA384())


@dataclass
class Pki:
    root: x509.Certificate
    inter: x509.Certificate
    leaf: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey

    @property
    def root_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def pki() -> Pki:
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(3))
    root = _cert("test.nitro-root", root_key, None, ca=True, not_after=NOW + timedelta(days=900))
    inter = _cert(
        "test.zonal", inter_key, ("test.nitro-root", root_key), ca=True,
        not_after=NOW + timedelta(days=10),
    )  # fmt: skip
    leaf = _cert(
        "test.enclave", leaf_key, ("test.zonal", inter_key), ca=False,
        not_after=NOW + timedelta(hours=3),
    )  # fmt: skip
    return Pki(root, inter, leaf, leaf_key)


def document(pki: Pki, *, user_data: bytes | None, **override: Any) -> bytes:
    """A COSE_Sign1 attestation document as the NSM returns it."""
    der = serialization.Encoding.DER
    payload = {
        "module_id": "i-test-enc0001",
        "digest": "SHA384",
        "timestamp": NOW_MS - 1000,
        "pcrs": PCRS,
        "certificate": pki.leaf.public_bytes(der),
        "cabundle": [pki.root.public_bytes(der), pki.inter.public_bytes(der)],
        "public_key": None,
        "user_data": user_data,
        "nonce": None,
    }
    payload.update(override)
    protected = cbor2.dumps({1: -35})
    body = cbor2.dumps(payload)
    to_sign = cbor2.dumps(["Signature1", protected, b"", body])
    r, s = decode_dss_signature(pki.leaf_key.sign(to_sign, ec.ECDSA(hashes.SHA384())))
    signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, body, signature]))


def record(raw: bytes, report_data: bytes) -> Attestation:
    return Attestation(
        kind="nitro",
        evidence=encode_b64(raw),
        report_data=report_data.hex(),
        issued_unix_ms=NOW_MS - 1000,
        provider="nsm",
    )


def policy(pki: Pki, **kw: Any) -> AttestationPolicy:
    args: dict[str, Any] = {
        "now_unix_ms": NOW_MS,
        "nitro_root_ders": (pki.root_der,),
        "allowed_measurements": {"nitro": frozenset({MEASUREMENT})},
    }
    args.update(kw)
    return AttestationPolicy(**args)


def test_document_binding_our_keys_verifies(pki: Pki) -> None:
    binding = binding_report_data(**KEYS)
    verdict = verify_node(
        **KEYS, attestation=record(document(pki, user_data=binding), binding), policy=policy(pki)
    )
    assert verdict.ok, verdict.reasons
    assert verdict.measurement == MEASUREMENT
    assert verdict.claims["module_id"] == "i-test-enc0001"


def test_registration_check_predicate(pki: Pki) -> None:
    binding = binding_report_data(**KEYS)

    @dataclass
    class Reg:
        node_id: str
        x25519_public_key: str
        chain_address: str
        attestation: Attestation | None

    check = registration_check(policy(pki))
    good = record(document(pki, user_data=binding), binding)
    assert check(Reg(**KEYS, attestation=good))
    assert not check(Reg(**KEYS, attestation=None))
    other_keys = dict(KEYS, x25519_public_key="33" * 32)
    assert not check(Reg(**other_keys, attestation=good))


@pytest.mark.parametrize("field", ["node_id", "x25519_public_key", "chain_address"])
def test_binding_of_other_keys_rejected(pki: Pki, field: str) -> None:
    """Evidence for one set of keys cannot be reused for a node that swapped any one key."""
    binding = binding_report_data(**KEYS)
    att = record(document(pki, user_data=binding), binding)
    swapped = dict(KEYS)
    swapped[field] = "0x" + "cd" * 20 if field == "chain_address" else "cd" * 32
    verdict = verify_node(**swapped, attestation=att, policy=policy(pki))
    assert Reason.REPORT_DATA in verdict.reasons


def test_rules(pki: Pki) -> None:
    binding = binding_report_data(**KEYS)

    def reasons(raw: bytes, **kw: Any) -> tuple[str, ...]:
        return verify_node(
            **KEYS, attestation=record(raw, binding), policy=policy(pki, **kw)
        ).reasons

    good = document(pki, user_data=binding)
    assert reasons(good, allowed_measurements={}) == (Reason.MEASUREMENT,)
    debug = document(pki, user_data=binding, pcrs={i: bytes(48) for i in range(16)})
    assert reasons(debug, allowed_measurements={"nitro": frozenset({"00" * 144})}) == (
        f"{Reason.DEBUG}: PCR0 is zero (debug-mode enclave)",
    )
    assert reasons(document(pki, user_data=None)) == (Reason.REPORT_DATA,)
    assert any(r.startswith(Reason.STALE) for r in reasons(good, max_age_s=0.5))
    future = document(pki, user_data=binding, timestamp=NOW_MS + 3_600_000)
    assert any(r.startswith(Reason.FUTURE) for r in reasons(future))
    # A timestamp outside the leaf certificate's life is not believable.
    backdated = document(pki, user_data=binding, timestamp=NOW_MS - 8 * 86_400_000)
    assert reasons(backdated)[0].startswith(Reason.CHAIN)
    # judged at its own time: still valid after the leaf expired, until max_age_s
    assert reasons(good, now_unix_ms=NOW_MS + 4 * 3_600_000) == ()
    expired = reasons(good, now_unix_ms=NOW_MS + 4 * 3_600_000, max_age_s=3600)
    assert expired[0].startswith(Reason.STALE)
    assert reasons(good, nitro_root_ders=())[0].startswith(Reason.CHAIN)
    wrong_digest = document(pki, user_data=binding, digest="SHA256")
    assert reasons(wrong_digest)[0].startswith(Reason.MALFORMED)
    no_chain = document(pki, user_data=binding, cabundle=[])
    assert reasons(no_chain)[0].startswith(Reason.MALFORMED)
    skip_intermediate = document(pki, user_data=binding, cabundle=[pki.root_der])
    assert reasons(skip_intermediate)[0].startswith(Reason.CHAIN)


def test_resigned_by_an_untrusted_key_rejected(pki: Pki) -> None:
    """An attacker who builds a perfect document with their own key, or who re-signs a real
    one, fails the chain check (the leaf must chain to the pinned root)."""
    binding = binding_report_data(**KEYS)
    forged_key = ec.generate_private_key(ec.SECP384R1())
    forged = Pki(pki.root, pki.inter, pki.leaf, forged_key)
    raw = document(forged, user_data=binding)
    reasons = verify_node(**KEYS, attestation=record(raw, binding), policy=policy(pki)).reasons
    assert reasons == (Reason.SIGNATURE,)
    self_rooted = Pki(
        _cert("evil", forged_key, None, ca=True, not_after=NOW + timedelta(days=1)),
        pki.inter,
        pki.leaf,
        forged_key,
    )
    raw = document(self_rooted, user_data=binding)
    reasons = verify_node(**KEYS, attestation=record(raw, binding), policy=policy(pki)).reasons
    assert reasons == (Reason.SIGNATURE,)  # leaf is still genuine; the signature is not its


def test_untagged_cose_accepted_and_wrong_algorithm_rejected(pki: Pki) -> None:
    binding = binding_report_data(**KEYS)
    tagged = cbor2.loads(document(pki, user_data=binding))
    untagged = cbor2.dumps(tagged.value)
    assert verify_node(**KEYS, attestation=record(untagged, binding), policy=policy(pki)).ok
    _protected, unprotected, body, sig = tagged.value
    es256 = cbor2.dumps([cbor2.dumps({1: -7}), unprotected, body, sig])
    verdict = verify_node(**KEYS, attestation=record(es256, binding), policy=policy(pki))
    assert verdict.reasons[0].startswith(Reason.MALFORMED)
