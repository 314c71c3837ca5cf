"""Offline verification of a result: pure, no I/O, no trust in the node that sent it.

Each check is reported separately so a caller can show exactly what failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.requests import ChatInput, InferenceRequest, MLInput, input_hash
from schemas.results import InferenceResult, output_hash
from schemas.signing import verify_envelope_signature

__all__ = ["Check", "VerificationReport", "verify_result"]


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

    def as_dict(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "verified": self.ok,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


def verify_result(
    result: InferenceResult,
    request: InferenceRequest | None = None,
    *,
    expected_node_ids: set[str] | None = None,
    plaintext: ChatInput | MLInput | None = None,
) -> VerificationReport:
    """Check the signature, that the envelope commits to the delivered output, and (given the
    request that was sent) that it commits to that request. For a sealed request pass the
    payload as sealed (``SealedRequest.plaintext``): the input hash is over it."""
    env = result.envelope
    checks = [
        Check(
            "signature", verify_envelope_signature(env, result.signature), "ed25519 over envelope"
        ),
        Check("request_id", result.request_id == env.request_id, "reply and envelope agree"),
        Check("output_hash", output_hash(result.output) == env.output_hash, "sha256(JCS(output))"),
    ]
    if request is not None:
        checks += [
            Check("request_match", request.request_id == env.request_id, "envelope names request"),
            Check("model", request.model == env.model_id, "envelope names the requested model"),
            Check("mode", request.mode == env.mode, "envelope names the requested mode"),
            Check(
                "input_hash",
                input_hash(request.payload if plaintext is None else plaintext) == env.input_hash,
                "sha256(JCS(payload))",
            ),
        ]
    if expected_node_ids is not None:
        checks.append(Check("node", env.node_id in expected_node_ids, "signer is an expected node"))
    return VerificationReport(env.request_id, checks)
