"""``schemas.verify.record``: settlement record verification, attacked as a record forger would
(pure: the verifier's receipt time and a registry view are passed in).

Every field of a signed envelope is changed one at a time (hypothesis draws the field and the
new value): none survives. Times are judged against receipt time only: a future-dated or
back-dated record is refused whatever it claims. Budgets and payers: a node cannot bill more
output than the payer granted, nor bill a payer who did not sign this request.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.base import SettlementMode, VerificationMode
from schemas.codec import encode
from schemas.results import Usage
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer, envelope_digest
from schemas.verify.admission import Admissions, NodeAdmission
from schemas.verify.record import (
    MAX_INPUT_TOKENS,
    RecordRules,
    Rejected,
    Verified,
    gate_record,
    verify_record,
)
from schemas.verify.registry import RegistryView
from tests.harness.nodes import DIGEST, MODEL, TestNode

NOW_MS = 1_700_000_000_000
RULES = RecordRules(max_clock_skew_s=5.0, max_record_age_s=3600.0)
NODE = TestNode.seeded(1)
OTHER = TestNode.seeded(2)
PAYER = Signer(b"\x0b" * 32)


def _record(
    node: TestNode = NODE, request_id: str = "req-s-1", **overrides: Any
) -> SettlementRecord:
    fields: dict[str, Any] = {
        "model_id": "demo-lm",
        "usage": Usage(input_tokens=2, output_tokens=9),
        "max_output_tokens": 16,
        "payer": PAYER,
        "signed_unix_ms": NOW_MS,
        "request_created_unix_ms": NOW_MS - 1000,
    }
    fields.update(overrides)
    return node.record(request_id, **fields)


def _verify(raw: bytes | None, rules: RecordRules = RULES) -> Verified | Rejected:
    return verify_record(raw, received_unix_ms=NOW_MS, rules=rules)


def _reason(record: SettlementRecord, rules: RecordRules = RULES) -> str | None:
    outcome = _verify(encode(record), rules)
    return outcome.reason if isinstance(outcome, Rejected) else None


# --- decoding ----------------------------------------------------------------------------------


def test_a_valid_record_is_verified() -> None:
    record = _record()
    assert _verify(encode(record)) == Verified(record, envelope_digest(record.envelope))


@pytest.mark.parametrize(
    "raw",
    [None, b"", b"not json", b"\xff\xfe", b"[]", b'{"type":"settlement_record"}', b"{}"],
    ids=["none", "empty", "text", "bad-utf8", "array", "missing-fields", "empty-object"],
)
def test_undecodable_records_are_rejected(raw: bytes | None) -> None:
    result = _verify(raw)
    assert isinstance(result, Rejected)
    assert (result.reason, result.node_id) == ("not_decodable", None)
    assert result.detail


def test_another_message_type_is_not_decodable() -> None:
    doc = json.loads(encode(_record()))
    doc["type"] = "result"
    assert _reason_raw(json.dumps(doc).encode()) == "not_decodable"


def _reason_raw(raw: bytes) -> str | None:
    outcome = _verify(raw)
    return outcome.reason if isinstance(outcome, Rejected) else None


# --- forgery: every signed field, changed alone -------------------------------------------------

_ALTERNATIVES: dict[str, Any] = {
    "request_id": "req-s-2",
    "model_id": "demo-mlp",
    "model_digest": "0" * 64,
    "mode": VerificationMode.TEE,
    "settlement": SettlementMode.PRIVATE,
    "input_hash": "0" * 64,
    "output_hash": "0" * 64,
    "usage": Usage(input_tokens=2, output_tokens=8),
    "request_created_unix_ms": NOW_MS - 999,
    "max_output_tokens": 15,
    "payer": None,
    "node_id": OTHER.node_id,
    "signed_unix_ms": NOW_MS - 1,
}


def test_the_tamper_cases_cover_every_envelope_field() -> None:
    assert set(_ALTERNATIVES) == set(type(_record().envelope).model_fields) - {"schema_version"}


@given(field=st.sampled_from(sorted(_ALTERNATIVES)))
@settings(max_examples=40, deadline=None)
def test_no_signed_field_can_be_changed(field: str) -> None:
    record = _record()
    envelope = record.envelope.model_copy(update={field: _ALTERNATIVES[field]})
    assert _reason(record.model_copy(update={"envelope": envelope})) == "bad_signature"


@given(position=st.integers(min_value=0, max_value=63), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_a_flipped_signature_bit_is_a_bad_signature(position: int, bit: int) -> None:
    record = _record()
    raw = bytearray(bytes.fromhex(record.signature))
    raw[position] ^= 1 << bit
    assert _reason(record.model_copy(update={"signature": raw.hex()})) == "bad_signature"


def test_a_node_id_that_is_no_public_key_is_a_bad_signature_not_a_crash() -> None:
    record = _record()
    envelope = record.envelope.model_copy(update={"node_id": "f" * 64})
    assert _reason(record.model_copy(update={"envelope": envelope})) == "bad_signature"


# --- time: the verifier's, never the signer's ---------------------------------------------------


def test_signed_in_the_future_beyond_the_skew_is_refused() -> None:
    assert _reason(_record(signed_unix_ms=NOW_MS + 5000)) is None
    assert _reason(_record(signed_unix_ms=NOW_MS + 5001)) == "future_timestamp"


def test_a_request_created_after_its_answer_was_signed_is_refused() -> None:
    record = _record(request_created_unix_ms=NOW_MS + 5001, signed_unix_ms=NOW_MS - 1)
    assert _reason(record) in {"future_timestamp"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"signed_unix_ms": NOW_MS - 3_600_001, "request_created_unix_ms": NOW_MS - 3_600_002},
        {"request_created_unix_ms": NOW_MS - 3_600_001},
    ],
    ids=["signed-long-ago", "request-long-ago"],
)
def test_back_dated_records_are_too_old(overrides: dict[str, int]) -> None:
    # A revoked or stolen key cannot back-date a record into a window when it counted.
    assert _reason(_record(**overrides)) == "too_old"


# --- budget and payer -------------------------------------------------------------------------


def test_output_beyond_the_granted_budget_is_refused() -> None:
    assert _reason(_record(usage=Usage(input_tokens=2, output_tokens=16))) is None
    assert _reason(_record(usage=Usage(input_tokens=2, output_tokens=17))) == "over_budget"
    ml = _record(model_id=MODEL, max_output_tokens=None, usage=Usage(input_tokens=4))
    assert _reason(ml) is None
    ml_billed = _record(
        model_id=MODEL, max_output_tokens=None, usage=Usage(input_tokens=4, output_tokens=1)
    )
    assert _reason(ml_billed) == "over_budget"
    huge_input = Usage(input_tokens=MAX_INPUT_TOKENS + 1, output_tokens=1)
    assert _reason(_record(usage=huge_input)) == "over_budget"


def test_a_payer_who_signed_another_request_cannot_be_billed() -> None:
    # The node moves the payer's grant of one request onto another: the grant is rebuilt
    # from the envelope, so the signature does not verify.
    granted = _record().envelope.payer
    assert granted is not None
    other = _record(OTHER, "req-s-9", payer=granted)
    assert _reason(other) == "bad_payer"
    raised_budget = _record(payer=granted, max_output_tokens=64)
    assert _reason(raised_budget) == "bad_payer"


def test_eip191_payers_verify_too() -> None:
    wallet = ChainSigner(b"\x0d" * 32)
    record = _record(payer=wallet)
    assert record.envelope.payer is not None
    assert record.envelope.payer.account == f"eip191:{wallet.address}"
    assert _reason(record) is None


def test_records_without_a_payer_are_refused_when_payers_are_required() -> None:
    record = _record(payer=None)
    assert _reason(record) is None
    assert _reason(record, RecordRules(require_payer=True)) == "no_payer"


# --- the node gate ----------------------------------------------------------------------------


def _view(*admitted: TestNode, registered: tuple[TestNode, ...] = (NODE, OTHER)) -> RegistryView:
    view = RegistryView(
        admissions=Admissions(
            nodes={n.node_id: NodeAdmission(n.node_id, n.chain_address, True) for n in admitted},
            source="test",
        )
    )
    for node in registered:
        reg = node.registration(
            models=("demo-lm", MODEL), heartbeat_unix_ms=NOW_MS - 10, heartbeat_interval_s=60
        )
        assert view.apply(encode(reg), NOW_MS - 10) is None
    return view


def _gate(record: SettlementRecord, view: RegistryView) -> str | None:
    verified = _verify(encode(record))
    assert isinstance(verified, Verified)
    rejected = gate_record(verified, view, NOW_MS)
    return None if rejected is None else rejected.reason


def test_the_gate_accepts_an_admitted_registered_node() -> None:
    assert _gate(_record(), _view(NODE)) is None
    assert _record().envelope.model_digest == DIGEST


def test_a_self_registered_node_is_not_admitted() -> None:
    assert _gate(_record(OTHER), _view(NODE)) == "not_admitted"
    assert _gate(_record(TestNode.seeded(7)), _view(NODE)) == "unknown_node"


def test_a_chain_signature_by_another_key_is_refused() -> None:
    record = _record()
    forged = OTHER.chain.sign_digest(envelope_digest(record.envelope))
    assert _gate(record.model_copy(update={"chain_signature": forged}), _view(NODE)) == (
        "bad_chain_signature"
    )


def test_a_registration_naming_another_chain_address_than_admitted_is_refused() -> None:
    view = _view(NODE, registered=())
    reg = NODE.registration(
        models=("demo-lm",),
        heartbeat_unix_ms=NOW_MS - 10,
        heartbeat_interval_s=60,
        chain_address=OTHER.chain_address,
    )
    view.apply(encode(reg), NOW_MS - 10)
    assert _gate(_record(), view) == "chain_address_mismatch"


def test_an_unregistered_model_or_digest_is_refused() -> None:
    assert _gate(_record(model_id="other-model"), _view(NODE)) == "unregistered_model"
    assert _gate(_record(model_digest="0" * 64), _view(NODE)) == "unregistered_model"
    assert _gate(_record(mode=VerificationMode.ZKML), _view(NODE)) == "unregistered_mode"
