"""Wire models: validation limits, decoding of hostile bytes, JSON Schema export and topic
names. The public API of ``schemas`` (its ``__all__``) is checked in test_public_api.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

import schemas
from schemas import limits
from schemas.codec import Decoded, Undecodable, decode, encode
from schemas.jsonschema import all_schemas
from schemas.requests import ChatInput, InferenceRequest, MLInput, Tensor
from schemas.results import ErrorReply, InferenceResult
from schemas.settlement import SettlementRecord
from schemas.topics import Topics

CANARY = "CANARY-7f3a9"


def _request(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "request_id": "req-1",
        "model": "demo-mlp",
        "created_unix_ms": 1_700_000_000_000,
        "payload": {
            "kind": "ml",
            "tensors": {"x": {"dtype": "float32", "shape": [1, 4], "data": [0.5, -1, 2, 0.25]}},
        },
    }
    doc.update(overrides)
    return doc


def _tensor(dtype: str, shape: list[int], data: list[Any]) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data": data}


def _chat(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"kind": "chat", "messages": messages}


def test_valid_request_parses_with_defaults() -> None:
    request = InferenceRequest.model_validate(_request())
    assert request.mode == "VANILLA"
    assert request.reply_to is None
    assert isinstance(request.payload, MLInput)
    assert request.payload.tensors["x"].data == [0.5, -1, 2, 0.25]


# --- request validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_id",
    ["", "has space", "a/b", "caf\u00e9", "semi;colon", "x" * (limits.MAX_ID_CHARS + 1)],
)
def test_bad_request_id_rejected(request_id: str) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(_request(request_id=request_id))
    assert info.value.errors()[0]["loc"] == ("request_id",)


def test_request_id_at_length_limit_accepted() -> None:
    rid = "A1._:-" + "x" * (limits.MAX_ID_CHARS - 6)
    assert InferenceRequest.model_validate(_request(request_id=rid)).request_id == rid


@pytest.mark.parametrize("model", ["Demo", "-demo", ".demo", "demo mlp", "a" * 64, "", "d/m"])
def test_bad_model_name_rejected(model: str) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(_request(model=model))
    assert info.value.errors()[0]["loc"] == ("model",)


@pytest.mark.parametrize("model", ["demo-mlp", "a", "m1.v2_x-y", "a" * 63])
def test_good_model_name_accepted(model: str) -> None:
    assert InferenceRequest.model_validate(_request(model=model)).model == model


@pytest.mark.parametrize(
    ("shape", "data"),
    [([2, 2], [1.0, 2.0, 3.0]), ([3], [1.0, 2.0, 3.0, 4.0]), ([0], [1.0]), ([], [])],
)
def test_shape_and_element_count_must_agree(shape: list[int], data: list[float]) -> None:
    with pytest.raises(ValidationError, match="element count differs"):
        Tensor.model_validate(_tensor("float32", shape, data))


def test_scalar_and_empty_tensors_accepted() -> None:
    assert Tensor.model_validate(_tensor("float64", [], [1.5])).data == [1.5]
    assert Tensor.model_validate(_tensor("int32", [2, 0], [])).data == []


def test_negative_dimension_rejected() -> None:
    with pytest.raises(ValidationError):
        Tensor.model_validate(_tensor("float32", [-1], []))


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("int32", 1.5),
        ("int64", 2.0),
        ("int32", True),
        ("int32", "1"),
        ("int32", 2**31),
        ("int32", -(2**31) - 1),
        ("int64", 2**63),
        ("float32", True),
        ("float64", False),
        ("float32", "1.0"),
        ("bool", 1),
        ("bool", 0.0),
        ("string", 1),
        ("string", "s" * (limits.MAX_STRING_ELEMENT_CHARS + 1)),
    ],
)
def test_element_must_fit_dtype(dtype: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=r"is not|element"):
        Tensor.model_validate(_tensor(dtype, [1], [value]))


@pytest.mark.parametrize(
    ("dtype", "value"),
    [
        ("int32", 2**31 - 1),
        ("int32", -(2**31)),
        ("float32", 3),
        ("bool", True),
        ("string", ""),
        ("float64", -0.0),
    ],
)
def test_element_that_fits_dtype_accepted(dtype: str, value: Any) -> None:
    assert Tensor.model_validate(_tensor(dtype, [1], [value])).data == [value]


def test_int_dtype_given_float_in_json_rejected() -> None:
    raw = json.dumps(_tensor("int32", [2], [1, 2])).replace("[1, 2]", "[1.0, 2]")
    assert "1.0" in raw
    with pytest.raises(ValidationError, match="does not fit the tensor's dtype"):
        Tensor.model_validate_json(raw)


def test_json_true_given_to_float_dtype_rejected() -> None:
    with pytest.raises(ValidationError, match="does not fit the tensor's dtype"):
        Tensor.model_validate_json('{"dtype":"float32","shape":[2],"data":[1.0,true]}')


def test_too_many_tensor_elements_rejected() -> None:
    n = limits.MAX_TENSOR_ELEMENTS
    assert Tensor.model_validate(_tensor("float32", [n], [0.0] * n)).shape == [n]
    with pytest.raises(ValidationError) as info:
        Tensor.model_validate(_tensor("float32", [n + 1], [0.0] * (n + 1)))
    assert info.value.errors()[0]["type"] == "too_long"


def test_rank_and_tensor_count_limits() -> None:
    rank = limits.MAX_TENSOR_RANK
    Tensor.model_validate(_tensor("float32", [1] * rank, [0.0]))
    with pytest.raises(ValidationError):
        Tensor.model_validate(_tensor("float32", [1] * (rank + 1), [0.0]))
    one = _tensor("float32", [1], [0.0])
    MLInput.model_validate({"tensors": {f"t{i}": one for i in range(limits.MAX_TENSORS)}})
    with pytest.raises(ValidationError):
        MLInput.model_validate({"tensors": {f"t{i}": one for i in range(limits.MAX_TENSORS + 1)}})
    with pytest.raises(ValidationError):
        MLInput.model_validate({"tensors": {}})


@pytest.mark.parametrize("name", ["", "has space", "x" * 129, "caf\u00e9"])
def test_bad_tensor_name_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        MLInput.model_validate({"tensors": {name: _tensor("float32", [1], [0.0])}})


def test_too_many_chat_messages_rejected() -> None:
    msg = {"role": "user", "content": "hi"}
    ChatInput.model_validate(_chat([msg] * limits.MAX_CHAT_MESSAGES))
    with pytest.raises(ValidationError) as info:
        ChatInput.model_validate(_chat([msg] * (limits.MAX_CHAT_MESSAGES + 1)))
    assert info.value.errors()[0]["loc"] == ("messages",)


def test_conversation_longer_than_limit_rejected() -> None:
    half = limits.MAX_PROMPT_CHARS // 2
    ChatInput.model_validate(
        _chat([{"role": "system", "content": "s" * half}, {"role": "user", "content": "u" * half}])
    )
    with pytest.raises(ValidationError, match="conversation is longer than"):
        ChatInput.model_validate(
            _chat(
                [
                    {"role": "system", "content": "s" * half},
                    {"role": "user", "content": "u" * (half + 1)},
                ]
            )
        )


def test_single_message_longer_than_limit_rejected() -> None:
    with pytest.raises(ValidationError):
        ChatInput.model_validate(
            _chat([{"role": "user", "content": "u" * (limits.MAX_PROMPT_CHARS + 1)}])
        )


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -0.1},
        {"temperature": 2.1},
        {"top_p": 0.0},
        {"top_k": 0},
        {"max_tokens": limits.MAX_NEW_TOKENS + 1},
        {"stop": ["a"] * (limits.MAX_STOP_SEQUENCES + 1)},
        {"stop": [""]},
        {"seed": 2**32},
    ],
)
def test_sampling_params_bounds(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatInput.model_validate(
            {"kind": "chat", "messages": [{"role": "user", "content": "hi"}], "params": params}
        )


@pytest.mark.parametrize(
    "doc",
    [
        _request(extra_field=1),
        _request(
            payload={"kind": "ml", "tensors": {"x": {**_tensor("float32", [1], [0]), "z": 1}}}
        ),
        _request(payload={**_chat([{"role": "user", "content": "hi"}]), "plugins": []}),
    ],
    ids=["request", "tensor", "chat"],
)
def test_unknown_fields_rejected(doc: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        InferenceRequest.model_validate(doc)
    assert any(e["type"] == "extra_forbidden" for e in info.value.errors())


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_rejected_in_json(token: str) -> None:
    raw = json.dumps(_request()).replace("0.25", token)
    assert token in raw
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate_json(raw)


def test_unknown_payload_kind_and_mode_rejected() -> None:
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate(_request(payload={"kind": "image", "tensors": {}}))
    with pytest.raises(ValidationError):
        InferenceRequest.model_validate(_request(mode="FAST"))


def test_models_are_frozen() -> None:
    request = InferenceRequest.model_validate(_request())
    with pytest.raises(ValidationError):
        request.request_id = "other"  # type: ignore[misc]


# --- codec.decode ---------------------------------------------------------------------------


def test_decode_valid_request() -> None:
    request = InferenceRequest.model_validate(_request(reply_to="my.replies"))
    decoded = decode(encode(request), InferenceRequest)
    assert isinstance(decoded, Decoded)
    assert decoded.message == request


def test_decode_none_is_empty_message() -> None:
    assert decode(None, InferenceRequest) == Undecodable("empty message")


def test_decode_oversize_rejected_before_parsing() -> None:
    valid = json.dumps(_request()).encode()
    at_limit = valid + b" " * (limits.MAX_MESSAGE_BYTES - len(valid))
    assert isinstance(decode(at_limit, InferenceRequest), Decoded)
    over = decode(at_limit + b" ", InferenceRequest)
    assert isinstance(over, Undecodable)
    assert "exceeds" in over.reason
    assert str(limits.MAX_MESSAGE_BYTES + 1) not in over.reason  # never the sender's size
    assert over.request_id is None


@pytest.mark.parametrize(
    "raw",
    [b'{"request_id":"\xff\xfe"}', b"\xc3\x28", b"not json", b"{", b""],
    ids=["bad-utf8-in-object", "bad-utf8", "text", "truncated", "empty"],
)
def test_decode_non_json(raw: bytes) -> None:
    result = decode(raw, InferenceRequest)
    assert result == Undecodable("not UTF-8 JSON")


@pytest.mark.parametrize(
    ("raw", "kind"),
    [(b"[1,2]", "list"), (b'"req-1"', "str"), (b"42", "int"), (b"null", "NoneType")],
)
def test_decode_non_object(raw: bytes, kind: str) -> None:
    result = decode(raw, InferenceRequest)
    assert isinstance(result, Undecodable)
    assert kind in result.reason
    assert result.request_id is None


def test_decode_invalid_object_salvages_routing_fields() -> None:
    raw = json.dumps(_request(model="Not A Model", reply_to="client-7.replies")).encode()
    result = decode(raw, InferenceRequest)
    assert isinstance(result, Undecodable)
    assert result.request_id == "req-1"
    assert result.reply_to == "client-7.replies"
    assert result.reason.startswith("invalid message: ")
    assert "model: string_pattern_mismatch" in result.reason


@pytest.mark.parametrize(
    ("request_id", "reply_to"),
    [("bad id!", "ok.topic"), (123, "ok.topic"), ("x" * 129, None), (["req-1"], "bad topic")],
)
def test_decode_does_not_salvage_invalid_routing_fields(request_id: Any, reply_to: Any) -> None:
    raw = json.dumps(_request(request_id=request_id, reply_to=reply_to)).encode()
    result = decode(raw, InferenceRequest)
    assert isinstance(result, Undecodable)
    assert result.request_id is None
    if reply_to == "ok.topic":
        assert result.reply_to == "ok.topic"
    else:
        assert result.reply_to is None


def test_decode_summarises_at_most_five_errors() -> None:
    doc = {f"extra{i}": i for i in range(9)}
    result = decode(json.dumps(doc).encode(), InferenceRequest)
    assert isinstance(result, Undecodable)
    assert result.reason.count(";") == 5
    assert result.reason.endswith("more")


@pytest.mark.parametrize(
    "doc",
    [
        _request(model=CANARY),
        _request(request_id=f"{CANARY} with spaces"),
        _request(reply_to=f"{CANARY} topic"),
        _request(created_unix_ms=CANARY),
        _request(payer=f"{CANARY}!"),
        _request(mode=CANARY),
        _request(payload={"kind": "ml", "tensors": {"x": _tensor("float32", [1], [CANARY])}}),
        _request(payload={"kind": "ml", "tensors": {"x": _tensor(CANARY, [1], [1.0])}}),
        _request(payload={"kind": CANARY}),
        _request(payload=_chat([{"role": CANARY, "content": "hi"}])),
        _request(payload=_chat([{"role": "user", "content": CANARY * 30_000}])),
        _request(payload={**_chat([{"role": "user", "content": CANARY}]), "params": CANARY}),
    ],
)
def test_decode_reason_never_contains_submitted_values(doc: dict[str, Any]) -> None:
    result = decode(json.dumps(doc).encode(), InferenceRequest)
    assert isinstance(result, Undecodable)
    assert result.reason.startswith("invalid message: ")
    assert CANARY not in result.reason
    assert CANARY not in repr(result)


@pytest.mark.parametrize(
    "doc",
    [
        _request(payload={"kind": "ml", "tensors": {f"{CANARY} x": _tensor("float32", [1], [0])}}),
        _request(**{CANARY: 1}),
    ],
    ids=["bad-tensor-name", "unknown-field-name"],
)
def test_decode_reason_never_contains_submitted_keys(doc: dict[str, Any]) -> None:
    result = decode(json.dumps(doc).encode(), InferenceRequest)
    assert isinstance(result, Undecodable)
    assert CANARY not in result.reason


def test_decode_works_for_every_message_type() -> None:
    result = decode(b'{"type":"settlement_record"}', SettlementRecord)
    assert isinstance(result, Undecodable)
    assert "envelope: missing" in result.reason


# --- JSON Schema ----------------------------------------------------------------------------


def test_all_schemas_names_every_message() -> None:
    found = all_schemas()
    assert set(found) == {
        "InferenceRequest",
        "Reply",
        "SettlementRecord",
        "ProofRecord",
        "RegistrationRecord",
        "SealedPlaintext",
        "SignedAdmissionList",
        "DlqEntry",
        "InclusionProof",
    }
    for name, schema in found.items():
        assert isinstance(schema, dict), name
        assert {"properties", "$defs", "oneOf", "discriminator"} & schema.keys(), name
        json.dumps(schema)  # exportable as JSON


def test_request_schema_requires_routing_fields_and_forbids_extras() -> None:
    schema = all_schemas()["InferenceRequest"]
    assert {"request_id", "model", "created_unix_ms", "payload"} <= set(schema["required"])
    assert "reply_to" not in schema["required"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["request_id"]["maxLength"] == limits.MAX_ID_CHARS


def test_reply_schema_is_discriminated_by_type() -> None:
    schema = all_schemas()["Reply"]
    assert schema["discriminator"]["propertyName"] == "type"
    mapping = schema["discriminator"]["mapping"]
    assert set(mapping) == {"result", "sealed_result", "error", "chunk", "sealed_reply"}
    assert InferenceResult.__name__ in mapping["result"]
    assert ErrorReply.__name__ in mapping["error"]


def test_settlement_schema_requires_envelope_and_signature() -> None:
    schema = all_schemas()["SettlementRecord"]
    assert {"envelope", "signature"} <= set(schema["required"])


# --- topics ---------------------------------------------------------------------------------


def test_default_topic_names() -> None:
    topics = Topics()
    assert topics.namespace == "og"
    assert topics.infer("demo-mlp") == "og.infer.demo-mlp"
    assert topics.infer_prefix == "og.infer."
    assert topics.replies == "og.replies"
    assert topics.settlement == "og.settlement"
    assert topics.dlq == "og.dlq"
    assert topics.registry == "og.registry"


def test_namespaced_topic_names() -> None:
    topics = Topics("test_run-7")
    assert topics.infer("demo-lm") == "test_run-7.infer.demo-lm"
    assert topics.replies == "test_run-7.replies"
    assert topics.dlq == "test_run-7.dlq"


@pytest.mark.parametrize("namespace", ["", "a.b", "a b", "x" * 65, "caf\u00e9", "a/b"])
def test_bad_namespace_rejected(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Topics(namespace)


@pytest.mark.parametrize("model", ["Demo", "", "-x", "a b", "a" * 64])
def test_infer_topic_rejects_bad_model_name(model: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        Topics().infer(model)


def test_model_of() -> None:
    topics = Topics()
    assert topics.model_of("og.infer.demo-mlp") == "demo-mlp"
    assert topics.model_of(topics.infer("m1.v2")) == "m1.v2"
    assert topics.model_of("og.replies") is None
    assert topics.model_of("other.infer.demo-mlp") is None
    assert topics.model_of("og.inference.demo-mlp") is None
    assert Topics("other").model_of("og.infer.demo-mlp") is None


def test_schema_version_is_two_and_no_other_is_accepted() -> None:
    assert schemas.SCHEMA_VERSION == 2
    assert InferenceRequest.model_validate(_request()).schema_version == 2
    for other in (1, 3):
        with pytest.raises(ValidationError):
            InferenceRequest.model_validate(_request(schema_version=other))


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deep_nesting_is_refused_even_with_a_raised_recursion_limit(opener: bytes) -> None:
    """web3 (through py_ecc) raises the recursion limit to 100,000 at import; the parser would
    then overflow the C stack on deep nesting and kill the process instead of raising."""
    import sys

    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)
    try:
        result = decode(opener * 200_000, InferenceRequest)
    finally:
        sys.setrecursionlimit(previous)
    assert isinstance(result, Undecodable)
    assert result.reason == "JSON nested deeper than 32 levels"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    from schemas.codec import too_deep

    assert not too_deep(b'{"a": "' + b"[" * 500 + b'\\"' + b"{" * 500 + b'"}')
    assert too_deep(b"[" * 33 + b"]" * 33)
    assert not too_deep(b"[" * 32 + b"]" * 32)
