"""TEE attestation on the wire, and the binding of a node's keys into it (pure, no I/O).

A node proves that its keys live inside a trusted execution environment by asking the hardware
for evidence (an Intel TDX quote, an AMD SEV-SNP report, an AWS Nitro document) whose 64-byte
``report_data`` field is a hash of all three of its public keys::

    report_data = SHA-512("og-inference-node/attestation-binding/v1" || 0x00 ||
                          JCS({"chain_address": A, "node_id": N, "x25519_public_key": X}))

SHA-512 fills the 64 bytes exactly (no padding rule to get wrong); the domain tag stops the
hash being mistaken for any other 64-byte value a TEE was asked to sign; RFC 8785 (JCS) fixes
the bytes. Evidence binding the keys is only worth something if the verifier recomputes the
binding from the keys it is about to trust: ``schemas.verify.attestation`` does, and the byte-level
rules are in ``docs/protocol/attestation.md``.

The ``dev`` kind is a development statement signed by an ordinary ed25519 key on a machine
without a TEE. It proves nothing about the code that ran, says so in every record, and
verifiers reject it unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from schemas.base import Hex32, Hex64, UnixMs, WireModel
from schemas.canonical import canonical_bytes

__all__ = [
    "ATTESTATION_KINDS",
    "BINDING_DOMAIN",
    "DEV_NOTICE",
    "DEV_STATEMENT_DOMAIN",
    "REPORT_DATA_BYTES",
    "Attestation",
    "AttestationKind",
    "DevStatement",
    "SignedDevStatement",
    "binding_payload",
    "binding_report_data",
    "decode_b64",
    "encode_b64",
]

BINDING_DOMAIN: Final = b"og-inference-node/attestation-binding/v1"
DEV_STATEMENT_DOMAIN: Final = b"og-inference-node/dev-attestation/v1"
DEV_NOTICE: Final = (
    "development attestation: no hardware TEE; proves nothing about the code that ran"
)
REPORT_DATA_BYTES: Final = 64
MAX_EVIDENCE_CHARS: Final = 65_536
MAX_CERT_CHARS: Final = 16_384
MAX_COLLATERAL_CHARS: Final = 131_072

AttestationKind = Literal["tdx", "sev-snp", "nitro", "dev"]
ATTESTATION_KINDS: Final[tuple[AttestationKind, ...]] = ("tdx", "sev-snp", "nitro", "dev")

_B64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
Base64 = Annotated[str, StringConstraints(pattern=_B64, min_length=4)]
"""RFC 4648 section 4 base64: standard alphabet, with padding, no line breaks."""

_NODE_KEY = re.compile(r"^[0-9a-f]{64}$")
_CHAIN_ADDRESS = re.compile(r"^0x[0-9a-f]{40}$")


class Attestation(WireModel):
    """Hardware evidence for a node, as carried in its registration.

    ``evidence`` is the raw bytes the TEE produced, base64: the TDX quote (v4/v5), the 1,184-byte
    SEV-SNP ``ATTESTATION_REPORT``, the Nitro COSE_Sign1 attestation document, or for ``dev``
    the JCS bytes of a ``SignedDevStatement``. ``report_data`` repeats (hex) the 64 bytes the
    node asked the hardware to bind; verifiers check that the evidence contains exactly these
    bytes and that they equal the binding of the node's keys.
    """

    kind: AttestationKind
    evidence: Base64 = Field(max_length=MAX_EVIDENCE_CHARS)
    report_data: Hex64
    issued_unix_ms: UnixMs
    """When the node produced the evidence (its own clock). Hardware-signed only for ``nitro``
    (the document carries a timestamp) and ``dev``; for TDX and SEV-SNP it is the node's claim,
    covered by the registration signature."""
    provider: str | None = Field(default=None, max_length=64)
    """What produced it, for diagnostics: the configfs-tsm provider (``tdx_guest``,
    ``sev_guest``), ``nsm`` or ``dev``. Not trusted by verifiers."""
    certificates: list[Base64] = Field(default_factory=list, max_length=8)
    """DER certificates the verifier needs beside the evidence, base64. SEV-SNP: VCEK, ASK, ARK
    in that order (the ARK is checked against a pinned hash). Empty for TDX (the PCK chain is
    inside the quote) and Nitro (the chain is inside the document)."""
    collateral: dict[str, str] | None = Field(default=None, max_length=16)
    """TDX only: Intel's verification collateral for the quote's platform, as supplied by a
    PCCS (fields of ``QuoteCollateralV3``: ``pck_crl_issuer_chain``, ``root_ca_crl``,
    ``pck_crl``, ``tcb_info_issuer_chain``, ``tcb_info``, ``tcb_info_signature``,
    ``qe_identity_issuer_chain``, ``qe_identity``, ``qe_identity_signature``, optionally
    ``pck_certificate_chain``). A verifier may supply its own instead."""

    def evidence_bytes(self) -> bytes:
        return decode_b64(self.evidence)

    def report_data_bytes(self) -> bytes:
        return bytes.fromhex(self.report_data)


class DevStatement(WireModel):
    """What a development attestation states; signed by ``public_key``."""

    type: Literal["og-dev-attestation"] = "og-dev-attestation"
    version: Literal[1] = 1
    notice: Literal[
        "development attestation: no hardware TEE; proves nothing about the code that ran"
    ] = DEV_NOTICE
    report_data: Hex64
    issued_unix_ms: UnixMs
    public_key: Hex32
    """ed25519 public key of the development signer (not a hardware key)."""


class SignedDevStatement(WireModel):
    """``signature`` = Ed25519 over SHA-256(DEV_STATEMENT_DOMAIN || 0x00 || JCS(statement))."""

    statement: DevStatement
    signature: Hex64


def binding_payload(*, node_id: str, x25519_public_key: str, chain_address: str) -> bytes:
    """The JCS bytes the binding hashes. Each key has exactly one accepted spelling (lower-case
    hex; the chain address with ``0x`` and no EIP-55 checksum) so a key has one binding."""
    if not _NODE_KEY.fullmatch(node_id):
        raise ValueError("node_id must be 64 lower-case hex characters")
    if not _NODE_KEY.fullmatch(x25519_public_key):
        raise ValueError("x25519_public_key must be 64 lower-case hex characters")
    if not _CHAIN_ADDRESS.fullmatch(chain_address):
        raise ValueError("chain_address must be 0x and 40 lower-case hex characters")
    return canonical_bytes(
        {
            "chain_address": chain_address,
            "node_id": node_id,
            "x25519_public_key": x25519_public_key,
        }
    )


def binding_report_data(*, node_id: str, x25519_public_key: str, chain_address: str) -> bytes:
    """The 64 bytes a node puts in its TEE evidence's ``report_data`` (see module docstring)."""
    payload = binding_payload(
        node_id=node_id, x25519_public_key=x25519_public_key, chain_address=chain_address
    )
    return hashlib.sha512(BINDING_DOMAIN + b"\x00" + payload).digest()


def encode_b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def decode_b64(text: str) -> bytes:
    """Strict base64 decode (raises ``ValueError`` on anything else)."""
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError("not base64") from e
