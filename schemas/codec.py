"""Decoding wire bytes into typed messages, and encoding them back.

Decoding never raises for bad input: it returns ``Decoded`` or ``Undecodable``, because a bad
message is an expected event for a consumer (it answers or dead-letters it), not a crash.
``Undecodable`` keeps whatever routing information could still be read (request id, reply
topic), so the worker can send a typed error instead of dead-lettering when possible.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from schemas import limits
from schemas.topics import TOPIC_NAME_PATTERN

__all__ = [
    "Decoded",
    "Undecodable",
    "decode",
    "encode",
    "loads",
    "scan",
    "summarize_validation_error",
    "too_deep",
]

M = TypeVar("M", bound=BaseModel)
_REQUEST_ID_RE = re.compile(rf"[A-Za-z0-9._:-]{{1,{limits.MAX_ID_CHARS}}}")
_TOPIC_RE = re.compile(TOPIC_NAME_PATTERN.removeprefix("^").removesuffix("$"))
"""Used with ``fullmatch`` (Python's ``$`` also matches before a final newline)."""


# One token per match, each input byte read once: a string (its end quote optional, so an
# unterminated string is consumed in one step instead of being retried from every quote, the
# quadratic case), optionally followed by ':' (an object key), or a bracket.
_TOKEN_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*("?)(\s*:)?|[\[\]{}]', re.DOTALL)
_BOM = b"\xef\xbb\xbf"


def scan(raw: bytes, max_depth: int = limits.MAX_JSON_DEPTH) -> str | None:
    """What is wrong with ``raw`` before it is parsed, or None; linear time and memory.

    Checked here, before the parser sees the bytes: nesting deeper than ``max_depth`` (the
    parser's own guard is the interpreter's recursion limit, which libraries raise: a deeply
    nested message would overflow the C stack), a byte order mark, and an object naming one key
    twice (parsers keep one value of the two silently, so two readers of the same bytes could
    see different messages). Brackets and colons inside strings do not count."""
    if raw.startswith(_BOM):
        return "JSON with a byte order mark"
    if raw.count(b"[") + raw.count(b"{") <= max_depth and raw.count(b":") <= 1:
        return None  # nothing nests deep enough, and no object has two keys
    depth = 0
    keys: list[set[bytes] | None] = []
    for match in _TOKEN_RE.finditer(raw):
        token = match[0]
        first = token[:1]
        if first == b'"':
            if not match[1]:
                return None  # unterminated string: the parser rejects it
            if match[2] and keys and keys[-1] is not None:
                key = _key(token[: match.start(2) - match.start(0)])
                if key in keys[-1]:
                    return "JSON object with a duplicate key"
                keys[-1].add(key)
        elif first in b"[{":
            depth += 1
            if depth > max_depth:
                return f"JSON nested deeper than {max_depth} levels"
            keys.append(set() if first == b"{" else None)
        else:
            depth -= 1
            if keys:
                keys.pop()
    return None


def _key(quoted: bytes) -> bytes:
    """A key as the parser sees it: escapes (``\\u0061`` for ``a``) decoded."""
    if b"\\" not in quoted:
        return quoted[1:-1]
    try:
        return str(json.loads(quoted)).encode("utf-8", "surrogatepass")
    except ValueError:
        return quoted


def too_deep(raw: bytes, max_depth: int = limits.MAX_JSON_DEPTH) -> bool:
    """True when ``raw`` nests arrays/objects deeper than ``max_depth`` (see ``scan``)."""
    problem = scan(raw, max_depth)
    return problem is not None and problem.startswith("JSON nested")


def loads(raw: bytes) -> object:
    """Parse strict I-JSON (RFC 7493): UTF-8 without a BOM, no lone surrogates, no NaN or
    Infinity, integers within 64 bits. ``ValueError`` otherwise. Call ``scan`` first."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError("not I-JSON") from e


@dataclass(frozen=True)
class Decoded(Generic[M]):
    message: M
    document: dict[str, Any]
    """The JSON object as received, before defaults were applied: hashes that must be
    reproducible by the producer are taken over this, not over the normalised model."""


@dataclass(frozen=True)
class Undecodable:
    """Why a message could not be decoded. ``reason`` is safe to log: it names fields and
    error kinds, never values."""

    reason: str
    request_id: str | None = None
    reply_to: str | None = None


def encode(message: BaseModel) -> bytes:
    """Compact JSON for the wire (not canonical: canonical bytes are only for hashing)."""
    return message.model_dump_json().encode()


_FIELD_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _safe_loc_part(part: int | str, known: frozenset[str]) -> str:
    # Dict keys (tensor names) and unknown field names are submitted text: never echo them.
    if isinstance(part, int) or part in known:
        return str(part)
    return "*"


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """Every property name and discriminator tag in the model's schema (no user data)."""
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    names.update(value)
                if key == "const" and isinstance(value, str):
                    names.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(model.model_json_schema())
    # pydantic names union members by their tag or type in error locations.
    names.update({"function-after", "list", "dict", "str", "int", "float", "bool", "none"})
    return frozenset(n for n in names if _FIELD_NAME_RE.fullmatch(n) or "-" in n)


def summarize_validation_error(
    error: ValidationError, model: type[BaseModel] | None = None, max_items: int = 5
) -> str:
    """Field paths and error types only; pydantic's own message would echo the input, and
    path parts that are not field names of ``model`` (dict keys) are masked as ``*``."""
    known = _field_names(model) if model is not None else frozenset()
    parts = []
    for item in error.errors(include_input=False, include_url=False)[:max_items]:
        loc = ".".join(_safe_loc_part(p, known) for p in item["loc"]) or "<root>"
        if item["type"] == "value_error":
            # Raised by our own validators, whose messages name shapes and types, not values.
            parts.append(f"{loc}: {item['msg'].removeprefix('Value error, ')[:160]}")
        else:
            parts.append(f"{loc}: {item['type']}")
    more = error.error_count() - max_items
    if more > 0:
        parts.append(f"... {more} more")
    return "invalid message: " + "; ".join(parts)


def decode(raw: bytes | None, model: type[M]) -> Decoded[M] | Undecodable:
    """Validate ``raw`` as ``model``; on failure say why and salvage the routing fields."""
    if raw is None:
        return Undecodable("empty message")
    if len(raw) > limits.MAX_MESSAGE_BYTES:
        # The limit only: the message's own size is the sender's, not ours to repeat.
        return Undecodable(f"message exceeds the limit of {limits.MAX_MESSAGE_BYTES} bytes")
    problem = scan(raw)
    if problem is not None:
        return Undecodable(problem)
    try:
        obj = loads(raw)
    except ValueError:
        return Undecodable("not UTF-8 JSON")
    if not isinstance(obj, dict):
        return Undecodable(f"JSON {type(obj).__name__} where an object was expected")
    try:
        # One parse: validate the object the parser produced.
        return Decoded(model.model_validate(obj), obj)
    except ValidationError as e:
        request_id = obj.get("request_id")
        reply_to = obj.get("reply_to")
        return Undecodable(
            summarize_validation_error(e, model),
            request_id=request_id
            if isinstance(request_id, str) and _REQUEST_ID_RE.fullmatch(request_id)
            else None,
            reply_to=reply_to
            if isinstance(reply_to, str) and _TOPIC_RE.fullmatch(reply_to)
            else None,
        )
