"""Settlement record verification: pure, no I/O, the verifier's receipt time passed in.
Returns ``Verified`` or ``Rejected`` (with a reason that is safe to store and count), never
raises for bad input.

Two steps, so a service can wait for registrations still in flight between them:
``verify_record`` decodes and checks what needs no registry (both signatures' form, the
node's ed25519 signature, times against the receipt time, usage within the granted budget,
the payer's signature); ``gate_record`` applies the node gate (admission, freshness, the
registered model, digest and mode, the chain signature against the node's chain address).

Time is the verifier's: ``received_unix_ms`` is when settlement read the record. A record
signed later than receipt plus ``max_clock_skew_s`` is ``future_timestamp``; one signed, or
whose request was created, longer than ``max_record_age_s`` before receipt is ``too_old``
(a stolen or revoked key cannot back-date records into an old window, and an old request
cannot be billed again years later).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from schemas import limits
from schemas.base import VerificationMode
from schemas.codec import Decoded, decode
from schemas.settlement import SettlementRecord
from schemas.signing import envelope_digest, recover_chain_address, verify_digest
from schemas.verify.payer import envelope_grant, verify_payer

__all__ = ["NodeGate", "RecordRules", "Rejected", "Verified", "gate_record", "verify_record"]

MAX_INPUT_TOKENS = 4 * (limits.MAX_PROMPT_CHARS + limits.MAX_TOOL_SCHEMA_CHARS)
"""The most input tokens any valid request can take (a byte-level tokenizer: at most one token
per byte of UTF-8, at most four bytes per character)."""


class NodeGate(Protocol):
    """Whether the node that signed a record may settle it (``schemas.verify.registry``)."""

    def check(
        self,
        node_id: str,
        model_id: str,
        model_digest: str,
        mode: VerificationMode,
        received_unix_ms: int,
    ) -> str | None: ...

    def chain_address(self, node_id: str) -> str | None: ...


@dataclass(frozen=True)
class RecordRules:
    max_clock_skew_s: float = 300.0
    max_record_age_s: float = 7 * 24 * 3600.0
    require_payer: bool = False
    """Refuse records of requests that name no payer (``no_payer``); else book them unbilled."""


@dataclass(frozen=True, slots=True)
class Verified:
    record: SettlementRecord
    digest: bytes
    """``envelope_digest`` of the record (what the node signed; its Merkle leaf commits to it)."""


@dataclass(frozen=True)
class Rejected:
    reason: str
    """Short machine-readable cause: not_decodable, bad_signature, future_timestamp, too_old,
    over_budget, bad_payer, no_payer, bad_chain_signature, and the node gate's unknown_node,
    not_admitted, revoked_node, revoked_measurement, chain_address_mismatch, stale_node,
    unregistered_model, unregistered_mode, unattested_node."""
    detail: str = ""
    request_id: str | None = None
    node_id: str | None = None


def verify_record(
    raw: bytes | None,
    *,
    received_unix_ms: int,
    rules: RecordRules,
    nodes: NodeGate | None = None,
) -> Verified | Rejected:
    decoded = decode(raw, SettlementRecord)
    if not isinstance(decoded, Decoded):
        return Rejected("not_decodable", decoded.reason, decoded.request_id)
    record = decoded.message
    env = record.envelope

    def reject(reason: str) -> Rejected:
        return Rejected(reason, "", env.request_id, env.node_id)

    digest = envelope_digest(env)
    if not verify_digest(env.node_id, digest, record.signature):
        return reject("bad_signature")
    if env.signed_unix_ms > received_unix_ms + rules.max_clock_skew_s * 1000:
        return reject("future_timestamp")
    oldest = received_unix_ms - rules.max_record_age_s * 1000
    if env.signed_unix_ms < oldest or env.request_created_unix_ms < oldest:
        return reject("too_old")
    if env.request_created_unix_ms > env.signed_unix_ms + rules.max_clock_skew_s * 1000:
        return reject("future_timestamp")
    budget = env.max_output_tokens if env.max_output_tokens is not None else 0
    if env.usage.output_tokens > budget or env.usage.input_tokens > MAX_INPUT_TOKENS:
        return reject("over_budget")
    if env.payer is None:
        if rules.require_payer:
            return reject("no_payer")
    elif not verify_payer(env.payer, envelope_grant(env)):
        return reject("bad_payer")
    verified = Verified(record, digest)
    if nodes is not None:
        rejected = gate_record(verified, nodes, received_unix_ms)
        if rejected is not None:
            return rejected
    return verified


def gate_record(verified: Verified, nodes: NodeGate, received_unix_ms: int) -> Rejected | None:
    """The node gate's rejection of a verified record, or None when its node may settle it."""
    env = verified.record.envelope
    reason = nodes.check(env.node_id, env.model_id, env.model_digest, env.mode, received_unix_ms)
    if reason is None:
        address = nodes.chain_address(env.node_id)
        recovered = recover_chain_address(verified.digest, verified.record.chain_signature)
        if address is None or recovered != address:
            reason = "bad_chain_signature"
    if reason is None:
        return None
    return Rejected(reason, "", env.request_id, env.node_id)
