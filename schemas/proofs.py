"""ZKML proof records on ``<ns>.settlement`` (Kafka key: the node id), and the pinned circuit
manifest both sides agree on. No I/O: ``docs/protocol/zkml.md`` states the same rules in
prose, precisely enough to check a record without our code.

A ``ProofRecord`` follows the signed result of a ``ZKML`` request. The node signs its
``claims`` (``domain_digest(PROOF_DOMAIN, claims)``, ed25519, key = ``node_id``). The claims
carry the EZKL proof and its public instances (the quantised input and output tensors), and
the input and output tensors themselves, so settlement, which otherwise sees only hashes, can
check that

- ``H(input) == input_hash`` and ``H(output) == output_hash`` (the hashes the node signed in the
  result envelope; settlement also compares them with the stored result record);
- every public input instance is exactly ``quantize(x, scale)`` of the carried input;
- every public output instance, rescaled (``q / 2**scale``), is within the model's pinned
  ``output_tolerance`` of the carried (signed) output: the circuit computes in fixed point, the
  node's runtime in float32, so the two agree to a known bound, not bit for bit;
- the proof verifies against the pinned verifying key with those instances.

Privacy: a ZKML request's input and output tensors therefore travel, in clear, to the
settlement topic (the ledger keeps only hashes). Sealed requests cannot use ZKML.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Final, Literal

from pydantic import Field, StringConstraints

from schemas import limits
from schemas.base import Hex32, Hex64, ModelName, RequestId, UnixMs, WireModel
from schemas.fixedpoint import InputType, felt_hex
from schemas.requests import MAX_SAFE_INT, MLInput, TensorName
from schemas.results import MLOutput
from schemas.signing import verify_signature
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = [
    "CIRCUIT_FORMAT",
    "DEV_SRS_PREFIX",
    "PROOF_DOMAIN",
    "PROOF_SYSTEM",
    "CircuitManifest",
    "CircuitTensor",
    "ProofClaims",
    "ProofRecord",
    "SrsLabel",
    "proof_bytes",
    "proof_instances",
    "verify_proof_signature",
]

PROOF_DOMAIN: Final = b"og-inference-node/proof-record/v1"
"""Domain tag of the node's signature over ``ProofClaims``."""
PROOF_SYSTEM: Final = "ezkl/halo2-kzg-bn254"
CIRCUIT_FORMAT: Final = "og-zk-circuit/v1"
DEV_SRS_PREFIX: Final = "dev-"
"""SRS labels starting with this name a locally generated (``ezkl.gen_srs``) SRS: its toxic
waste was known to one machine, so proofs under it prove nothing to anyone else."""
MAX_PROOF_B64_CHARS: Final = 262_144
MAX_INSTANCES: Final = 16_384
"""Public values (inputs + outputs) per proof: keeps a record well under the message limit."""

SafeInt = Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)]
SrsLabel = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]


class ProofClaims(WireModel):
    """What the node signs about one proof."""

    schema_version: SchemaVersion = SCHEMA_VERSION
    request_id: RequestId
    node_id: Hex32
    model_id: ModelName
    model_digest: Hex32
    input_hash: Hex32
    output_hash: Hex32
    proof_system: Literal["ezkl/halo2-kzg-bn254"] = PROOF_SYSTEM
    ezkl_version: str = Field(min_length=1, max_length=32)
    circuit_digest: Hex32
    """sha256 of the compiled circuit file."""
    settings_digest: Hex32
    """sha256 of the EZKL settings file (scales, visibility, logrows)."""
    vk_digest: Hex32
    """sha256 of the verifying key file."""
    srs_label: SrsLabel
    srs_digest: Hex32
    """sha256 of the SRS file the proof was made with (and must be verified with)."""
    input: MLInput
    """The request payload the node ran (``H(input) == input_hash``)."""
    output: MLOutput
    """The output the node signed (``H(output) == output_hash``)."""
    public_inputs: list[list[SafeInt]] = Field(max_length=limits.MAX_TENSORS)
    """Quantised input instances, one list per circuit input, in the manifest's order."""
    public_outputs: list[list[SafeInt]] = Field(max_length=limits.MAX_TENSORS)
    """Quantised output instances, one list per circuit output, in the manifest's order."""
    proof: str = Field(min_length=4, max_length=MAX_PROOF_B64_CHARS)
    """The proof bytes (EZKL's ``proof`` array), standard base64 with padding."""
    signed_unix_ms: UnixMs


class ProofRecord(WireModel):
    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["proof_record"] = "proof_record"
    claims: ProofClaims
    signature: Hex64


def verify_proof_signature(record: ProofRecord) -> bool:
    """True when ``signature`` is the claims' node key over their domain digest."""
    return verify_signature(PROOF_DOMAIN, record.claims.node_id, record.claims, record.signature)


class CircuitTensor(WireModel):
    """One circuit input or output: its ONNX name, fixed shape, fixed-point scale and, for
    inputs, how EZKL reads the float (``F32``: rounded to float32 first; None for outputs)."""

    name: TensorName
    shape: list[Annotated[int, Field(ge=1)]] = Field(max_length=limits.MAX_TENSOR_RANK)
    scale: int = Field(ge=0, le=52)
    input_type: InputType | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class CircuitManifest(WireModel):
    """The pinned description of one model's circuit (``manifest.json`` beside the verifying
    key). The worker writes it when it prepares the circuit; settlement trusts the copy in its
    own verifying-key store, never a value carried by a record."""

    format: Literal["og-zk-circuit/v1"] = CIRCUIT_FORMAT
    model_id: ModelName
    model_digest: Hex32
    proof_system: Literal["ezkl/halo2-kzg-bn254"] = PROOF_SYSTEM
    ezkl_version: str = Field(min_length=1, max_length=32)
    circuit_digest: Hex32
    settings_digest: Hex32
    vk_digest: Hex32
    srs_label: SrsLabel
    srs_digest: Hex32
    srs_dev: bool
    logrows: int = Field(ge=1, le=28)
    inputs: list[CircuitTensor] = Field(min_length=1, max_length=limits.MAX_TENSORS)
    outputs: list[CircuitTensor] = Field(min_length=1, max_length=limits.MAX_TENSORS)
    output_tolerance: float = Field(gt=0)
    """Largest accepted ``|q / 2**scale - signed value|`` per output element."""
    visibility: dict[str, str]
    """EZKL visibility of inputs, outputs and params (public, public, fixed)."""
    created_unix_ms: UnixMs


def proof_instances(claims: ProofClaims) -> list[list[str]]:
    """EZKL's ``instances``: one column holding every public input, then every public output,
    each tensor flattened row-major, as field elements."""
    values = [v for t in claims.public_inputs for v in t] + [
        v for t in claims.public_outputs for v in t
    ]
    return [[felt_hex(v) for v in values]]


def proof_bytes(claims: ProofClaims) -> bytes:
    """The proof bytes; ``ValueError`` when ``proof`` is not canonical padded base64."""
    try:
        raw = base64.b64decode(claims.proof, validate=True)
    except binascii.Error as e:
        raise ValueError("proof is not base64") from e
    if base64.b64encode(raw).decode() != claims.proof:
        raise ValueError("proof is not canonical base64")
    return raw
