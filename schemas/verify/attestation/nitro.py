"""AWS Nitro Enclaves attestation documents: COSE_Sign1 / ES384, verified offline.

The document (RFC 9052 COSE_Sign1, optionally CBOR tag 18) is
``[protected: bstr({1: -35}), unprotected: {}, payload: bstr, signature: bstr(96)]``; the payload
is a CBOR map with ``module_id``, ``digest`` ("SHA384"), ``timestamp`` (ms), ``pcrs``
({index: 48 bytes}), ``certificate`` (DER leaf), ``cabundle`` ([root, ..., issuer of leaf]),
and optional ``public_key``, ``user_data`` and ``nonce``.

Verification: RFC 5280 path validation from the leaf through ``cabundle`` to a root the policy
supplies as data (AWS Nitro Root-G1 by default), at the document's timestamp (a leaf lives
three hours; the policy's ``max_age_s`` bounds how old a document may be); then ECDSA P-384 /
SHA-384 over ``Sig_structure = ["Signature1", protected, h'', payload]`` with the leaf's key
(the signature is r || s, 48 bytes each). A document from a debug-mode enclave has PCR0-2 all
zero, and is rejected as such.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason

__all__ = ["NitroDocument", "nitro_measurement", "parse_nitro_document", "verify_nitro_document"]

COSE_SIGN1_TAG = 18
ES384 = -35
MAX_DOCUMENT_BYTES = 32_768
PCR_BYTES = 48
MAX_TIMESTAMP_MS = 253_402_300_800_000  # 10000-01-01: beyond it datetime cannot go


@dataclass(frozen=True)
class NitroDocument:
    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: list[bytes]
    user_data: bytes | None
    public_key: bytes | None
    nonce: bytes | None


class _Malformed(Exception):
    pass


def nitro_measurement(pcrs: Mapping[int, bytes]) -> str:
    """The allow-list value: hex(PCR0 || PCR1 || PCR2)."""
    return (pcrs[0] + pcrs[1] + pcrs[2]).hex()


def _opt_bytes(payload: Mapping[Any, Any], key: str) -> bytes | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise _Malformed(key)
    return value


def parse_nitro_document(raw: bytes) -> NitroDocument:
    """Decode (not verify) a document; raises ``ValueError`` when it is not well formed."""
    try:
        return _parse(raw)
    except (_Malformed, cbor2.CBORDecodeError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"not a Nitro attestation document ({e})") from None


def _parse(raw: bytes) -> NitroDocument:
    if not 0 < len(raw) <= MAX_DOCUMENT_BYTES:
        raise _Malformed("size")
    outer = cbor2.loads(raw)
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise _Malformed("tag")
        outer = outer.value
    if not isinstance(outer, list | tuple) or len(outer) != 4:
        raise _Malformed("COSE_Sign1 shape")
    # cbor2 decodes an array inside a tag as a tuple (the COSE tag 18 form)
    protected, _unprotected, payload_raw, signature = outer
    if not all(isinstance(v, bytes) for v in (protected, payload_raw, signature)):
        raise _Malformed("COSE_Sign1 fields")
    header = cbor2.loads(protected)
    if not isinstance(header, Mapping) or header.get(1) != ES384:
        raise _Malformed("algorithm is not ES384")
    payload = cbor2.loads(payload_raw)
    if not isinstance(payload, Mapping):
        raise _Malformed("payload")
    pcrs = payload["pcrs"]
    if not isinstance(pcrs, Mapping) or not all(
        isinstance(k, int) and isinstance(v, bytes) for k, v in pcrs.items()
    ):
        raise _Malformed("pcrs")
    if any(len(pcrs.get(i, b"")) != PCR_BYTES for i in (0, 1, 2)):
        raise _Malformed("PCR0-2")
    cabundle = payload["cabundle"]
    if not isinstance(cabundle, list | tuple) or not cabundle:
        raise _Malformed("cabundle")
    if not all(isinstance(c, bytes) for c in cabundle):
        raise _Malformed("cabundle")
    module_id, digest, timestamp = payload["module_id"], payload["digest"], payload["timestamp"]
    certificate = payload["certificate"]
    if not (isinstance(module_id, str) and module_id and digest == "SHA384"):
        raise _Malformed("module_id/digest")
    if not isinstance(timestamp, int) or not 0 < timestamp < MAX_TIMESTAMP_MS:
        raise _Malformed("timestamp")
    if not isinstance(certificate, bytes):
        raise _Malformed("certificate")
    return NitroDocument(
        protected=protected,
        payload=payload_raw,
        signature=signature,
        module_id=module_id,
        timestamp_ms=timestamp,
        pcrs=dict(pcrs),
        certificate=certificate,
        cabundle=list(cabundle),
        user_data=_opt_bytes(payload, "user_data"),
        public_key=_opt_bytes(payload, "public_key"),
        nonce=_opt_bytes(payload, "nonce"),
    )


def _check_chain(doc: NitroDocument, policy: AttestationPolicy) -> str | None:
    try:
        leaf = x509.load_der_x509_certificate(doc.certificate)
        bundle = [x509.load_der_x509_certificate(c) for c in doc.cabundle]
        roots = [x509.load_der_x509_certificate(r) for r in policy.nitro_root_ders]
    except ValueError:
        return f"{Reason.MALFORMED}: certificate"
    if not roots:
        return f"{Reason.CHAIN}: no trusted Nitro root configured"
    # The chain is checked at the time the document was signed (its leaf certificate lives
    # three hours); how old a document may be is the policy's max_age_s, checked afterwards.
    at = datetime.fromtimestamp(doc.timestamp_ms / 1000, UTC)
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(at)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, bundle)
    except VerificationError as e:
        return f"{Reason.CHAIN}: {str(e)[:120]}"
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        return f"{Reason.CHAIN}: leaf key is not P-384"
    return None


def _check_signature(doc: NitroDocument) -> bool:
    if len(doc.signature) != 2 * PCR_BYTES:
        return False
    key = x509.load_der_x509_certificate(doc.certificate).public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    to_be_signed = cbor2.dumps(["Signature1", doc.protected, b"", doc.payload])
    r = int.from_bytes(doc.signature[:48], "big")
    s = int.from_bytes(doc.signature[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        return False
    return True


def verify_nitro_document(
    raw: bytes, *, expected_user_data: bytes, policy: AttestationPolicy
) -> AttestationVerdict:
    """Verify a raw document; ``user_data`` must equal ``expected_user_data``. Never raises."""
    kind = "nitro"
    try:
        doc = parse_nitro_document(raw)
    except ValueError as e:
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: {str(e)[:120]}")
    try:
        chain_problem = _check_chain(doc, policy)
        signed = chain_problem is None and _check_signature(doc)
    except Exception as e:  # certificates cryptography cannot even load (bad version, key)
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: {type(e).__name__}")
    if chain_problem is not None:
        return AttestationVerdict.reject(kind, chain_problem)
    if not signed:
        return AttestationVerdict.reject(kind, Reason.SIGNATURE)
    measurement = nitro_measurement(doc.pcrs)
    reasons: list[str] = []
    if not any(doc.pcrs[0]) and not policy.allow_debug:
        reasons.append(f"{Reason.DEBUG}: PCR0 is zero (debug-mode enclave)")
    if doc.user_data is None or not hmac.compare_digest(doc.user_data, expected_user_data):
        reasons.append(Reason.REPORT_DATA)
    if not policy.measurement_allowed(kind, measurement):
        reasons.append(Reason.MEASUREMENT)
    reasons += policy.age_reasons(doc.timestamp_ms)
    claims = {"module_id": doc.module_id, "timestamp_ms": str(doc.timestamp_ms)}
    return AttestationVerdict.decide(kind, reasons, measurement, claims)
