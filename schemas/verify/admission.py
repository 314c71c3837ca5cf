"""Admission facts as verifiers hold them, and the one rule that combines them (pure).

``Admissions`` is a snapshot of what the authority says (``schemas.admission``): read from the
node registry contract or from the newest signed admission list by the service that keeps it
current (``infra.admission``). ``admission_problem`` decides whether a node counts:

1. an explicitly admitted node counts when the chain address it registered is the one the
   authority admitted (its results' chain signatures recover to it), unless the measurement
   its verified TEE evidence shows was revoked (revoking a measurement disables every node
   running it);
2. a node not admitted explicitly counts when its TEE evidence verified and shows an approved
   measurement (admission by attestation);
3. a node the authority revoked never counts (``revoked_node``), whatever evidence it shows;
   any other node is ``not_admitted``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.admission import AdmissionList

__all__ = [
    "Admissions",
    "AttestationCheck",
    "NodeAdmission",
    "Verdict",
    "admission_problem",
]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a verifier concluded about a registration's evidence at one time."""

    ok: bool
    kind: str | None = None
    measurement: str | None = None


AttestationCheck = Callable[[Any, int], Verdict]
"""``check(registration, at_unix_ms)``: does its evidence verify, bind the node's keys, show an
allowed measurement and is it fresh at that time? (``schemas.verify.attestation
.registration_verdict``)"""


@dataclass(frozen=True, slots=True)
class NodeAdmission:
    node_id: str
    chain_address: str
    admitted: bool
    """False when the authority revoked it (it was admitted once)."""


@dataclass(frozen=True)
class Admissions:
    """What the admission authority says, as of ``as_of`` (a snapshot; replace, never mutate)."""

    nodes: Mapping[str, NodeAdmission] = field(default_factory=dict)
    approved_measurements: frozenset[tuple[str, str]] = frozenset()
    """(kind, measurement hex) pairs approved now."""
    revoked_measurements: frozenset[tuple[str, str]] = frozenset()
    source: str = "none"
    """``chain:<contract address>``, ``authority:<key>#<sequence>``, or ``open`` (no admission:
    a closed development network that admits every registered node)."""
    open: bool = False
    as_of_unix_ms: int = 0

    @classmethod
    def everyone(cls) -> Admissions:
        """No admission at all: every registered node counts (closed development networks
        only; named ``open`` wherever it is reported)."""
        return cls(source="open", open=True)

    @classmethod
    def from_list(cls, admission_list: AdmissionList, as_of_unix_ms: int) -> Admissions:
        """The facts of a verified admission list (absence from the list = not admitted)."""
        return cls(
            nodes={
                n.node_id: NodeAdmission(n.node_id, n.chain_address, True)
                for n in admission_list.nodes
            },
            approved_measurements=frozenset(
                (m.kind, m.measurement) for m in admission_list.measurements
            ),
            source=f"authority:{admission_list.authority_id}#{admission_list.sequence}",
            as_of_unix_ms=as_of_unix_ms,
        )

    def with_nodes(self, nodes: Iterable[NodeAdmission], as_of_unix_ms: int) -> Admissions:
        merged = dict(self.nodes)
        merged.update({n.node_id: n for n in nodes})
        return Admissions(
            merged,
            self.approved_measurements,
            self.revoked_measurements,
            self.source,
            self.open,
            as_of_unix_ms,
        )

    def measurement_approved(self, kind: str, measurement: str) -> bool:
        key = (kind, measurement)
        return key in self.approved_measurements and key not in self.revoked_measurements


def admission_problem(
    admissions: Admissions,
    node_id: str,
    chain_address: str,
    attested: tuple[str, str] | None,
) -> str | None:
    """Why node ``node_id`` (registered with ``chain_address``, and whose evidence verified
    showing measurement ``attested`` = (kind, hex), if any) does not count, or None."""
    if admissions.open:
        return None
    if attested is not None and attested in admissions.revoked_measurements:
        return "revoked_measurement"
    node = admissions.nodes.get(node_id)
    if node is not None and not node.admitted:
        return "revoked_node"  # revoking a node outranks any evidence it shows
    if node is not None:
        if node.chain_address != chain_address.lower():
            return "chain_address_mismatch"
        return None
    if attested is not None and admissions.measurement_approved(*attested):
        return None
    return "not_admitted"
