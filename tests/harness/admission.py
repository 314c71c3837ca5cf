"""A pinned admission authority for tests: signed admission lists on disk, and the settings
every service and client needs to read them (``infra.admission.AuthorityAdmissions``).

Tests admit the nodes they run and nothing else, so a node a test did not admit (an attacker's
self-registered one) is judged exactly as in production.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from infra.admission import AdmissionSettings
from schemas.admission import (
    AdmissionList,
    AdmittedNode,
    ApprovedMeasurement,
    SignedAdmissionList,
    sign_admission_list,
)
from schemas.signing import Signer
from schemas.verify.admission import Admissions, NodeAdmission
from schemas.verify.result import Trust

__all__ = ["AUTHORITY", "AdmissionFile", "trust_in", "trust_workers"]

AUTHORITY = Signer(b"\x0a" * 32)
"""The pinned authority of every test deployment."""

_sequences = itertools.count(1)


class AdmissionFile:
    """One deployment's signed admission list; ``admit``/``revoke`` publish a newer one."""

    def __init__(self, path: Path, authority: Signer = AUTHORITY) -> None:
        """A deployment's list at ``path``: the one there (admitting what it admits), or a
        new, empty one."""
        self.path = path
        self.authority = authority
        self.nodes: dict[str, str] = {}
        self.measurements: set[tuple[str, str]] = set()
        if path.exists():
            signed = SignedAdmissionList.model_validate_json(path.read_bytes())
            self.nodes = {n.node_id: n.chain_address for n in signed.list.nodes}
            self.measurements = {(m.kind, m.measurement) for m in signed.list.measurements}
        self.write()

    def settings(
        self, refresh_interval_s: float = 0.3, max_stale_s: float = 60.0
    ) -> AdmissionSettings:
        return AdmissionSettings(
            source="authority",
            authority_list=self.path,
            authority_keys=[self.authority.node_id],
            refresh_interval_s=refresh_interval_s,
            max_stale_s=max_stale_s,
        )

    def admit(self, node_id: str, chain_address: str) -> None:
        self.nodes[node_id] = chain_address.lower()
        self.write()

    def revoke(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self.write()

    def approve(self, kind: str, measurement: str) -> None:
        self.measurements.add((kind, measurement))
        self.write()

    def signed_list(self, sequence: int | None = None) -> bytes:
        """The list as it stands, signed, with a fresh (or the given) sequence."""
        admission_list = AdmissionList(
            authority_id=self.authority.node_id,
            sequence=next(_sequences) if sequence is None else sequence,
            issued_unix_ms=time.time_ns() // 1_000_000,
            nodes=[AdmittedNode(node_id=n, chain_address=a) for n, a in sorted(self.nodes.items())],
            measurements=[
                ApprovedMeasurement(kind=k, measurement=m)  # type: ignore[arg-type]
                for k, m in sorted(self.measurements)
            ],
        )
        return sign_admission_list(self.authority, admission_list).model_dump_json().encode()

    def write(self, raw: bytes | None = None) -> None:
        """Replace the file atomically (readers never see half a list)."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(self.signed_list() if raw is None else raw)
        tmp.replace(self.path)

    def env(self, prefix: str) -> dict[str, str]:
        """The settings as environment variables of a service or client (``OG_CLIENT_``...)."""
        return {
            f"{prefix}ADMISSION__SOURCE": "authority",
            f"{prefix}ADMISSION__AUTHORITY_LIST": str(self.path),
            f"{prefix}ADMISSION__AUTHORITY_KEYS": json.dumps([self.authority.node_id]),
            f"{prefix}ADMISSION__REFRESH_INTERVAL_S": "0.3",
        }

    def verify_args(self) -> list[str]:
        """``inference-node verify`` options that trust this authority."""
        return [
            "--admission",
            "authority",
            "--authority-key",
            self.authority.node_id,
            "--admission-list",
            str(self.path),
        ]

    def admit_worker(self, settings: Any) -> None:
        """Admit the node a ``WorkerSettings`` runs as (its key files are created now)."""
        from worker.identity import chain_address, node_signer

        self.admit(node_signer(settings).node_id, chain_address(settings))

    def admit_all(self, nodes: Iterable[tuple[str, str]]) -> None:
        for node_id, address in nodes:
            self.nodes[node_id] = address.lower()
        self.write()


def trust_in(nodes: Iterable[tuple[str, str]], at_unix_ms: int | None = None) -> Trust:
    """A verifier's trust that admits exactly ``nodes`` ((node id, chain address) pairs)."""
    at = time.time_ns() // 1_000_000 if at_unix_ms is None else at_unix_ms
    admitted = {n: NodeAdmission(n, a.lower(), True) for n, a in nodes}
    return Trust(Admissions(nodes=admitted, source="test", as_of_unix_ms=at), at)


def trust_workers(*workers: Any) -> Trust:
    """A verifier's trust that admits exactly these running ``worker.app.Worker``s."""
    return trust_in((w.signer.node_id, w.registrar.registration.chain_address) for w in workers)
