"""``inference-node verify``: check a result with nothing but the published protocol.

Given a reply (and optionally the request sent, the node's registration and an attestation
policy) it checks, each as a separate named check in a JSON report:

- the envelope's ed25519 signature, that it commits to the delivered output (output hash) and,
  with the request, to that request (input hash, model, mode) — ``client.verify``;
- with ``--registration``: the registration's signature (when it is a signed record), that it
  names the node that signed the result and the model digest the result claims, that its
  attestation binds the node's three keys (``schemas.attestation``) and that the evidence is
  genuine and acceptable under the policy (``client.attestation``);
- a ``TEE`` result without a registration fails: its claim cannot be checked;
- with ``--inclusion``: the inclusion proof against the chain (the only step that is online).

Exit 0 only when every check holds. A registration is read as either a signed
``RegistrationRecord`` (``{"type": "node_registration", "registration": {...},
"signature": ...}``) or a bare JSON object with ``node_id``, ``x25519_public_key``,
``chain_address`` and ``attestation``; a bare one is not signed, which is fine: the attestation
binding is what ties the keys to the hardware, and the result's signature ties it to the key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from client.attestation import AttestationPolicy, AttestationPolicySettings, verify_attestation
from client.verify import Check, verify_result
from schemas.attestation import Attestation, binding_report_data
from schemas.base import VerificationMode
from schemas.requests import InferenceRequest
from schemas.results import InferenceResult

__all__ = [
    "add_arguments",
    "load_policy",
    "registration_checks",
    "run_verify",
    "verify_offline",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``verify`` gains beside its reply, --request, --inclusion and --rpc-url."""
    parser.add_argument(
        "--registration",
        type=Path,
        help="the node's registration (signed record or bare JSON) to check its attestation",
    )
    parser.add_argument(
        "--attestation-policy",
        type=Path,
        help="JSON policy: allowed_measurements {kind: [hex]}, allow_dev, max_age_s, ...",
    )
    parser.add_argument(
        "--allow-measurement",
        action="append",
        default=[],
        metavar="KIND=HEX",
        help="accept this measurement (repeatable); kinds: tdx, sev-snp, nitro, dev",
    )
    parser.add_argument(
        "--allow-dev", action="store_true", help="accept development attestations (no TEE)"
    )
    parser.add_argument(
        "--at-unix-ms",
        type=int,
        help="check certificates, collateral and evidence age as of this time (default: now)",
    )


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


def _policy(args: argparse.Namespace) -> AttestationPolicy:
    data: dict[str, Any] = {}
    if args.attestation_policy is not None:
        data = json.loads(args.attestation_policy.read_text())
        if not isinstance(data, dict):
            raise ValueError("the policy file must hold a JSON object")
    allowed: dict[str, list[str]] = {
        k: list(v) for k, v in dict(data.get("allowed_measurements", {})).items()
    }
    for item in args.allow_measurement:
        kind, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError("--allow-measurement takes KIND=HEX")
        allowed.setdefault(kind, []).append(value)
    if allowed:
        data["allowed_measurements"] = allowed
    if args.allow_dev:
        data["allow_dev"] = True
    if args.at_unix_ms is not None:
        data["now_unix_ms"] = args.at_unix_ms
    return load_policy(data)


def _check(name: str, ok: bool, detail: str = "") -> Check:
    return Check(name, ok, detail)


def _registration(data: Any) -> tuple[Any, list[Check]]:
    """(registration object with node_id/keys/attestation/models, checks on its form)."""
    if not isinstance(data, dict):
        return None, [_check("registration", False, "not a JSON object")]
    if "registration" in data and "signature" in data:
        from schemas.registry import RegistrationRecord, verify_registration

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
        bare = argparse.Namespace(
            node_id=str(data["node_id"]),
            x25519_public_key=str(data["x25519_public_key"]),
            chain_address=str(data["chain_address"]),
            attestation=None if attestation is None else Attestation.model_validate(attestation),
            models=None,
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
) -> dict[str, Any]:
    """The JSON report: ``{"request_id", "verified", "checks": [{name, ok, detail}]}``."""
    report = verify_result(result, request)
    checks = list(report.checks)
    if registration is not None:
        checks += registration_checks(result, registration, policy or AttestationPolicy())
    elif result.envelope.mode is VerificationMode.TEE:
        checks.append(_check("attestation", False, "TEE result: give --registration to check"))
    ok = bool(checks) and all(c.ok for c in checks)
    return {
        "request_id": report.request_id,
        "verified": ok,
        "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
    }


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"inference-node: {message}\n")
    return code


def run_verify(args: argparse.Namespace) -> int:
    """``cmd_verify``: 0 verified, 1 a check failed or an input is unreadable, 2 bad usage."""
    try:
        result = (
            InferenceResult.model_validate_json(args.reply.read_bytes()) if args.reply else None
        )
        request = (
            InferenceRequest.model_validate_json(args.request.read_bytes())
            if args.request
            else None
        )
        proof = json.loads(args.inclusion.read_text()) if args.inclusion else None
        registration = (
            json.loads(args.registration.read_text())
            if getattr(args, "registration", None)
            else None
        )
        policy = _policy(args) if hasattr(args, "allow_dev") else AttestationPolicy()
    except (OSError, ValueError, TypeError) as e:
        return _fail(f"cannot read input: {type(e).__name__}", 1)
    if result is None and proof is None:
        return _fail("give a reply file, --inclusion FILE, or both", 2)
    if result is None and registration is not None:
        return _fail("--registration needs the reply it vouches for", 2)
    report: dict[str, Any] = {"checks": []}
    if result is not None:
        report = verify_offline(result, request=request, registration=registration, policy=policy)
    if proof is not None:
        from nodecli.inclusion import check_proof

        report["checks"] += asyncio.run(check_proof(proof, args.rpc_url, result))
        report["request_id"] = report.get("request_id") or proof.get("request_id")
    ok = bool(report["checks"]) and all(c["ok"] for c in report["checks"])
    report["verified"] = ok
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    sys.stdout.write("verified\n" if ok else "NOT VERIFIED\n")
    sys.stdout.flush()
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m nodecli.verify_offline``), same options as ``verify``."""
    parser = argparse.ArgumentParser(prog="inference-node verify", description=__doc__)
    parser.add_argument("reply", type=Path, nargs="?")
    parser.add_argument("--request", type=Path)
    parser.add_argument("--inclusion", type=Path)
    parser.add_argument("--rpc-url", default="http://127.0.0.1:8545")
    add_arguments(parser)
    return run_verify(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
