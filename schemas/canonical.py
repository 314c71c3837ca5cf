"""The one canonical encoding: RFC 8785 (JSON Canonicalization Scheme) and its hashes.

Signer and verifier both call these functions, so a result can only verify when both sides see
exactly the same bytes. Models are first reduced to their JSON form (`model_dump(mode="json")`,
which drops nothing and renders bytes/enums as strings), then canonicalised.

Speed: the reference ``rfc8785`` package serialises in pure Python and was the largest single
cost on the worker's hot path. For the common case we let the C JSON encoder do the work and
only take the reference path when its output could differ from RFC 8785:

- key order: ``sort_keys`` orders by code point, RFC 8785 by UTF-16 code unit; the two agree
  unless a key holds a character above U+FFFF, so such values take the reference path;
- numbers: floats that are integers below 2**53 are written as integers (ES6 prints ``1.0`` as
  ``1``); other floats keep Python's shortest round-trip ``repr``, which has the same digits as
  ES6, unless ``repr`` uses an exponent, where the two notations differ: reference path;
- strings: both escape exactly the quote, the backslash and U+0000..U+001F (lower-case hex).

A property test checks the fast path against the reference implementation.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Final

import rfc8785
from pydantic import BaseModel

__all__ = [
    "RESULT_DOMAIN",
    "canonical_bytes",
    "domain_digest",
    "reference_canonical_bytes",
    "sha256_hex",
]

RESULT_DOMAIN: Final = b"og-inference-node/result-envelope/v2"
"""Domain tag prefixed to the canonical envelope before hashing for signature."""


def _jsonable(value: BaseModel | Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


_MAX_EXACT = 2**53
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


class _NeedsReference(Exception):
    """The fast path cannot guarantee RFC 8785 output for this value."""


def _prepare(value: Any) -> Any:
    """Copy of ``value`` the C encoder renders exactly as RFC 8785 does, or raise."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if -_MAX_EXACT < value < _MAX_EXACT:
            return value
        raise _NeedsReference
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NeedsReference
        if value.is_integer():
            if abs(value) < _MAX_EXACT:
                return int(value)
            raise _NeedsReference  # ES6 pads shortest digits with zeros; repr does not
        if "e" in repr(value):
            raise _NeedsReference
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str) or (
                not key.isascii() and any(ord(c) > 0xFFFF for c in key)
            ):
                raise _NeedsReference
            out[key] = _prepare(item)
        return out
    if isinstance(value, list | tuple):
        return [_prepare(item) for item in value]
    raise _NeedsReference


def canonical_bytes(value: BaseModel | Any) -> bytes:
    """RFC 8785 bytes of a pydantic model's JSON form or of a plain JSON value."""
    jsonable = _jsonable(value)
    try:
        return _ENCODER.encode(_prepare(jsonable)).encode("utf-8")
    except (_NeedsReference, UnicodeEncodeError):
        pass
    try:
        return rfc8785.dumps(jsonable)
    except rfc8785.CanonicalizationError as e:
        raise ValueError(f"value cannot be canonicalised: {type(e).__name__}") from e


def reference_canonical_bytes(value: BaseModel | Any) -> bytes:
    """The reference implementation alone (for tests and cross-checks)."""
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
