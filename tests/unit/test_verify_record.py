"""``schemas.verify.record``: settlement record verification (pure, the clock passed in)."""

from __future__ import annotations

import json

import pytest
from nacl.signing import SigningKey

from schemas.codec import encode
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import Signer, envelope_digest
from schemas.verify.record import Rejected, Verified, verify_record

NOW_MS = 1_700_000_000_000
SKEW_S = 5.0
SIGNER = Signer(b"\x01" * 32)
OTHER = Signer(b"\x02" * 32)


def _envelope(signer: Signer = SIGNER, **overrides: object) -> ResultEnvelope:
    fields: dict[str, object] = {
        "request_id": "req-s-1",
        "model_id": "demo-mlp",
        "model_digest": "a" * 64,
        "mode": "VANILLA",
        "input_hash": "b" * 64,
        "output_hash": "c" * 64,
        "usage": Usage(input_tokens=2, output_tokens=9),
        "payer": "alice",
        "node_id": signer.node_id,
        "signed_unix_ms": NOW_MS,
    }
    fields.update(overrides)
    return ResultEnvelope.model_validate(fields)


def _record(signer: Signer = SIGNER, **overrides: object) -> SettlementRecord:
    envelope = _envelope(signer, **overrides)
    return SettlementRecord(envelope=envelope, signature=signer.sign_envelope(envelope))


def _verify(raw: bytes | None) -> Verified | Rejected:
    return verify_record(raw, max_clock_skew_s=SKEW_S, now_ms=NOW_MS)


# --- verify_record ----------------------------------------------------------------------------


def test_valid_record_is_verified() -> None:
    record = _record()
    assert _verify(encode(record)) == Verified(record, envelope_digest(record.envelope))


def test_record_at_the_skew_limit_is_verified() -> None:
    record = _record(signed_unix_ms=NOW_MS + int(SKEW_S * 1000))
    assert isinstance(_verify(encode(record)), Verified)


def test_old_record_is_verified() -> None:
    assert isinstance(_verify(encode(_record(signed_unix_ms=0))), Verified)


@pytest.mark.parametrize(
    "raw",
    [None, b"", b"not json", b"\xff\xfe", b"[]", b'{"type":"settlement_record"}', b"{}"],
    ids=["none", "empty", "text", "bad-utf8", "array", "missing-fields", "empty-object"],
)
def test_undecodable_record_rejected(raw: bytes | None) -> None:
    result = _verify(raw)
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"
    assert result.detail
    assert result.node_id is None


def test_wrong_schema_rejected_with_salvaged_request_id() -> None:
    doc = json.loads(encode(_record()))
    doc["signature"] = "not hex"
    doc["request_id"] = "req-s-1"
    result = _verify(json.dumps(doc).encode())
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"
    assert "signature" in result.detail
    assert result.request_id == "req-s-1"


def test_other_message_type_rejected() -> None:
    doc = json.loads(encode(_record()))
    doc["type"] = "result"
    result = _verify(json.dumps(doc).encode())
    assert isinstance(result, Rejected)
    assert result.reason == "not_decodable"


def test_tampered_output_hash_is_bad_signature() -> None:
    record = _record()
    tampered = record.model_copy(
        update={"envelope": record.envelope.model_copy(update={"output_hash": "d" * 64})}
    )
    result = _verify(encode(tampered))
    assert result == Rejected("bad_signature", "", "req-s-1", SIGNER.node_id)


def test_signature_from_another_key_is_bad_signature() -> None:
    envelope = _envelope()
    forged = SigningKey(b"\x02" * 32).sign(envelope_digest(envelope)).signature.hex()
    result = _verify(encode(SettlementRecord(envelope=envelope, signature=forged)))
    assert isinstance(result, Rejected)
    assert result.reason == "bad_signature"


def test_node_id_that_is_not_a_public_key_is_bad_signature() -> None:
    record = _record()
    # 32 bytes that do not decode to a curve point: the verifier must reject, not raise.
    envelope = record.envelope.model_copy(update={"node_id": "f" * 64})
    result = _verify(encode(record.model_copy(update={"envelope": envelope})))
    assert isinstance(result, Rejected)
    assert result.reason == "bad_signature"


def test_future_timestamp_rejected() -> None:
    record = _record(signed_unix_ms=NOW_MS + int(SKEW_S * 1000) + 1)
    result = _verify(encode(record))
    assert result == Rejected("future_timestamp", "", "req-s-1", SIGNER.node_id)
