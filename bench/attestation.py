"""Signing and attestation verification costs: ``python -m bench.attestation [--n N]``
(``--smoke`` for tiny sizes).

- a v2 result's signatures (``schemas.signing``): signing twice (envelope digest, ed25519 and
  EIP-191 with the chain key) as a node does and checking both as a verifier does, and each
  signature alone, per operation against its bare primitives measured in the same run (pynacl
  ``SigningKey.sign``/``VerifyKey.verify`` over the 32-byte digest, coincurve's recoverable
  signature and recovery over the EIP-191 hash, sha256 of the canonical bytes);
- the time to verify one attestation record end to end (``schemas.verify.attestation
  .verify_attestation``: base64, parsing, the vendor chain, policy) for the real TDX v4 and v5
  quotes with their collateral, the real SEV-SNP report with AMD's chain, the real AWS Nitro
  document, and a development attestation. Each sample is verified at a time inside its
  validity, with its own measurement allowed, so every run takes the accepting path.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import coincurve
import dcap_qvl
from nacl.signing import SigningKey

from bench.common import add_run_options, results_path, table, write_section
from schemas.attestation import Attestation, encode_b64
from schemas.canonical import canonical_bytes
from schemas.signing import (
    chain_message_hash,
    envelope_digest,
    recover_chain_address,
    verify_envelope_signature,
)
from schemas.verify.attestation import (
    AttestationPolicy,
    parse_nitro_document,
    verify_attestation,
    verify_nitro_document,
)
from tests.harness.nodes import TestNode
from worker.trust.attestation import DevProvider

DATA = Path(__file__).parents[1] / "tests" / "data" / "attestation"


def _per_op_s(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _case(att: Attestation, expected: bytes, now_ms: int, **kw: object) -> Callable[[], object]:
    probe = verify_attestation(
        att, expected_report_data=expected, policy=AttestationPolicy(now_unix_ms=now_ms, **kw)
    )
    assert probe.measurement is not None
    policy = AttestationPolicy(
        now_unix_ms=now_ms,
        allowed_measurements={att.kind: frozenset({probe.measurement})},
        **kw,  # type: ignore[arg-type]
    )
    assert verify_attestation(att, expected_report_data=expected, policy=policy).ok

    def run() -> object:
        return verify_attestation(att, expected_report_data=expected, policy=policy)

    return run


def _tdx(version: str) -> Callable[[], object]:
    quote = (DATA / f"tdx_quote_{version}.bin").read_bytes()
    collateral = json.loads((DATA / f"tdx_quote_{version}_collateral.json").read_text())
    now_s = max(
        datetime.fromisoformat(json.loads(collateral[k])["issueDate"]).timestamp()
        for k in ("tcb_info", "qe_identity")
    )
    now_ms = int(now_s * 1000)
    rd = dcap_qvl.parse_quote(quote).report.report_data
    att = Attestation(
        kind="tdx",
        evidence=encode_b64(quote),
        report_data=rd.hex(),
        issued_unix_ms=now_ms,
        collateral=collateral,
    )
    return _case(att, rd, now_ms)


def _snp() -> Callable[[], object]:
    report = (DATA / "snp_report.bin").read_bytes()
    names = ("snp_kds_vcek.der", "snp_milan_ask.der", "snp_milan_ark.der")
    now_ms = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)
    att = Attestation(
        kind="sev-snp",
        evidence=encode_b64(report),
        report_data=report[0x50:0x90].hex(),
        issued_unix_ms=now_ms,
        certificates=[encode_b64((DATA / n).read_bytes()) for n in names],
    )
    return _case(att, report[0x50:0x90], now_ms, allow_debug=True)  # the sample is debug


def _nitro() -> Callable[[], object]:
    raw = base64.b64decode((DATA / "nitro_document.b64").read_text())
    doc = parse_nitro_document(raw)
    assert doc.user_data is not None
    # The record model carries 64-byte report_data; this sample binds 250 bytes of someone
    # else's user_data, so time the document verifier the record path delegates to.
    probe = verify_nitro_document(
        raw,
        expected_user_data=doc.user_data,
        policy=AttestationPolicy(now_unix_ms=doc.timestamp_ms + 5000),
    )
    assert probe.measurement is not None
    policy = AttestationPolicy(
        now_unix_ms=doc.timestamp_ms + 5000,
        allowed_measurements={"nitro": frozenset({probe.measurement})},
    )
    user_data = doc.user_data
    assert verify_nitro_document(raw, expected_user_data=user_data, policy=policy).ok
    return lambda: verify_nitro_document(raw, expected_user_data=user_data, policy=policy)


def _dev() -> Callable[[], object]:
    att = DevProvider(bytes(32), clock_ms=lambda: 1_795_000_000_000).attest(b"\x01" * 64)
    return _case(att, b"\x01" * 64, 1_795_000_001_000, allow_dev=True)


def _signing_cases(n: int) -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, operation, its bare primitive) for a v2 result's signatures."""
    node = TestNode.seeded(1)
    record = node.record("bench-1")
    envelope = record.envelope
    digest = envelope_digest(envelope)
    chain_hash = chain_message_hash(digest)
    seed = bytes(range(32))
    key = SigningKey(seed)

    def sign_both() -> object:
        d = envelope_digest(envelope)
        return node.signer.sign_digest(d), node.chain.sign_digest(d)

    def verify_both() -> object:
        d = envelope_digest(envelope)
        assert verify_envelope_signature(envelope, record.signature)
        return recover_chain_address(d, record.chain_signature) == node.chain_address

    raw_chain = bytes.fromhex(record.chain_signature.removeprefix("0x"))
    recoverable = raw_chain[:64] + bytes([raw_chain[64] - 27])
    secp = coincurve.PrivateKey(hashlib.sha256(b"bench").digest())
    signed = key.sign(digest).signature
    verify_key = key.verify_key
    canonical = canonical_bytes(envelope)

    def ed_sign() -> object:
        return key.sign(digest)

    def ed_verify() -> object:
        return verify_key.verify(digest, signed)

    def secp_sign() -> object:
        return secp.sign_recoverable(chain_hash, hasher=None)

    def secp_recover() -> object:
        return coincurve.PublicKey.from_signature_and_message(recoverable, chain_hash, hasher=None)

    return [
        (
            "result: sign twice (digest + ed25519 + EIP-191)",
            sign_both,
            lambda: (ed_sign(), secp_sign()),
        ),
        ("result: verify both signatures", verify_both, lambda: (ed_verify(), secp_recover())),
        ("ed25519 sign envelope digest", lambda: node.signer.sign_digest(digest), ed_sign),
        (
            "ed25519 verify envelope (digest + verify)",
            lambda: verify_envelope_signature(envelope, record.signature),
            ed_verify,
        ),
        ("EIP-191 sign (keccak + secp256k1)", lambda: node.chain.sign_digest(digest), secp_sign),
        (
            "EIP-191 recover address",
            lambda: recover_chain_address(digest, record.chain_signature),
            secp_recover,
        ),
        (
            "envelope digest (canonical + sha256)",
            lambda: envelope_digest(envelope),
            lambda: hashlib.sha256(canonical),
        ),
    ]


