"""RFC 8785 canonical encoding: properties over arbitrary JSON values, known vectors, and the
canonical form of wire models (what signer and verifier hash)."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.base import SettlementMode, VerificationMode
from schemas.canonical import canonical_bytes, reference_canonical_bytes, sha256_hex
from schemas.codec import encode
from schemas.requests import (
    ChatInput,
    ChatMessage,
    InferenceRequest,
    MLInput,
    SamplingParams,
    Tensor,
    TensorDType,
    input_hash,
)
from schemas.results import MLOutput, ResultEnvelope, Usage, output_hash

MAX_SAFE_INT = 2**53 - 1

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=6)

PROPERTY = settings(max_examples=200, deadline=None)


def _same_json(a: Any, b: Any) -> bool:
    """JSON-semantic equality: numbers compare by value (RFC 8785 prints 1.0 as 1 and 1e20 as
    100000000000000000000, which Python reads back as an int), bools are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _loads_as_ijson(raw: bytes) -> Any:
    """json.loads, but integers outside the IEEE-754 safe range are read as doubles, as every
    I-JSON (RFC 7493) consumer does: a float such as 1e20 is printed without an exponent."""

    def parse_int(text: str) -> int | float:
        value = int(text)
        return value if abs(value) <= MAX_SAFE_INT else float(text)

    return json.loads(raw, parse_int=parse_int)


def _shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's keys inserted in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


def _utf16_key(key: str) -> bytes:
    return key.encode("utf-16-be")


def _assert_keys_sorted(raw: bytes) -> None:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys, key=_utf16_key), keys
        return dict(pairs)

    json.loads(raw, object_pairs_hook=hook)


def _bytes_outside_strings(raw: bytes) -> bytes:
    """Every byte of ``raw`` that is not inside a JSON string literal."""
    out = bytearray()
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        else:
            out.append(byte)
    return bytes(out)


# --- properties ------------------------------------------------------------------------------


@PROPERTY
@given(value=json_values, rng=st.randoms(use_true_random=False))
def test_key_insertion_order_does_not_matter(value: Any, rng: random.Random) -> None:
    assert canonical_bytes(_shuffled(value, rng)) == canonical_bytes(value)


@PROPERTY
@given(value=json_values)
def test_canonical_form_parses_back_to_the_same_value(value: Any) -> None:
    assert _same_json(json.loads(canonical_bytes(value)), value)


@PROPERTY
@given(value=json_values)
def test_canonicalisation_is_idempotent(value: Any) -> None:
    once = canonical_bytes(value)
    assert canonical_bytes(_loads_as_ijson(once)) == once


@PROPERTY
@given(value=json_objects)
def test_no_insignificant_whitespace_and_keys_sorted(value: Any) -> None:
    raw = canonical_bytes(value)
    outside = _bytes_outside_strings(raw)
    for ws in b" \t\n\r":
        assert ws not in outside, raw
    _assert_keys_sorted(raw)


@PROPERTY
@given(text=st.text(st.characters(codec="utf-8", min_codepoint=0x20, exclude_characters='"\\')))
def test_strings_other_than_controls_quote_backslash_are_raw_utf8(text: str) -> None:
    # RFC 8785 §3.2.2.2: only controls, quote and backslash are escaped; the rest is UTF-8.
    assert canonical_bytes(text) == b'"' + text.encode() + b'"'


# --- known vectors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"b": 2, "a": 1}, b'{"a":1,"b":2}'),
        (1.0, b"1"),
        (1e21, b"1e+21"),
        (1e20, b"100000000000000000000"),
        (-0.0, b"0"),
        (0.1, b"0.1"),
        (1e-7, b"1e-7"),
        (MAX_SAFE_INT, b"9007199254740991"),
        ([None, True, False], b"[null,true,false]"),
        ({"a": {"d": 1, "c": [1, {"f": 2, "e": 3}]}}, b'{"a":{"c":[1,{"e":3,"f":2}],"d":1}}'),
        ("\u20ac\u2028", '"\u20ac\u2028"'.encode()),
        ('\x00\x08\t\n\x0c\r\x1f"\\/', b'"\\u0000\\b\\t\\n\\f\\r\\u001f\\"\\\\/"'),
    ],
)
def test_known_vectors(value: Any, expected: bytes) -> None:
    assert canonical_bytes(value) == expected


def test_keys_are_sorted_by_utf16_code_units_not_code_points() -> None:
    # U+1F600 is the surrogate pair D83D DE00 in UTF-16, which sorts before U+FFFF, although
    # its code point is larger (RFC 8785 §3.2.3).
    raw = canonical_bytes({"\uffff": 1, "\U0001f600": 2, "a": 3})
    assert raw == '{"a":3,"\U0001f600":2,"\uffff":1}'.encode()


@pytest.mark.parametrize(
    "value",
    [
        math.nan,
        math.inf,
        -math.inf,
        [1.0, math.nan],
        {"x": math.inf},
        2**53,
        -(2**53),
    ],
)
def test_values_outside_ijson_raise_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="cannot be canonicalised"):
        canonical_bytes(value)


# --- wire models -----------------------------------------------------------------------------


def _ml_request(tensors: dict[str, Tensor]) -> InferenceRequest:
    return InferenceRequest(
        request_id="req-1",
        model="demo-mlp",
        created_unix_ms=1_700_000_000_000,
        payload=MLInput(tensors=tensors),
    )


