"""A view of the node registry (``<ns>.registry``) that only admitted nodes count in (pure).

Feed it registry messages with the time *you* received them (``apply``) and admission facts
(``admissions``, replaced whenever the authority's snapshot changes); ask who may serve a model
(``active_nodes``: whom a client seals to) or whether a record is acceptable (``check``).
``infra.kafka.reader.TopicReader`` keeps a view current from the topic. No clock of its own:
every question takes the verifier's time.

What a signer chooses never decides anything here. Rules for a record of node N, judged at
the verifier's receipt time R (``check``), in order:

- ``unknown_node``: N never published a valid registration;
- admission (``schemas.verify.admission``): ``not_admitted``, ``revoked_node``,
  ``revoked_measurement``, ``chain_address_mismatch``;
- ``stale_node``: R is later than N's last heartbeat plus ``stale_after_intervals`` heartbeat
  intervals, where a heartbeat counts at the time the verifier received it or the time it
  claims, whichever is earlier (a far-future heartbeat buys nothing);
- ``unattested_node``: attestation is required (by policy, or because the record claims mode
  TEE) and N's evidence does not verify now (its age is checked at every use, not once);
- ``unregistered_model``: N does not register the record's model with the record's model
  digest; ``unregistered_mode``: not in that mode.

A registration replaces the one held only when its ``sequence`` is higher: a replayed older
one is ignored (``out_of_order``), and a tombstone or garbage changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.base import VerificationMode
from schemas.codec import Decoded, decode
from schemas.registry import NodeRegistration, RegistrationRecord, verify_registration
from schemas.verify.admission import Admissions, AttestationCheck, Verdict, admission_problem

__all__ = ["RegistryPolicy", "RegistryView"]


@dataclass(frozen=True)
class RegistryPolicy:
    stale_after_intervals: float = 3.0
    """A node is stale this many heartbeat intervals after its last heartbeat."""
    require_attestation: bool = False
    attestation_check: AttestationCheck | None = None
    """Without one, no node counts as attested (and TEE records are rejected)."""
    revoked_nodes: frozenset[str] = frozenset()
    """An operator deny-list on top of the authority's decisions."""


@dataclass
class _Node:
    registration: NodeRegistration
    received_unix_ms: int


@dataclass
class RegistryView:
    policy: RegistryPolicy = field(default_factory=RegistryPolicy)
    admissions: Admissions = field(default_factory=Admissions)
    """The authority's facts; the default admits nobody (``Admissions.everyone()`` for a closed
    development network)."""
    _nodes: dict[str, _Node] = field(default_factory=dict)
    version: int = 0
    """Bumped on every accepted change, so a waiter can tell the view moved."""

    def apply(self, raw: bytes | None, received_unix_ms: int) -> str | None:
        """Apply one registry message received at ``received_unix_ms`` (the verifier's clock);
        returns why it was ignored, or None."""
        if raw is None:
            return "tombstone"
        decoded = decode(raw, RegistrationRecord)
        if not isinstance(decoded, Decoded):
            return "not_decodable"
        record = decoded.message
        if not verify_registration(record):
            return "bad_signature"
        reg = record.registration
        known = self._nodes.get(reg.node_id)
        if known is not None and reg.sequence <= known.registration.sequence:
            return "out_of_order"
        self._nodes[reg.node_id] = _Node(reg, received_unix_ms)
        self.version += 1
        return None

    def registration(self, node_id: str) -> NodeRegistration | None:
        node = self._nodes.get(node_id)
        return None if node is None else node.registration

    def node_problem(
        self,
        node_id: str,
        at_unix_ms: int,
        *,
        mode: VerificationMode = VerificationMode.VANILLA,
        require_attestation: bool = False,
    ) -> str | None:
        """Why node ``node_id`` may not act at ``at_unix_ms`` (the verifier's clock), or None."""
        node = self._nodes.get(node_id)
        if node is None:
            return "unknown_node"
        if node_id in self.policy.revoked_nodes:
            return "revoked_node"
        reg = node.registration
        verdict = self._verdict(reg, at_unix_ms)
        attested = (
            (verdict.kind, verdict.measurement)
            if verdict.ok and verdict.kind and verdict.measurement
            else None
        )
        problem = admission_problem(self.admissions, node_id, reg.chain_address, attested)
        if problem is not None:
            return problem
        beat = min(reg.heartbeat_unix_ms, node.received_unix_ms)
        stale_after_ms = reg.heartbeat_interval_s * self.policy.stale_after_intervals * 1000
        if at_unix_ms > beat + stale_after_ms:
            return "stale_node"
        needs = require_attestation or self.policy.require_attestation
        if (needs or mode is VerificationMode.TEE) and not verdict.ok:
            return "unattested_node"
        return None

    def check(
        self,
        node_id: str,
        model_id: str,
        model_digest: str,
        mode: VerificationMode,
        received_unix_ms: int,
    ) -> str | None:
        """Why a record of ``node_id`` for ``model_id``/``model_digest`` in ``mode``, received
        at ``received_unix_ms``, must be rejected, or None (module docstring: the rules)."""
        problem = self.node_problem(node_id, received_unix_ms, mode=mode)
        if problem is not None:
            return problem
        reg = self._nodes[node_id].registration
        model = next((m for m in reg.models if m.name == model_id), None)
        if model is None or model.digest != model_digest:
            return "unregistered_model"
        if mode not in model.modes:
            return "unregistered_mode"
        return None

    def chain_address(self, node_id: str) -> str | None:
        """The chain address node ``node_id`` registered (its results' chain signatures must
        recover to it; admission checks it is the one the authority admitted)."""
        node = self._nodes.get(node_id)
        return None if node is None else node.registration.chain_address

    def active_nodes(
        self, model: str, now_unix_ms: int, *, require_attestation: bool = False
    ) -> list[NodeRegistration]:
        """Nodes that serve ``model`` now: registered ``active``, admitted, fresh, and attested
        when asked (sealing to a node trusts it with the prompt)."""
        active = []
        for node_id, node in self._nodes.items():
            reg = node.registration
            if reg.status != "active" or all(m.name != model for m in reg.models):
                continue
            if (
                self.node_problem(node_id, now_unix_ms, require_attestation=require_attestation)
                is None
            ):
                active.append(reg)
        return sorted(active, key=lambda r: r.node_id)

    def _verdict(self, reg: NodeRegistration, at_unix_ms: int) -> Verdict:
        check = self.policy.attestation_check
        if reg.attestation is None or check is None:
            return Verdict(False)
        return check(reg, at_unix_ms)