def _row(name: str, times: list[float], bare: list[float] | None) -> dict[str, Any]:
    ordered = sorted(times)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    row: dict[str, Any] = {
        "operation": name,
        "per_s": len(times) / sum(times),
        "p50_us": statistics.median(ordered) * 1e6,
        "p99_us": p99 * 1e6,
    }
    if bare is not None:
        row["bare_p50_us"] = statistics.median(bare) * 1e6
        row["vs_bare"] = row["p50_us"] / row["bare_p50_us"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_options(parser)
    parser.add_argument("--n", type=int, default=2000, help="runs per signature operation")
    parser.add_argument("--attest-n", type=int, default=50, help="runs per attestation kind")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.attest_n = 50, 3

    rows = []
    for name, op, bare in _signing_cases(args.n):
        rows.append(_row(name, _per_op_s(op, args.n), _per_op_s(bare, args.n)))
    for name, build in [
        ("attestation tdx (v4 quote)", lambda: _tdx("v4")),
        ("attestation tdx (v5 quote)", lambda: _tdx("v5")),
        ("attestation sev-snp", _snp),
        ("attestation nitro (document)", _nitro),
        ("attestation dev", _dev),
    ]:
        rows.append(_row(name, _per_op_s(build(), args.attest_n), None))

    print(
        table(
            ["operation", "per second", "p50 µs", "p99 µs", "bare primitive p50 µs", "vs bare"],
            [
                [
                    r["operation"],
                    f"{r['per_s']:,.0f}",
                    f"{r['p50_us']:.1f}",
                    f"{r['p99_us']:.1f}",
                    f"{r['bare_p50_us']:.1f}" if "bare_p50_us" in r else "-",
                    f"{r['vs_bare']:.2f}" if "vs_bare" in r else "-",
                ]
                for r in rows
            ],
        )
    )
    section = {"smoke": args.smoke, "n": args.n, "attest_n": args.attest_n, "rows": rows}
    write_section(results_path(args), "attestation", section, {})


if __name__ == "__main__":
    main()