CHAT_REQUEST = InferenceRequest(
    request_id="req-chat",
    model="demo-lm",
    reply_to="my.replies",
    created_unix_ms=1_700_000_000_000,
    deadline_unix_ms=1_700_000_060_000,
    payload=ChatInput(
        messages=[ChatMessage(role="user", content="h\u00e9llo \U0001f600\u2028")],
        params=SamplingParams(temperature=0.7, stop=["\n"], seed=7),
    ),
)
ENVELOPE = ResultEnvelope(
    request_id="req-1",
    model_id="demo-mlp",
    model_digest="a" * 64,
    mode=VerificationMode.VANILLA,
    input_hash="b" * 64,
    output_hash="c" * 64,
    usage=Usage(input_tokens=3, output_tokens=5),
    node_id="d" * 64,
    signed_unix_ms=1_700_000_000_000,
    settlement=SettlementMode.BATCH,
    request_created_unix_ms=1_699_999_999_000,
    max_output_tokens=16,
    payer=None,
)


@pytest.mark.parametrize(
    "model",
    [
        CHAT_REQUEST,
        _ml_request({"x": Tensor(dtype="float32", shape=[1, 2], data=[0.5, -1.0])}),
        ENVELOPE,
        MLOutput(tensors={"y": Tensor(dtype="int64", shape=[2], data=[1, -2])}),
    ],
    ids=["chat-request", "ml-request", "envelope", "ml-output"],
)
def test_model_canonical_form_is_its_json_dump(model: Any) -> None:
    as_json = model.model_dump(mode="json")
    assert canonical_bytes(model) == canonical_bytes(as_json)
    assert sha256_hex(model) == sha256_hex(as_json)
    assert json.loads(canonical_bytes(model)) == as_json


def test_enum_and_none_fields_are_in_the_canonical_form() -> None:
    doc = json.loads(canonical_bytes(ENVELOPE))
    assert doc["mode"] == "VANILLA"
    assert doc["payer"] is None
    assert doc["schema_version"] == 2


def test_input_hash_survives_wire_round_trip_for_chat() -> None:
    back = InferenceRequest.model_validate_json(encode(CHAT_REQUEST))
    assert back == CHAT_REQUEST
    assert input_hash(back.payload) == input_hash(CHAT_REQUEST.payload)


def test_input_hash_differs_when_payload_differs() -> None:
    a = _ml_request({"x": Tensor(dtype="float32", shape=[1], data=[1.0])})
    b = _ml_request({"x": Tensor(dtype="float32", shape=[1], data=[1.5])})
    assert input_hash(a.payload) != input_hash(b.payload)


def test_integral_float_and_int_hash_alike() -> None:
    # 1.0 and 1 have one canonical form ("1"), so a producer's JSON number style cannot change
    # the hash.
    a = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1], data=[1.0])})
    b = MLInput(tensors={"x": Tensor(dtype="float32", shape=[1], data=[1])})
    assert input_hash(a) == input_hash(b)


@st.composite
def ml_inputs(draw: st.DrawFn) -> MLInput:
    names = draw(
        st.lists(
            st.from_regex(r"[A-Za-z0-9_.:/-]{1,12}", fullmatch=True),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    tensors = {}
    for name in names:
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=3))
        count = math.prod(shape)
        dtype: TensorDType = draw(st.sampled_from(["float32", "float64"]))
        data: list[bool | int | float | str] = draw(
            st.lists(
                st.floats(allow_nan=False, allow_infinity=False)
                | st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT),
                min_size=count,
                max_size=count,
            )
        )
        tensors[name] = Tensor(dtype=dtype, shape=shape, data=data)
    return MLInput(tensors=tensors)


@PROPERTY
@given(payload=ml_inputs(), rng=st.randoms(use_true_random=False))
def test_ml_input_hash_is_stable_across_wire_round_trip(
    payload: MLInput, rng: random.Random
) -> None:
    request = InferenceRequest(
        request_id="req-h", model="demo-mlp", created_unix_ms=0, payload=payload
    )
    back = InferenceRequest.model_validate_json(encode(request))
    assert input_hash(back.payload) == input_hash(payload)
    # A producer that orders the tensors differently commits to the same input.
    items = list(payload.tensors.items())
    rng.shuffle(items)
    assert input_hash(MLInput(tensors=dict(items))) == input_hash(payload)


@PROPERTY
@given(payload=ml_inputs())
def test_output_hash_is_stable_across_wire_round_trip(payload: MLInput) -> None:
    output = MLOutput(tensors=payload.tensors)
    back = MLOutput.model_validate_json(encode(output))
    assert output_hash(back) == output_hash(output)


# --- fast path vs the reference implementation ------------------------------------------------

wide_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e-5, max_value=1e-5, allow_nan=False),
    st.sampled_from([1e16, 1e21, 1e-7, 123456789012345680.0, 2.0**53, 2.0**60, -0.0, 5e-324]),
)
reference_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | wide_floats
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(reference_values)
def test_fast_path_matches_the_reference_implementation(value: Any) -> None:
    try:
        expected = reference_canonical_bytes(value)
    except ValueError:
        with pytest.raises(ValueError):
            canonical_bytes(value)
        return
    assert canonical_bytes(value) == expected
