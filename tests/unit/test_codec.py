"""``schemas.codec``: the linear pre-parse scan (depth, duplicate keys, BOM), strict parsing,
and exact-match salvage of routing fields.

A fuzzer compares ``scan`` with a slow reference (the stdlib parser with a duplicate-detecting
hook and a recursive depth count) on arbitrary JSON documents, rendered with arbitrary
whitespace and escapes, and on arbitrary bytes."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import limits
from schemas.codec import Decoded, Undecodable, decode, loads, scan
from schemas.requests import InferenceRequest

MAX_DEPTH = limits.MAX_JSON_DEPTH


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _Duplicate
    return dict(pairs)


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def _reference(raw: bytes) -> str | None:
    """What ``scan`` must say about a document the stdlib can parse."""
    try:
        value = json.loads(raw, object_pairs_hook=_no_duplicates)
    except _Duplicate:
        return "duplicate"
    if _depth(value) > MAX_DEPTH:
        return "deep"
    return None


def _verdict(problem: str | None) -> str | None:
    if problem is None:
        return None
    return "duplicate" if "duplicate" in problem else "deep" if "nested" in problem else problem


_keys = st.text(alphabet=st.sampled_from('ab"\\:{}[], \u00e9\U0001f600'), max_size=3)
_leaves = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _keys
_json = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(st.tuples(_keys, inner), max_size=4).map(lambda pairs: pairs)
    ),
    max_leaves=25,
)


def _render(value: Any, ascii_only: bool, space: str) -> str:
    """JSON text of ``value``, where a list of pairs is an object that may repeat a key."""
    if isinstance(value, list) and value and all(isinstance(p, tuple) for p in value):
        sep = f"{space}:{space}"
        items = [
            json.dumps(k, ensure_ascii=ascii_only) + sep + _render(v, ascii_only, space)
            for k, v in value
        ]
        return "{" + f",{space}".join(items) + "}"
    if isinstance(value, list):
        return "[" + f",{space}".join(_render(v, ascii_only, space) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@settings(max_examples=400, deadline=None)
@given(_json, st.booleans(), st.sampled_from(["", " ", "\n\t "]))
def test_scan_agrees_with_a_reference_parser(value: Any, ascii_only: bool, space: str) -> None:
    raw = _render(value, ascii_only, space).encode()
    assert _verdict(scan(raw)) == _reference(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_scan_never_raises_on_arbitrary_bytes(raw: bytes) -> None:
    problem = scan(raw)
    assert problem is None or isinstance(problem, str)


@given(st.integers(MAX_DEPTH - 2, MAX_DEPTH + 2), st.sampled_from([b"[", b'{"k":']))
def test_depth_limit_is_exact(depth: int, opener: bytes) -> None:
    closer = b"]" if opener == b"[" else b"}"
    raw = opener * depth + b"1" + closer * depth
    assert (scan(raw) is not None) == (depth > MAX_DEPTH)


@pytest.mark.parametrize(
    "raw",
    [
        b'"' + b'\\"' * 500_000,  # an unterminated string of escaped quotes (was quadratic)
        b'{"request_id": "' + b'\\"' * 500_000 + b'"}',
        b"[" * 500_000,
        b'{"a":' * 300_000,
        b'["' + b'x":' * 300_000,
    ],
    ids=["unterminated-escapes", "escapes", "brackets", "keys", "colons-in-string"],
)
def test_a_1_mb_adversarial_message_is_scanned_in_milliseconds(raw: bytes) -> None:
    # A coarse bound, far above the measured ~5 ms and far below what quadratic work takes
    # (the old check needed hours for 1 MB): a regression to O(n^2) cannot pass it.
    started = time.perf_counter()
    decode(raw, InferenceRequest)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'\xef\xbb\xbf{"a": 1}', "byte order mark"),
        (b'{"a": 1, "a": 2}', "duplicate key"),
        (b'{"a": 1, "\\u0061": 2}', "duplicate key"),
        (b'{"a": "\\ud800"}', "not UTF-8 JSON"),
        (b'{"a": NaN}', "not UTF-8 JSON"),
        (b'{"a": 1e999}', "not UTF-8 JSON"),
    ],
)
def test_decode_refuses_what_two_parsers_could_read_differently(raw: bytes, reason: str) -> None:
    result = decode(raw, InferenceRequest)
    assert isinstance(result, Undecodable) and reason in result.reason


def test_loads_is_strict() -> None:
    assert loads(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    with pytest.raises(ValueError):
        loads(b"{'a': 1}")


@pytest.mark.parametrize("field", ["request_id", "reply_to"])
def test_routing_fields_ending_in_a_newline_are_not_salvaged(field: str) -> None:
    # Python's re ``$`` matches before a final newline: salvage uses fullmatch.
    doc = {"request_id": "r-1", "reply_to": "replies", "model": 5, field: "ok\n"}
    result = decode(json.dumps(doc).encode(), InferenceRequest)
    assert isinstance(result, Undecodable)
    assert getattr(result, field) is None


def test_a_valid_request_still_decodes() -> None:
    doc = {
        "request_id": "r-1",
        "model": "demo-mlp",
        "created_unix_ms": 1,
        "payload": {
            "kind": "ml",
            "tensors": {"x": {"dtype": "float32", "shape": [1], "data": [1]}},
        },
    }
    assert isinstance(decode(json.dumps(doc).encode(), InferenceRequest), Decoded)
