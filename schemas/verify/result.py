"""Verification of what a node answered: pure, no I/O, no trust in the node that sent it.

``verify_result`` checks a result, ``verify_error`` an error reply, ``verify_chunk`` a stream
chunk. Each check is reported separately so a caller can show exactly what failed. A valid
signature proves only that someone holds a key: who may sign is the ``Trust`` the verifier
brings (admission facts, and the registry view for TEE evidence). Without one, the ``admitted``
check fails, so a result minted with a fresh key pair never verifies by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.base import VerificationMode
from schemas.requests import (
    ChatInput,
    InferenceRequest,
    MLInput,
    input_hash,
    max_output_tokens,
)
from schemas.results import ErrorReply, InferenceResult, StreamChunk, output_hash
from schemas.signing import (
    envelope_digest,
    recover_chain_address,
    verify_chunk_signature,
    verify_digest,
    verify_error_signature,
)
from schemas.verify.admission import Admissions, admission_problem
from schemas.verify.registry import RegistryView

__all__ = [
    "Check",
    "Trust",
    "VerificationReport",
    "verify_chunk",
    "verify_error",
    "verify_result",
]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class VerificationReport:
    request_id: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "verified": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


@dataclass(frozen=True)
class Trust:
    """Who may sign answers, as this verifier knows it at ``at_unix_ms``."""

    admissions: Admissions
    at_unix_ms: int
    registry: RegistryView | None = None
    """Registrations (with their TEE evidence) and the attestation policy; required to accept
    a TEE result, optional otherwise."""

    def signer_problem(self, node_id: str, mode: VerificationMode) -> tuple[str | None, str]:
        """(why ``node_id`` may not sign an answer in ``mode``, or None; its chain address,
        or "" when unknown)."""
        if self.registry is not None and self.registry.registration(node_id) is not None:
            problem = self.registry.node_problem(node_id, self.at_unix_ms, mode=mode)
            reg = self.registry.registration(node_id)
            address = reg.chain_address if reg is not None else ""
            if problem == "stale_node":
                problem = None  # an answer may be checked long after its node went away
            return problem, address
        admitted = self.admissions.nodes.get(node_id)
        address = admitted.chain_address if admitted is not None else ""
        if mode is VerificationMode.TEE:
            return "unattested_node", address  # needs the registration's evidence
        return admission_problem(self.admissions, node_id, address, None), address


def _admission_checks(
    trust: Trust | None, node_id: str, mode: VerificationMode
) -> tuple[list[Check], str]:
    if trust is None:
        return [Check("admitted", False, "no admission facts given (pass a Trust)")], ""
    problem, address = trust.signer_problem(node_id, mode)
    detail = f"{trust.admissions.source}" + (f": {problem}" if problem else "")
    return [Check("admitted", problem is None, detail)], address


def verify_result(
    result: InferenceResult,
    request: InferenceRequest | None = None,
    *,
    trust: Trust | None = None,
    plaintext: ChatInput | MLInput | None = None,
) -> VerificationReport:
    """Check both signatures, that the signer may sign (``trust``), that the envelope commits
    to the delivered output and (given the request that was sent) to that request. For a
    sealed request pass the payload as sealed (``SealedRequest.plaintext``): the input hash
    and the output budget are over it."""
    env = result.envelope
    digest = envelope_digest(env)
    admitted, address = _admission_checks(trust, env.node_id, env.mode)
    recovered = recover_chain_address(digest, result.chain_signature)
    checks = [
        Check(
            "signature",
            verify_digest(env.node_id, digest, result.signature),
            "ed25519 by node_id over the envelope digest",
        ),
        *admitted,
        Check(
            "chain_signature",
            recovered is not None and recovered == address,
            "EIP-191 over the envelope digest recovers the node's admitted chain address",
        ),
        Check("request_id", result.request_id == env.request_id, "reply and envelope agree"),
        Check("output_hash", output_hash(result.output) == env.output_hash, "sha256(JCS(output))"),
    ]
    if request is not None:
        payload = request.payload if plaintext is None else plaintext
        budget = max_output_tokens(payload) if isinstance(payload, ChatInput | MLInput) else None
        checks += [
            Check("request_match", request.request_id == env.request_id, "envelope names request"),
            Check("model", request.model == env.model_id, "envelope names the requested model"),
            Check("mode", request.mode == env.mode, "envelope names the requested mode"),
            Check(
                "request_terms",
                (
                    request.settlement == env.settlement
                    and request.created_unix_ms == env.request_created_unix_ms
                    and request.payer == env.payer
                    and budget == env.max_output_tokens
                ),
                "settlement mode, creation time, payer and output budget as requested",
            ),
            Check("input_hash", input_hash(payload) == env.input_hash, "sha256(JCS(payload))"),
        ]
    return VerificationReport(env.request_id, checks)


def verify_error(
    reply: ErrorReply,
    request: InferenceRequest | None = None,
    *,
    trust: Trust | None = None,
    plaintext: ChatInput | MLInput | None = None,
) -> VerificationReport:
    """Check an error reply: signed by the node it names, that node may answer, and (given
    the request) it answers that request and, when it names one, that payload."""
    admitted, _ = _admission_checks(trust, reply.node_id, VerificationMode.VANILLA)
    checks = [
        Check("signature", verify_error_signature(reply), "ed25519 by node_id over the reply"),
        *admitted,
    ]
    if request is not None:
        payload = request.payload if plaintext is None else plaintext
        checks.append(Check("request_match", reply.request_id == request.request_id))
        checks.append(Check("model", reply.model == request.model, "names the requested model"))
        if reply.input_hash is not None:
            checks.append(Check("input_hash", reply.input_hash == input_hash(payload)))
    return VerificationReport(reply.request_id, checks)


def verify_chunk(
    chunk: StreamChunk,
    request_id: str,
    *,
    trust: Trust | None = None,
    node_id: str | None = None,
) -> VerificationReport:
    """Check a stream chunk: signed by the node it names, which may answer, for this request,
    and (given ``node_id``: the node of the stream's earlier chunks) by that same node: chunks
    of two nodes that both answered the request must not be reassembled into one text."""
    admitted, _ = _admission_checks(trust, chunk.node_id, VerificationMode.VANILLA)
    checks = [
        Check("signature", verify_chunk_signature(chunk), "ed25519 by node_id over the chunk"),
        *admitted,
        Check("request_match", chunk.request_id == request_id),
    ]
    if node_id is not None:
        checks.append(Check("same_node", chunk.node_id == node_id, "the stream's node"))
    return VerificationReport(chunk.request_id, checks)
