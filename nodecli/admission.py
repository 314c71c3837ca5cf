"""``inference-node admission``: what an admission authority runs (docs/RUNBOOK.md, "Admitting
a node").

On chain (the default source): ``deploy`` a NodeRegistry governed by a key, then ``admit`` /
``revoke`` nodes and ``approve`` / ``revoke-measurement`` TEE measurements with that key.
Without a chain: ``sign-list`` writes a ``SignedAdmissionList`` from a JSON file of nodes and
measurements, signed by the authority's ed25519 key, with a sequence above the last one.
``show`` prints the facts a verifier would use now, from either source.

Keys are read from files (``--governance-key-file``: ``0x`` hex secp256k1; ``--authority-key-
file``: hex ed25519 seed), never from the command line, and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from infra.admission import AdmissionSettings, NodeRegistryClient, admission_source
from infra.evm import ChainError, EvmSettings
from schemas.admission import (
    AdmissionList,
    AdmittedNode,
    ApprovedMeasurement,
    SignedAdmissionList,
    sign_admission_list,
)
from schemas.signing import Signer

__all__ = ["add_parser", "run_admission"]


def add_parser(sub: Any) -> None:
    a = sub.add_parser("admission", help="admit and revoke nodes (an admission authority's tool)")
    actions = a.add_subparsers(dest="action", required=True)

    def chain_options(p: argparse.ArgumentParser, *, registry: bool = True) -> None:
        p.add_argument("--rpc-url", default="http://127.0.0.1:8545")
        p.add_argument("--chain-id", type=int, default=31337)
        p.add_argument("--governance-key-file", type=Path, required=True)
        if registry:
            p.add_argument("--registry-address", required=True)

    chain_options(actions.add_parser("deploy", help="deploy a NodeRegistry"), registry=False)
    admit = actions.add_parser("admit", help="admit a node id with its chain address")
    admit.add_argument("node_id")
    admit.add_argument("chain_address")
    chain_options(admit)
    revoke = actions.add_parser("revoke", help="revoke a node")
    revoke.add_argument("node_id")
    chain_options(revoke)
    for name, text in (
        ("approve-measurement", "admit every node whose verified evidence shows it"),
        ("revoke-measurement", "disable every node running it"),
    ):
        m = actions.add_parser(name, help=text)
        m.add_argument("kind", choices=["tdx", "sev-snp", "nitro", "dev"])
        m.add_argument("measurement", help="hex")
        chain_options(m)
    sign = actions.add_parser("sign-list", help="write a signed admission list (no chain)")
    sign.add_argument("facts", type=Path, help='JSON: {"nodes": [{node_id, chain_address}], ...}')
    sign.add_argument("--authority-key-file", type=Path, required=True)
    sign.add_argument("--out", type=Path, required=True)
    sign.add_argument("--sequence", type=int, help="default: one above the list at --out, else 1")
    show = actions.add_parser("show", help="the admission facts a verifier uses now")
    show.add_argument("--source", choices=["chain", "authority", "open"], default="chain")
    show.add_argument("--rpc-url", default="http://127.0.0.1:8545")
    show.add_argument("--registry-address")
    show.add_argument("--from-block", type=int, default=0)
    show.add_argument("--authority-key", action="append", default=[])
    show.add_argument("--admission-list", type=Path)
    a.set_defaults(func=run_admission)


def run_admission(args: argparse.Namespace) -> int:
    try:
        if args.action == "sign-list":
            return _sign_list(args)
        if args.action == "show":
            return _print(asyncio.run(_show(args)))
        return _print(asyncio.run(_on_chain(args)))
    except (OSError, ValueError, ValidationError) as e:
        return _fail(f"{args.action}: {type(e).__name__}: {_safe(e)}", 2)
    except ChainError as e:
        return _fail(f"{args.action}: {e}", 1)


async def _on_chain(args: argparse.Namespace) -> dict[str, Any]:
    key = SecretStr(args.governance_key_file.read_text().strip())
    evm = EvmSettings(rpc_url=args.rpc_url, chain_id=args.chain_id)
    if args.action == "deploy":
        address, block = await NodeRegistryClient.deploy(evm, key)
        return {"registry_address": address, "from_block": block}
    client = NodeRegistryClient(evm, args.registry_address, key)
    try:
        if args.action == "admit":
            await client.admit(args.node_id, args.chain_address)
            return {"admitted": args.node_id, "chain_address": args.chain_address.lower()}
        if args.action == "revoke":
            await client.revoke(args.node_id)
            return {"revoked": args.node_id}
        if args.action == "approve-measurement":
            await client.approve_measurement(args.kind, args.measurement)
            return {"approved": [args.kind, args.measurement]}
        await client.revoke_measurement(args.kind, args.measurement)
        return {"revoked_measurement": [args.kind, args.measurement]}
    finally:
        await client.close()


def _sign_list(args: argparse.Namespace) -> int:
    authority = Signer(bytes.fromhex(args.authority_key_file.read_text().strip()))
    facts = json.loads(args.facts.read_text())
    sequence = args.sequence
    if sequence is None:
        sequence = 1
        if args.out.exists():
            previous = SignedAdmissionList.model_validate_json(args.out.read_bytes())
            sequence = previous.list.sequence + 1
    admission_list = AdmissionList(
        authority_id=authority.node_id,
        sequence=sequence,
        issued_unix_ms=time.time_ns() // 1_000_000,
        nodes=[AdmittedNode.model_validate(n) for n in facts.get("nodes", [])],
        measurements=[ApprovedMeasurement.model_validate(m) for m in facts.get("measurements", [])],
    )
    signed = sign_admission_list(authority, admission_list)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(signed.model_dump_json())
    tmp.replace(args.out)  # readers never see half a list
    return _print(
        {"authority_id": authority.node_id, "sequence": sequence, "nodes": len(signed.list.nodes)}
    )


async def _show(args: argparse.Namespace) -> dict[str, Any]:
    source = admission_source(
        AdmissionSettings(
            source=args.source,
            rpc_url=args.rpc_url,
            registry_address=args.registry_address,
            from_block=args.from_block,
            authority_keys=args.authority_key,
            authority_list=args.admission_list,
        )
    )
    try:
        facts = await source.snapshot()
    finally:
        await source.close()
    return {
        "source": facts.source,
        "nodes": {
            n.node_id: {"chain_address": n.chain_address, "admitted": n.admitted}
            for n in facts.nodes.values()
        },
        "approved_measurements": sorted(list(m) for m in facts.approved_measurements),
        "revoked_measurements": sorted(list(m) for m in facts.revoked_measurements),
    }


def _safe(e: Exception) -> str:
    """A message that cannot quote a key file's content (validation errors repeat input)."""
    if isinstance(e, ValidationError):
        return f"{e.error_count()} invalid field(s)"
    if isinstance(e, ValueError) and "hex" in str(e).lower():
        return "not hex"
    return str(e) if isinstance(e, OSError | ValueError) else ""


def _print(value: dict[str, Any]) -> int:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
    return 0


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"inference-node: {message}\n")
    return code
