"""Offline verification of a result with nothing but the published protocol (pure, no I/O).

Given a reply (and optionally the request sent, the node's registration and an attestation
policy) ``verify_offline`` checks, each as a separate named check in a report:

- the envelope's ed25519 signature, that it commits to the delivered output (output hash) and,
  with the request, to that request (input hash, model, mode): ``schemas.verify.result``;
- with a registration: its signature (when it is a signed record), that it names the node that
  signed the result and the model digest the result claims, that its attestation binds the
  node's three keys (``schemas.attestation``) and that the evidence is genuine and acceptable
  under the policy (``schemas.verify.attestation``);
- a ``TEE`` result without a registration fails: its claim cannot be checked.

A registration is read as either a signed ``RegistrationRecord`` (``{"type":
"node_registration", "registration": {...}, "signature": ...}``) or a bare JSON object with
``node_id``, ``x25519_public_key``, ``chain_address`` and ``attestation``; a bare one is not
signed, which is fine: the attestation binding is what ties the keys to the hardware, and the
result's signature ties it to the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas.attestation import Attestation, binding_report_data
from schemas.base import VerificationMode
from schemas.registry import RegisteredModel, RegistrationRecord, verify_registration
from schemas.requests import InferenceRequest
from schemas.results import InferenceResult
from schemas.verify.admission import Admissions
from schemas.verify.attestation import (
    AttestationPolicy,
    AttestationPolicySettings,
    registration_verdict,
    verify_attestation,
)
from schemas.verify.registry import RegistryPolicy, RegistryView
from schemas.verify.result import Check, Trust, verify_result

__all__ = ["load_policy", "registration_checks", "verify_offline"]


@dataclass(frozen=True)
class _Bare:
    """A bare (unsigned) registration: the keys and the evidence only."""

    node_id: str
    x25519_public_key: str
    chain_address: str
    attestation: Attestation | None
    models: list[RegisteredModel] | None = None


def load_policy(data: Mapping[str, Any]) -> AttestationPolicy:
    """An ``AttestationPolicy`` from JSON data (``AttestationPolicySettings`` fields; unknown
    keys are an error). Raises ``ValueError``."""
    try:
        return AttestationPolicySettings.model_validate(data).policy()
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            for err in e.errors(include_input=False, include_url=False)
        )
        raise ValueError(f"invalid attestation policy: {problems}") from None


def _check(name: str, ok: bool, detail: str = "") -> Check:
    return Check(name, ok, detail)


def _registration(data: Any) -> tuple[Any, list[Check]]:
    """(registration object with node_id/keys/attestation/models, checks on its form)."""
    if not isinstance(data, dict):
        return None, [_check("registration", False, "not a JSON object")]
    if "registration" in data and "signature" in data:
        try:
            record = RegistrationRecord.model_validate(data)
        except ValidationError as e:
            return None, [_check("registration", False, f"invalid record ({e.error_count()})")]
        signed = verify_registration(record)
        return record.registration, [
            _check("registration_signature", signed, "ed25519 by node_id over the registration")
        ]
    try:
        attestation = data.get("attestation")
        bare = _Bare(
            node_id=str(data["node_id"]),
            x25519_public_key=str(data["x25519_public_key"]),
            chain_address=str(data["chain_address"]),
            attestation=None if attestation is None else Attestation.model_validate(attestation),
        )
    except (KeyError, ValidationError) as e:
        return None, [_check("registration", False, f"missing or invalid field ({e!s:.80})")]
    return bare, []


def registration_checks(
    result: InferenceResult, registration_data: Any, policy: AttestationPolicy
) -> list[Check]:
    """The registration and attestation checks for ``result`` (see the module docstring)."""
    env = result.envelope
    reg, checks = _registration(registration_data)
    if reg is None:
        return checks
    checks.append(_check("registration_node", reg.node_id == env.node_id, "names the signer"))
    if reg.models is not None:
        digests = {m.name: m.digest for m in reg.models}
        checks.append(
            _check(
                "registration_model",
                digests.get(env.model_id) == env.model_digest,
                "registered digest of the model equals the envelope's model_digest",
            )
        )
    attestation: Attestation | None = reg.attestation
    if attestation is None:
        if env.mode is VerificationMode.TEE:
            checks.append(_check("attestation", False, "TEE result, registration has none"))
        return checks
    try:
        binding = binding_report_data(
            node_id=reg.node_id,
            x25519_public_key=reg.x25519_public_key,
            chain_address=reg.chain_address,
        )
    except ValueError as e:
        return [*checks, _check("attestation_binding", False, str(e))]
    checks.append(
        _check(
            "attestation_binding",
            attestation.report_data == binding.hex(),
            "report_data = SHA-512(binding domain, JCS of the node's three public keys)",
        )
    )
    verdict = verify_attestation(attestation, expected_report_data=binding, policy=policy)
    detail = json.dumps(
        {"kind": verdict.kind, "measurement": verdict.measurement, "reasons": verdict.reasons},
        sort_keys=True,
    )
    checks.append(_check("attestation", verdict.ok, detail))
    return checks


def verify_offline(
    result: InferenceResult,
    *,
    request: InferenceRequest | None = None,
    registration: Any = None,
    policy: AttestationPolicy | None = None,
    admissions: Admissions | None = None,
    at_unix_ms: int = 0,
) -> dict[str, Any]:
    """The JSON report: ``{"request_id", "verified", "checks": [{name, ok, detail}]}``.

    ``admissions`` are the authority's facts (without them the ``admitted`` check fails: a
    signature alone proves nothing). A signed registration record, when given, also lets a
    node admitted by its TEE measurement count, and a TEE result be checked."""
    policy = policy or AttestationPolicy()
    trust = None
    if admissions is not None:
        view = None
        if isinstance(registration, dict) and "signature" in registration:
            view = RegistryView(
                RegistryPolicy(
                    attestation_check=registration_verdict(
                        policy, approved=admissions.measurement_approved
                    )
                ),
                admissions,
            )
            view.apply(json.dumps(registration).encode(), at_unix_ms)
        trust = Trust(admissions, at_unix_ms, view)
    report = verify_result(result, request, trust=trust)
    checks = list(report.checks)
    if registration is not None:
        extra = registration_checks(result, registration, policy)
        if trust is not None and result.envelope.mode is VerificationMode.TEE:
            # The registration's evidence is judged by the checks below (a bare document has
            # no signature for the registry view): ``admitted`` is about admission alone.
            problem, _ = trust.signer_problem(result.envelope.node_id, VerificationMode.VANILLA)
            detail = trust.admissions.source + (f": {problem}" if problem else "")
            checks = [
                _check("admitted", problem is None, detail) if c.name == "admitted" else c
                for c in checks
            ]
        checks += extra
    elif result.envelope.mode is VerificationMode.TEE:
        checks.append(_check("attestation", False, "TEE result: give --registration to check"))
    ok = bool(checks) and all(c.ok for c in checks)
    return {
        "request_id": report.request_id,
        "verified": ok,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
    }
