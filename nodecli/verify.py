"""``inference-node verify``: check a result offline, and/or its inclusion on chain.

Parses the arguments, calls ``schemas.verify.offline.verify_offline`` (and, with
``--inclusion``, ``settlement.inclusion.check_inclusion``; with ``--published-batch``,
``settlement.inclusion.check_published_inclusion``, which rebuilds the proof from a published
batch: the only steps that are online), prints the JSON report and ``verified`` /
``NOT VERIFIED``. Exit 0 only when every check holds, 1 when one fails or an input is
unreadable, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.admission import AdmissionSettings, admission_source
from infra.dev.stack import local_admission, local_chain
from infra.evm import ChainError
from schemas.batches import PublishedBatch, parse_published_batches
from schemas.requests import InferenceRequest
from schemas.results import InferenceResult
from schemas.verify.admission import Admissions
from schemas.verify.attestation import AttestationPolicy
from schemas.verify.offline import load_policy, verify_offline

__all__ = ["add_arguments", "main", "run_verify"]


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
        "--admission",
        choices=["chain", "authority", "open"],
        default="chain",
        help="who admits nodes: the NodeRegistry contract (--registry-address, --rpc-url; "
        "default: the local stack's), a pinned authority's list (--authority-key, "
        "--admission-list), or open (no admission: closed development networks only)",
    )
    parser.add_argument("--registry-address", help="the NodeRegistry contract (admission=chain)")
    parser.add_argument("--authority-key", action="append", default=[], help="pinned key (hex)")
    parser.add_argument("--admission-list", type=Path, help="the signed admission list")
    parser.add_argument(
        "--state-dir", type=Path, default=Path("var"), help="local stack state (registry address)"
    )
    parser.add_argument(
        "--at-unix-ms",
        type=int,
        help="check certificates, collateral and evidence age as of this time (default: now)",
    )
    parser.add_argument(
        "--published-batch",
        type=Path,
        help="prove the reply's inclusion from published batches: a batch file, a dump of "
        "the <ns>.batches topic (one document per line) or a directory of batch files",
    )
    parser.add_argument(
        "--contract",
        help="the Settlement contract a proof must be anchored on (--inclusion, "
        "--published-batch; default: the local stack's)",
    )
    parser.add_argument("--chain-id", type=int, default=31337, help="for --contract")


def _published(path: Path) -> tuple[list[PublishedBatch], int]:
    """The documents in a file, a topic dump or a directory of ``*.json`` files, and how
    many lines or files were not one."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    batches: list[PublishedBatch] = []
    malformed = 0
    for file in files:
        found, bad = parse_published_batches(file.read_bytes())
        batches += found
        malformed += bad
    return batches, malformed


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


async def _admissions(args: argparse.Namespace) -> Admissions:
    """The admission facts the options name (``ValueError`` when they are incomplete)."""
    settings = AdmissionSettings(
        source=args.admission,
        rpc_url=args.rpc_url,
        registry_address=getattr(args, "registry_address", None),
        authority_keys=list(getattr(args, "authority_key", [])),
        authority_list=getattr(args, "admission_list", None),
    )
    settings = local_admission(settings, getattr(args, "state_dir", Path("var")))
    source = admission_source(settings)
    try:
        return await source.snapshot()
    finally:
        await source.close()


def _contract(args: argparse.Namespace) -> str | None:
    """The Settlement contract: ``--contract``, else the local stack's (``--state-dir``)."""
    from settlement.chain import ChainSettings

    given = ChainSettings(contract_address=args.contract)
    return local_chain(given, getattr(args, "state_dir", Path("var"))).contract_address


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
        published_path = getattr(args, "published_batch", None)
        published = _published(published_path) if published_path is not None else None
    except (OSError, ValueError, TypeError) as e:
        return _fail(f"cannot read input: {type(e).__name__}", 1)
    if result is None and proof is None:
        return _fail("give a reply file, --inclusion FILE, or both", 2)
    if result is None and registration is not None:
        return _fail("--registration needs the reply it vouches for", 2)
    if result is None and published is not None:
        return _fail("--published-batch needs the reply whose inclusion it proves", 2)
    contract = _contract(args) if published is not None else None
    if published is not None and contract is None:
        return _fail("--published-batch needs --contract (the Settlement contract)", 2)
    report: dict[str, Any] = {"checks": []}
    if result is not None:
        try:
            admissions = asyncio.run(_admissions(args))
        except (ChainError, OSError, ValueError) as e:
            sys.stderr.write(f"inference-node: admission facts unavailable ({type(e).__name__})\n")
            admissions = None
        report = verify_offline(
            result,
            request=request,
            registration=registration,
            policy=policy,
            admissions=admissions,
            at_unix_ms=policy.now_ms(),
        )
    if proof is not None:
        from settlement.inclusion import check_inclusion

        trusted = _contract(args)
        report["checks"] += asyncio.run(check_inclusion(proof, args.rpc_url, result, trusted))
        report["request_id"] = report.get("request_id") or proof.get("request_id")
    if published is not None and result is not None and contract is not None:
        from settlement.chain import ChainSettings
        from settlement.inclusion import check_published_inclusion

        batches, malformed = published
        if malformed:
            sys.stderr.write(f"inference-node: skipped {malformed} malformed document(s)\n")
        chain = ChainSettings(
            rpc_url=args.rpc_url, contract_address=contract, chain_id=args.chain_id
        )
        report["checks"] += asyncio.run(check_published_inclusion(batches, result, chain))
    ok = bool(report["checks"]) and all(c["ok"] for c in report["checks"])
    report["verified"] = ok
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
    sys.stdout.write("verified\n" if ok else "NOT VERIFIED\n")
    sys.stdout.flush()
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m nodecli.verify``), same options as ``verify``."""
    parser = argparse.ArgumentParser(prog="inference-node verify", description=__doc__)
    parser.add_argument("reply", type=Path, nargs="?")
    parser.add_argument("--request", type=Path)
    parser.add_argument("--inclusion", type=Path)
    parser.add_argument("--rpc-url", default="http://127.0.0.1:8545")
    add_arguments(parser)
    return run_verify(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
