"""The one canonical encoding: RFC 8785 (JSON Canonicalization Scheme) and its hashes.

Signer and verifier both call these functions, so a result can only verify when both sides see
exactly the same bytes. Models are first reduced to their JSON form (`model_dump(mode="json")`,
which drops nothing and renders bytes/enums as strings), then canonicalised.
"""

from __future__ import annotations

import hashlib
from typing import Any, Final

import rfc8785
from pydantic import BaseModel

__all__ = [
    "RESULT_DOMAIN",
    "canonical_bytes",
    "domain_digest",
    "sha256_hex",
]

RESULT_DOMAIN: Final = b"og-inference-node/result-envelope/v1"
"""Domain tag prefixed to the canonical envelope before hashing for signature."""


def _jsonable(value: BaseModel | Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


def canonical_bytes(value: BaseModel | Any) -> bytes:
    """RFC 8785 bytes of a pydantic model's JSON form or of a plain JSON value."""
    try:
        return rfc8785.dumps(_jsonable(value))
    except rfc8785.CanonicalizationError as e:
        raise ValueError(f"value cannot be canonicalised: {type(e).__name__}") from e


def sha256_hex(value: BaseModel | Any) -> str:
    """Lower-case hex sha256 of the canonical bytes."""
    return hashlib.sha256(canonical_bytes(value)).hexdigest()


def domain_digest(domain: bytes, value: BaseModel | Any) -> bytes:
    """sha256(domain || 0x00 || canonical(value)): the 32 bytes a node signs.

    The domain tag stops a signature made for one message kind being replayed as another.
    """
    return hashlib.sha256(domain + b"\x00" + canonical_bytes(value)).digest()
