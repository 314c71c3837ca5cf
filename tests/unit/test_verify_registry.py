"""The registry view, attacked as anyone who can write the registry topic would: a node that
registers itself, a replayed or erased registration, a far-future heartbeat, a revoked node
that keeps heartbeating. Only the admission authority's facts and the verifier's own receipt
times decide (``schemas.verify.registry``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.base import VerificationMode
from schemas.codec import encode
from schemas.registry import NodeRegistration
from schemas.verify.admission import Admissions, NodeAdmission, Verdict
from schemas.verify.registry import RegistryPolicy, RegistryView
from tests.harness.nodes import DIGEST, MODEL, TestNode

T0 = 1_700_000_000_000
NODE = TestNode.seeded(1)
INTRUDER = TestNode.seeded(2)
"""Signs its registrations correctly; no authority admitted it."""


def _admitting(*nodes: TestNode, revoked: tuple[TestNode, ...] = ()) -> Admissions:
    facts = {n.node_id: NodeAdmission(n.node_id, n.chain_address, True) for n in nodes}
    facts |= {n.node_id: NodeAdmission(n.node_id, n.chain_address, False) for n in revoked}
    return Admissions(nodes=facts, source="test")


def _registration(node: TestNode = NODE, *, at_ms: int = T0, **kw: object) -> bytes:
    kw.setdefault("heartbeat_interval_s", 1.0)
    return encode(node.registration(heartbeat_unix_ms=at_ms, **kw))  # type: ignore[arg-type]


def _view(policy: RegistryPolicy | None = None, *admitted: TestNode) -> RegistryView:
    return RegistryView(policy or RegistryPolicy(), _admitting(*(admitted or (NODE,))))


def _check(view: RegistryView, node: TestNode = NODE, at_ms: int = T0) -> str | None:
    return view.check(node.node_id, MODEL, DIGEST, VerificationMode.VANILLA, at_ms)


def test_an_admitted_node_counts_once_registered() -> None:
    view = _view()
    assert _check(view) == "unknown_node"
    assert view.apply(_registration(), T0) is None
    assert _check(view, at_ms=T0 + 500) is None
    assert [r.node_id for r in view.active_nodes(MODEL, T0 + 500)] == [NODE.node_id]
    assert view.active_nodes("demo-lm", T0 + 500) == []


def test_a_self_registered_node_is_never_offered_nor_settled() -> None:
    view = _view()
    assert view.apply(_registration(INTRUDER), T0) is None  # a valid registration...
    assert _check(view, INTRUDER) == "not_admitted"  # ...of a node nobody admitted
    assert view.active_nodes(MODEL, T0) == []


def test_with_no_admission_facts_nobody_counts() -> None:
    view = RegistryView()
    view.apply(_registration(), T0)
    assert _check(view) == "not_admitted"
    open_view = RegistryView(admissions=Admissions.everyone())
    open_view.apply(_registration(INTRUDER), T0)
    assert _check(open_view, INTRUDER) is None  # "open": closed development networks only


def test_forged_undecodable_and_tombstone_messages_change_nothing() -> None:
    view = _view()
    view.apply(_registration(), T0)
    raw = bytearray(_registration(at_ms=T0 + 10))
    raw[raw.index(b'"software_version":"test"') + 20] = ord("X")
    assert view.apply(bytes(raw), T0 + 10) == "bad_signature"
    assert view.apply(b"not json", T0 + 10) == "not_decodable"
    assert view.apply(None, T0 + 10) == "tombstone"  # compaction cannot erase a node
    assert view.registration(NODE.node_id) is not None
    assert _check(view, at_ms=T0 + 500) is None


def test_a_registration_signed_by_another_node_is_refused() -> None:
    view = _view()
    reg = NODE.registration(heartbeat_unix_ms=T0)
    forged = reg.model_copy(update={"signature": INTRUDER.signer.sign(b"x", reg.registration)})
    assert view.apply(encode(forged), T0) == "bad_signature"


def test_a_replayed_older_registration_is_ignored() -> None:
    view = _view()
    view.apply(_registration(at_ms=T0 + 5000, status="draining"), T0 + 5000)
    # The attacker replays an older "active" registration: the sequence decides, not arrival.
    assert view.apply(_registration(at_ms=T0, status="active"), T0 + 5001) == "out_of_order"
    registration = view.registration(NODE.node_id)
    assert registration is not None and registration.status == "draining"
    assert view.active_nodes(MODEL, T0 + 5002) == []


def test_a_node_that_stops_heartbeating_drops_out_on_the_verifiers_clock() -> None:
    view = _view(RegistryPolicy(stale_after_intervals=3))
    view.apply(_registration(at_ms=T0), T0)
    assert _check(view, at_ms=T0 + 3000) is None
    assert _check(view, at_ms=T0 + 3001) == "stale_node"
    assert view.active_nodes(MODEL, T0 + 3001) == []
    view.apply(_registration(at_ms=T0 + 5000), T0 + 5000)
    assert _check(view, at_ms=T0 + 6000) is None


@given(claimed_ahead_ms=st.integers(min_value=1, max_value=10**12))
@settings(max_examples=30, deadline=None)
def test_a_far_future_heartbeat_buys_no_freshness(claimed_ahead_ms: int) -> None:
    view = _view(RegistryPolicy(stale_after_intervals=3))
    view.apply(_registration(at_ms=T0 + claimed_ahead_ms), T0)
    # Received at T0: it counts at T0, whatever it claims.
    assert _check(view, at_ms=T0 + 3001) == "stale_node"


def test_draining_nodes_are_not_offered_but_still_settle() -> None:
    view = _view()
    view.apply(_registration(status="draining"), T0)
    assert view.active_nodes(MODEL, T0) == []
    assert _check(view) is None


def test_revocation_outlasts_any_registration_the_node_publishes() -> None:
    view = RegistryView(admissions=_admitting(revoked=(NODE,)))
    view.apply(_registration(at_ms=T0), T0)
    view.apply(_registration(at_ms=T0 + 100), T0 + 100)
    assert _check(view, at_ms=T0 + 200) == "revoked_node"
    assert view.active_nodes(MODEL, T0 + 200) == []


def test_an_operator_deny_list_overrides_admission() -> None:
    view = _view(RegistryPolicy(revoked_nodes=frozenset({NODE.node_id})))
    view.apply(_registration(), T0)
    assert _check(view) == "revoked_node"


def test_the_registered_chain_address_must_be_the_admitted_one() -> None:
    view = _view()
    view.apply(_registration(chain_address=INTRUDER.chain_address), T0)
    assert _check(view) == "chain_address_mismatch"
    assert view.chain_address(NODE.node_id) == INTRUDER.chain_address


def test_records_must_name_a_registered_model_digest_and_mode() -> None:
    view = _view()
    view.apply(_registration(), T0)
    args = (NODE.node_id, MODEL)
    assert view.check(*args, "00" * 32, VerificationMode.VANILLA, T0) == "unregistered_model"
    assert view.check(NODE.node_id, "other", DIGEST, VerificationMode.VANILLA, T0) == (
        "unregistered_model"
    )
    assert view.check(*args, DIGEST, VerificationMode.ZKML, T0) == "unregistered_mode"


# --- attestation and measurements --------------------------------------------------------------

MEASUREMENT = ("dev", "aa" * 32)


def _attested_view(admissions: Admissions, *, ok: bool = True) -> tuple[RegistryView, list[int]]:
    seen: list[int] = []

    def check(reg: NodeRegistration, at_ms: int) -> Verdict:
        seen.append(at_ms)
        return Verdict(ok, *MEASUREMENT) if ok else Verdict(False)

    view = RegistryView(RegistryPolicy(attestation_check=check), admissions)
    return view, seen


def _with_evidence(node: TestNode = NODE, at_ms: int = T0) -> bytes:
    from schemas.attestation import Attestation

    evidence = Attestation(kind="dev", evidence="AAAA", report_data="00" * 64, issued_unix_ms=T0)
    return _registration(node, at_ms=at_ms, attestation=evidence)


def test_tee_records_need_evidence_that_verifies_at_the_time_of_use() -> None:
    view, seen = _attested_view(_admitting(NODE))
    view.apply(_registration(), T0)
    assert view.check(NODE.node_id, MODEL, DIGEST, VerificationMode.TEE, T0) == "unattested_node"
    assert seen == []  # no evidence: never attested, whatever a check would say
    view.apply(_with_evidence(at_ms=T0 + 1), T0 + 1)
    assert view.node_problem(NODE.node_id, T0 + 2, mode=VerificationMode.TEE) is None
    assert view.node_problem(NODE.node_id, T0 + 3, mode=VerificationMode.TEE) is None
    assert seen == [T0 + 2, T0 + 3]  # judged again at each use (evidence ages)
    failing, _ = _attested_view(_admitting(NODE), ok=False)
    failing.apply(_with_evidence(), T0)
    assert failing.node_problem(NODE.node_id, T0, mode=VerificationMode.TEE) == "unattested_node"


def test_an_approved_measurement_admits_a_node_and_revoking_it_disables_every_such_node() -> None:
    approved = Admissions(approved_measurements=frozenset({MEASUREMENT}), source="test")
    view, _ = _attested_view(approved)
    view.apply(_with_evidence(INTRUDER), T0)
    assert _check(view, INTRUDER) is None
    assert [r.node_id for r in view.active_nodes(MODEL, T0, require_attestation=True)] == [
        INTRUDER.node_id
    ]
    revoked = Admissions(
        nodes={NODE.node_id: NodeAdmission(NODE.node_id, NODE.chain_address, True)},
        approved_measurements=frozenset({MEASUREMENT}),
        revoked_measurements=frozenset({MEASUREMENT}),
        source="test",
    )
    view.admissions = revoked
    view.apply(_with_evidence(NODE), T0)
    assert _check(view, INTRUDER) == "revoked_measurement"
    assert _check(view, NODE) == "revoked_measurement"  # explicit admission does not save it


def test_without_a_passing_attestation_check_nobody_is_admitted_by_measurement() -> None:
    approved = Admissions(approved_measurements=frozenset({MEASUREMENT}), source="test")
    view, _ = _attested_view(approved, ok=False)
    view.apply(_with_evidence(INTRUDER), T0)
    assert _check(view, INTRUDER) == "not_admitted"
