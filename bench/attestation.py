"""Signing and attestation verification costs: ``python -m bench.attestation [--n N]``.

- ed25519 sign and verify rates for result envelopes (``schemas.signing.Signer``,
  ``schemas.signing.verify_envelope_signature``), including the canonical encoding and hashing
  each one does;
- the time to verify one attestation record end to end (``schemas.verify.attestation
  .verify_attestation``: base64, parsing, the vendor chain, policy) for the real TDX v4 and v5
  quotes with their collateral, the real SEV-SNP report with AMD's chain, the real AWS Nitro
  document, and a development attestation. Each sample is verified at a time inside its
  validity, with its own measurement allowed, so every run takes the accepting path.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dcap_qvl

from schemas.attestation import Attestation, encode_b64
from schemas.base import VerificationMode
from schemas.results import ResultEnvelope, Usage
from schemas.signing import Signer, verify_envelope_signature
from schemas.verify.attestation import (
    AttestationPolicy,
    parse_nitro_document,
    verify_attestation,
    verify_nitro_document,
)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000, help="signatures per rate measurement")
    parser.add_argument("--attest-n", type=int, default=50, help="runs per attestation kind")
    args = parser.parse_args()

    signer = Signer(bytes(range(32)))
    envelope = ResultEnvelope(
        request_id="bench-1",
        model_id="demo-mlp",
        model_digest="ab" * 32,
        mode=VerificationMode.VANILLA,
        input_hash="cd" * 32,
        output_hash="ef" * 32,
        usage=Usage(input_tokens=10, output_tokens=20),
        node_id=signer.node_id,
        signed_unix_ms=1_795_000_000_000,
    )
    signature = signer.sign_envelope(envelope)
    sign = _per_op_s(lambda: signer.sign_envelope(envelope), args.n)
    verify = _per_op_s(lambda: verify_envelope_signature(envelope, signature), args.n)

    rows = [
        ("ed25519 sign envelope", f"{args.n / sum(sign):,.0f} /s", sign),
        ("ed25519 verify envelope", f"{args.n / sum(verify):,.0f} /s", verify),
    ]
    for name, build in [
        ("attestation tdx (v4 quote)", lambda: _tdx("v4")),
        ("attestation tdx (v5 quote)", lambda: _tdx("v5")),
        ("attestation sev-snp", _snp),
        ("attestation nitro (document)", _nitro),
        ("attestation dev", _dev),
    ]:
        run = build()
        times = _per_op_s(run, args.attest_n)
        rows.append((name, f"{args.attest_n / sum(times):,.0f} /s", times))

    print(f"{'operation':<30} {'rate':>12} {'median':>10} {'p95':>10}")
    for name, rate, times in rows:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        median = statistics.median(ordered)
        print(f"{name:<30} {rate:>12} {median * 1e3:>8.3f}ms {p95 * 1e3:>8.3f}ms")


if __name__ == "__main__":
    main()
