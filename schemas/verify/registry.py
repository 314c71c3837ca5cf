"""A live view of the node registry (``<ns>.registry``), for clients and settlement.

``RegistryView`` is pure: feed it registry messages (``apply``) and ask who may serve a model
(``active_nodes``) or whether a record a node signed at a given time is acceptable
(``check_record``). ``infra.kafka.reader.TopicReader`` keeps a view current from the topic.

Rules, in order, for a record signed by node N at time T (``check_record``):

- ``unknown_node``: N never published a valid registration.
- ``revoked_node``: N is on the configured deny-list, or a trusted authority revoked N at or
  before T.
- ``stale_node``: T is later than N's last heartbeat plus ``stale_after`` (default three
  heartbeat intervals). A node that stops heart-beating therefore drops out, and records it
  signs afterwards are rejected; records it signed while alive stay valid even when settlement
  reads them late.
- ``unattested_node``: attestation is required (by policy, or because the record claims mode
  TEE) and N's evidence does not verify under the policy's attestation check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas.base import VerificationMode
from schemas.codec import Decoded, decode
from schemas.registry import (
    NodeRegistration,
    RegistrationRecord,
    RevocationRecord,
    verify_registration,
    verify_revocation,
)

__all__ = ["RegistryPolicy", "RegistryView"]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class RegistryPolicy:
    stale_after_intervals: float = 3.0
    """A node is stale this many heartbeat intervals after its last heartbeat."""
    require_attestation: bool = False
    attestation_check: Callable[[NodeRegistration], bool] | None = None
    """Verifies a registration's evidence and its binding to the node's keys (see
    ``schemas.verify.attestation``); without one, no node counts as attested."""
    authorities: frozenset[str] = frozenset()
    """ed25519 keys (hex) whose revocations are honoured."""
    revoked_nodes: frozenset[str] = frozenset()
    """An operator deny-list: every record of these nodes is rejected."""


@dataclass
class _Node:
    registration: NodeRegistration
    attested: bool
    revoked_unix_ms: int | None = None


@dataclass
class RegistryView:
    policy: RegistryPolicy = field(default_factory=RegistryPolicy)
    _nodes: dict[str, _Node] = field(default_factory=dict)
    _revocations: dict[str, int] = field(default_factory=dict)
    version: int = 0
    """Bumped on every accepted change, so a waiter can tell the view moved."""

    def apply(self, raw: bytes | None) -> str | None:
        """Apply one registry message; returns why it was ignored, or None."""
        if raw is None:
            return "tombstone"
        kind = decode(raw, RegistrationRecord)
        if isinstance(kind, Decoded):
            return self._register(kind.message)
        revocation = decode(raw, RevocationRecord)
        if isinstance(revocation, Decoded):
            return self._revoke(revocation.message)
        return "not_decodable"

    def _register(self, record: RegistrationRecord) -> str | None:
        if not verify_registration(record):
            return "bad_signature"
        reg = record.registration
        known = self._nodes.get(reg.node_id)
        if known is not None and known.registration.heartbeat_unix_ms > reg.heartbeat_unix_ms:
            return "out_of_order"
        if known is not None and known.registration.attestation == reg.attestation:
            attested = known.attested
        else:
            check = self.policy.attestation_check
            attested = reg.attestation is not None and check is not None and check(reg)
        self._nodes[reg.node_id] = _Node(reg, attested, self._revocations.get(reg.node_id))
        self.version += 1
        return None

    def _revoke(self, record: RevocationRecord) -> str | None:
        rev = record.revocation
        if rev.authority_id not in self.policy.authorities:
            return "untrusted_authority"
        if not verify_revocation(record):
            return "bad_signature"
        at = min(rev.revoked_unix_ms, self._revocations.get(rev.node_id, rev.revoked_unix_ms))
        self._revocations[rev.node_id] = at
        if rev.node_id in self._nodes:
            self._nodes[rev.node_id].revoked_unix_ms = at
        self.version += 1
        return None

    def registration(self, node_id: str) -> NodeRegistration | None:
        node = self._nodes.get(node_id)
        return None if node is None else node.registration

    def check_record(
        self, node_id: str, signed_unix_ms: int, mode: VerificationMode = VerificationMode.VANILLA
    ) -> str | None:
        """Why a record node ``node_id`` signed at ``signed_unix_ms`` must be rejected, or
        None when it is acceptable (see the module docstring for the rules)."""
        node = self._nodes.get(node_id)
        if node is None:
            return "unknown_node"
        if node_id in self.policy.revoked_nodes or (
            node.revoked_unix_ms is not None and signed_unix_ms >= node.revoked_unix_ms
        ):
            return "revoked_node"
        reg = node.registration
        stale_after_ms = reg.heartbeat_interval_s * self.policy.stale_after_intervals * 1000
        if signed_unix_ms > reg.heartbeat_unix_ms + stale_after_ms:
            return "stale_node"
        needs_attestation = self.policy.require_attestation or mode is VerificationMode.TEE
        if needs_attestation and not node.attested:
            return "unattested_node"
        return None

    def active_nodes(self, model: str, now_ms: int | None = None) -> list[NodeRegistration]:
        """Nodes that serve ``model`` now: registered active, fresh, not revoked, and attested
        when the policy requires it."""
        now = _now_ms() if now_ms is None else now_ms
        active = []
        for node_id, node in self._nodes.items():
            reg = node.registration
            if reg.status != "active" or all(m.name != model for m in reg.models):
                continue
            if self.check_record(node_id, now) is None:
                active.append(reg)
        return sorted(active, key=lambda r: r.node_id)
