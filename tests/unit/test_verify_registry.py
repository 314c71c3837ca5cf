"""The registry view: signed registrations, heartbeat freshness, revocation, attestation."""

from __future__ import annotations

from schemas.base import VerificationMode
from schemas.codec import encode
from schemas.registry import (
    REGISTRATION_DOMAIN,
    REVOCATION_DOMAIN,
    NodeRegistration,
    RegisteredModel,
    RegistrationRecord,
    Revocation,
    RevocationRecord,
    verify_registration,
)
from schemas.signing import Signer
from schemas.verify.registry import RegistryPolicy, RegistryView

T0 = 1_700_000_000_000
NODE = Signer(bytes([1]) * 32)
OTHER = Signer(bytes([2]) * 32)
AUTHORITY = Signer(bytes([3]) * 32)


def _registration(
    signer: Signer = NODE,
    *,
    heartbeat_ms: int = T0,
    models: tuple[str, ...] = ("demo-mlp",),
    **kw: object,
) -> bytes:
    fields: dict[str, object] = {
        "node_id": signer.node_id,
        "x25519_public_key": "11" * 32,
        "chain_address": "0x" + "ab" * 20,
        "models": [
            RegisteredModel(name=m, digest="cd" * 32, modes=[VerificationMode.VANILLA])
            for m in models
        ],
        "software_version": "0.1.0",
        "started_unix_ms": T0,
        "heartbeat_unix_ms": heartbeat_ms,
        "heartbeat_interval_s": 1.0,
    }
    fields.update(kw)
    registration = NodeRegistration.model_validate(fields)
    record = RegistrationRecord(
        registration=registration, signature=signer.sign(REGISTRATION_DOMAIN, registration)
    )
    assert verify_registration(record)
    return encode(record)


def _revocation(node: Signer, at_ms: int, authority: Signer = AUTHORITY) -> bytes:
    revocation = Revocation(
        node_id=node.node_id,
        revoked_unix_ms=at_ms,
        reason="key compromised",
        authority_id=authority.node_id,
    )
    return encode(
        RevocationRecord(
            revocation=revocation, signature=authority.sign(REVOCATION_DOMAIN, revocation)
        )
    )


def test_unknown_until_registered_then_active() -> None:
    view = RegistryView()
    assert view.check_record(NODE.node_id, T0) == "unknown_node"
    assert view.apply(_registration()) is None
    assert view.check_record(NODE.node_id, T0 + 500) is None
    assert [r.node_id for r in view.active_nodes("demo-mlp", T0 + 500)] == [NODE.node_id]
    assert view.active_nodes("demo-lm", T0 + 500) == []


def test_forged_registration_is_ignored() -> None:
    view = RegistryView()
    raw = bytearray(_registration())
    raw[raw.index(b'"software_version":"0.1.0"') + 20] = ord("9")
    assert view.apply(bytes(raw)) == "bad_signature"
    assert view.apply(b"not json") == "not_decodable"
    assert view.apply(None) == "tombstone"
    assert view.check_record(NODE.node_id, T0) == "unknown_node"


def test_a_node_that_stops_heartbeating_drops_out() -> None:
    view = RegistryView(RegistryPolicy(stale_after_intervals=3))
    view.apply(_registration(heartbeat_ms=T0))
    assert view.check_record(NODE.node_id, T0 + 3000) is None
    assert view.check_record(NODE.node_id, T0 + 3001) == "stale_node"
    assert view.active_nodes("demo-mlp", T0 + 3001) == []
    # Records it signed while alive stay valid when read late.
    assert view.check_record(NODE.node_id, T0 + 100) is None
    view.apply(_registration(heartbeat_ms=T0 + 5000))
    assert view.check_record(NODE.node_id, T0 + 6000) is None


def test_older_heartbeats_do_not_roll_the_view_back() -> None:
    view = RegistryView()
    view.apply(_registration(heartbeat_ms=T0 + 5000))
    assert view.apply(_registration(heartbeat_ms=T0)) == "out_of_order"
    assert view.check_record(NODE.node_id, T0 + 7000) is None


def test_draining_nodes_are_not_offered_to_clients_but_still_settle() -> None:
    view = RegistryView()
    view.apply(_registration(status="draining"))
    assert view.active_nodes("demo-mlp", T0) == []
    assert view.check_record(NODE.node_id, T0) is None


def test_revocation_by_a_trusted_authority() -> None:
    view = RegistryView(RegistryPolicy(authorities=frozenset({AUTHORITY.node_id})))
    view.apply(_registration())
    assert view.apply(_revocation(NODE, T0 + 200, authority=OTHER)) == "untrusted_authority"
    assert view.check_record(NODE.node_id, T0 + 300) is None
    assert view.apply(_revocation(NODE, T0 + 200)) is None
    assert view.check_record(NODE.node_id, T0 + 199) is None
    assert view.check_record(NODE.node_id, T0 + 200) == "revoked_node"
    assert view.active_nodes("demo-mlp", T0 + 300) == []


def test_revocation_seen_before_the_registration_still_applies() -> None:
    view = RegistryView(RegistryPolicy(authorities=frozenset({AUTHORITY.node_id})))
    view.apply(_revocation(NODE, T0))
    view.apply(_registration(heartbeat_ms=T0 + 10))
    assert view.check_record(NODE.node_id, T0 + 20) == "revoked_node"


def test_deny_list() -> None:
    view = RegistryView(RegistryPolicy(revoked_nodes=frozenset({NODE.node_id})))
    view.apply(_registration())
    assert view.check_record(NODE.node_id, T0) == "revoked_node"


def test_attestation_required() -> None:
    seen: list[str] = []

    def check(reg: NodeRegistration) -> bool:
        seen.append(reg.node_id)
        return reg.node_id == NODE.node_id

    view = RegistryView(RegistryPolicy(require_attestation=True, attestation_check=check))
    view.apply(_registration(NODE))
    view.apply(_registration(OTHER))
    # Nodes without evidence are never attested, whatever the check says.
    assert seen == []
    assert view.check_record(NODE.node_id, T0) == "unattested_node"
    # TEE-mode records always need an attested node, even when the policy does not.
    lax = RegistryView()
    lax.apply(_registration(NODE))
    assert lax.check_record(NODE.node_id, T0) is None
    assert lax.check_record(NODE.node_id, T0, VerificationMode.TEE) == "unattested_node"
