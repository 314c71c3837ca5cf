"""Admission: which nodes count, decided by an authority the deployment names, never by a node.

Two sources, one meaning:

- **on chain** (the default): the ``NodeRegistry`` contract on the settlement chain
  (``infra/contracts/NodeRegistry.sol``). A governance key admits and revokes node ids (each
  with the node's chain address) and approves and revokes TEE measurements. Revoking a
  measurement disables every node running it; a node whose verified TEE evidence shows an
  approved measurement counts as admitted without a per-node entry.
- **a pinned authority key** (deployments without a chain): a ``SignedAdmissionList`` the
  authority signs with ed25519 over ``domain_digest(ADMISSION_DOMAIN, list)``, naming every
  admitted node and approved measurement, with a strictly increasing ``sequence``. A node not
  in the newest list is not admitted: revocation is absence from a newer list, which cannot be
  erased the way a message on a compacted topic can, and an older list (a replay) is refused.

Verifiers combine the facts with what they verified of a node's registration
(``schemas.verify.admission``).
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from schemas.attestation import AttestationKind
from schemas.base import ChainAddress, Hex32, Hex64, UnixMs, WireModel
from schemas.signing import Signer, verify_signature
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "ADMISSION_DOMAIN",
    "AdmissionList",
    "AdmittedNode",
    "ApprovedMeasurement",
    "SignedAdmissionList",
    "sign_admission_list",
    "verify_admission_list",
]

ADMISSION_DOMAIN: Final = b"og-inference-node/admission-list/v2"
MAX_ADMITTED = 10_000

Measurement = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{2,256}$")]
"""A TEE measurement as verifiers report it: lower-case hex (TDX MRTD, SEV-SNP MEASUREMENT,
Nitro PCR0, or a dev signer's key)."""


class AdmittedNode(WireModel):
    node_id: Hex32
    chain_address: ChainAddress
    """The node's chain account: its results' chain signatures must recover to it."""


class ApprovedMeasurement(WireModel):
    kind: AttestationKind
    measurement: Measurement


class AdmissionList(WireModel):
    """Everything a pinned authority admits, as of ``sequence``."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["admission_list"] = "admission_list"
    authority_id: Hex32
    """The ed25519 key that signs the list (verifiers pin it)."""
    sequence: int = Field(ge=0, le=2**53 - 1)
    issued_unix_ms: UnixMs
    nodes: list[AdmittedNode] = Field(max_length=MAX_ADMITTED)
    measurements: list[ApprovedMeasurement] = Field(default_factory=list, max_length=1024)


class SignedAdmissionList(WireModel):
    list: AdmissionList
    signature: Hex64


def verify_admission_list(signed: SignedAdmissionList) -> bool:
    """True when signed by its ``authority_id`` (whether that authority is pinned is policy)."""
    return verify_signature(
        ADMISSION_DOMAIN, signed.list.authority_id, signed.list, signed.signature
    )


def sign_admission_list(authority: Signer, admission_list: AdmissionList) -> SignedAdmissionList:
    """``admission_list`` signed by ``authority`` (whose node id must be its ``authority_id``)."""
    if admission_list.authority_id != authority.node_id:
        raise ValueError("the list names another authority than the signer")
    return SignedAdmissionList(
        list=admission_list, signature=authority.sign(ADMISSION_DOMAIN, admission_list)
    )
