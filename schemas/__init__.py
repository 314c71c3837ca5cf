"""The wire contract shared by worker, settlement and clients: models, encoding, hashing,
topic names and size limits. This package performs no I/O."""

from schemas.base import VerificationMode
from schemas.canonical import canonical_bytes, sha256_hex
from schemas.codec import Decoded, Undecodable, decode, encode
from schemas.requests import (
    ChatInput,
    ChatMessage,
    InferenceRequest,
    MLInput,
    SamplingParams,
    Tensor,
    input_hash,
)
from schemas.results import (
    ChatOutput,
    ErrorCode,
    ErrorReply,
    InferenceResult,
    MLOutput,
    Reply,
    ResultEnvelope,
    Usage,
    output_hash,
)
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest, verify_envelope_signature
from schemas.topics import Topics
from schemas.version import SCHEMA_VERSION

__all__ = [
    "SCHEMA_VERSION",
    "ChatInput",
    "ChatMessage",
    "ChatOutput",
    "Decoded",
    "ErrorCode",
    "ErrorReply",
    "InferenceRequest",
    "InferenceResult",
    "MLInput",
    "MLOutput",
    "Reply",
    "ResultEnvelope",
    "SamplingParams",
    "SettlementRecord",
    "Tensor",
    "Topics",
    "Undecodable",
    "Usage",
    "VerificationMode",
    "canonical_bytes",
    "decode",
    "encode",
    "envelope_digest",
    "input_hash",
    "output_hash",
    "sha256_hex",
    "verify_envelope_signature",
]
