"""Node identities for tests: both keys a node signs with, and what it signs (envelopes,
settlement records, registrations) built exactly as ``worker.answers`` and
``worker.registration`` build them.

A ``TestNode`` is just keys: whether anyone trusts it is the admission authority's business
(``tests.harness.admission``), as in production.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from schemas.base import SettlementMode, VerificationMode
from schemas.codec import encode
from schemas.payer import Payer
from schemas.registry import (
    REGISTRATION_DOMAIN,
    NodeRegistration,
    RegisteredModel,
    RegistrationRecord,
    registration_key,
)
from schemas.results import ResultEnvelope, Usage
from schemas.settlement import SettlementRecord
from schemas.signing import ChainSigner, Signer, envelope_digest
from schemas.verify.payer import envelope_grant, sign_grant

__all__ = ["DIGEST", "MODEL", "TestNode", "now_ms"]

MODEL = "demo-mlp"
DIGEST = "ab" * 32
"""The model digest test registrations and envelopes name."""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class TestNode:
    signer: Signer
    chain: ChainSigner

    __test__ = False  # not a pytest class

    @classmethod
    def seeded(cls, n: int) -> TestNode:
        """Node number ``n`` (1-255): the same keys in every test."""
        seed = bytes([n]) * 32
        return cls(Signer(seed), ChainSigner(hashlib.sha256(b"chain:" + seed).digest()))

    @property
    def node_id(self) -> str:
        return self.signer.node_id

    @property
    def chain_address(self) -> str:
        return self.chain.address

    def envelope(self, request_id: str, **overrides: Any) -> ResultEnvelope:
        """A valid envelope of ``request_id`` answered by this node now (``overrides`` replace
        fields; ``payer`` may be a key, which then signs the grant)."""
        payer_key = overrides.pop("payer", None)
        fields: dict[str, Any] = {
            "request_id": request_id,
            "model_id": MODEL,
            "model_digest": DIGEST,
            "mode": VerificationMode.VANILLA,
            "settlement": SettlementMode.BATCH,
            "input_hash": hashlib.sha256(request_id.encode()).hexdigest(),
            "output_hash": hashlib.sha256(request_id.encode() + b"/out").hexdigest(),
            "usage": Usage(input_tokens=1, output_tokens=0),
            "max_output_tokens": None,
            "payer": None,
            "node_id": self.node_id,
        }
        fields.update(overrides)
        at = now_ms()
        fields.setdefault("signed_unix_ms", at)
        fields.setdefault("request_created_unix_ms", min(at, fields["signed_unix_ms"]) - 50)
        envelope = ResultEnvelope.model_validate(fields)
        if isinstance(payer_key, Signer | ChainSigner):
            payer = sign_grant(envelope_grant(envelope), payer_key)
            envelope = envelope.model_copy(update={"payer": payer})
        elif isinstance(payer_key, Payer):
            envelope = envelope.model_copy(update={"payer": payer_key})
        return envelope

    def sign(self, envelope: ResultEnvelope) -> SettlementRecord:
        """``envelope`` signed with both keys, as the node publishes it for settlement."""
        digest = envelope_digest(envelope)
        return SettlementRecord(
            envelope=envelope,
            signature=self.signer.sign_digest(digest),
            chain_signature=self.chain.sign_digest(digest),
        )

    def record(self, request_id: str, **overrides: Any) -> SettlementRecord:
        return self.sign(self.envelope(request_id, **overrides))

    def registration(
        self,
        *,
        models: tuple[str, ...] | Mapping[str, str] = (MODEL,),
        digest: str = DIGEST,
        modes: tuple[VerificationMode, ...] = (VerificationMode.VANILLA,),
        heartbeat_interval_s: float = 3600.0,
        heartbeat_unix_ms: int | None = None,
        sequence: int | None = None,
        **overrides: Any,
    ) -> RegistrationRecord:
        """A valid registration for ``models`` (names, all with ``digest``, or name → digest;
        a long heartbeat interval keeps it fresh for a whole test); ``sequence`` defaults to
        the heartbeat time, as a worker does."""
        digests = dict(models) if isinstance(models, Mapping) else dict.fromkeys(models, digest)
        at = now_ms() if heartbeat_unix_ms is None else heartbeat_unix_ms
        fields: dict[str, Any] = {
            "node_id": self.node_id,
            "x25519_public_key": "00" * 32,
            "chain_address": self.chain_address,
            "models": [
                RegisteredModel(name=m, digest=d, modes=list(modes)) for m, d in digests.items()
            ],
            "software_version": "test",
            "started_unix_ms": at - 60_000,
            "heartbeat_unix_ms": at,
            "heartbeat_interval_s": heartbeat_interval_s,
            "sequence": at if sequence is None else sequence,
        }
        fields.update(overrides)
        registration = NodeRegistration.model_validate(fields)
        return RegistrationRecord(
            registration=registration,
            signature=self.signer.sign(REGISTRATION_DOMAIN, registration),
        )

    def registration_message(self, **kwargs: Any) -> tuple[bytes, bytes]:
        """(key, value) of ``registration(**kwargs)`` as the registry topic carries it."""
        return registration_key(self.node_id), encode(self.registration(**kwargs))
