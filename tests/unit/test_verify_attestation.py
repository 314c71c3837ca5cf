"""Attestation verification against REAL signed evidence (tests/data/attestation/README.md):
Intel TDX quotes v4 and v5 with their Intel collateral (dcap-qvl's samples), an AMD SEV-SNP
report with AMD's Milan chain (omne-attest's sample) and an AWS Nitro document (cape-js).

Each sample is verified at a time inside its validity; tampered copies, a measurement that is
not allowed, a stale or future clock, a debug TEE and a report_data mismatch are rejected.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dcap_qvl
import pytest

from schemas.attestation import Attestation, encode_b64
from schemas.verify.attestation import (
    AttestationPolicy,
    Reason,
    parse_nitro_document,
    roots,
    verify_attestation,
    verify_nitro_document,
    verify_snp_report,
    verify_tdx_quote,
)

DATA = Path(__file__).parents[1] / "data" / "attestation"
SNP_TIME_MS = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)


def _tdx(version: str) -> tuple[bytes, dict[str, str], int]:
    quote = (DATA / f"tdx_quote_{version}.bin").read_bytes()
    collateral = json.loads((DATA / f"tdx_quote_{version}_collateral.json").read_text())
    issued = max(
        datetime.fromisoformat(json.loads(collateral[k])["issueDate"]).timestamp()
        for k in ("tcb_info", "qe_identity")
    )
    return quote, collateral, int(issued * 1000)


def _snp() -> tuple[bytes, list[bytes]]:
    names = ("snp_kds_vcek.der", "snp_milan_ask.der", "snp_milan_ark.der")
    return (DATA / "snp_report.bin").read_bytes(), [(DATA / n).read_bytes() for n in names]


def _nitro() -> bytes:
    return base64.b64decode((DATA / "nitro_document.b64").read_text())


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def _allow(kind: str, measurement: str | None, **kw: Any) -> AttestationPolicy:
    assert measurement is not None
    return AttestationPolicy(allowed_measurements={kind: frozenset({measurement})}, **kw)


def test_trust_anchor_pins_match_the_bytes() -> None:
    assert hashlib.sha256(roots.INTEL_SGX_ROOT_CA_DER).hexdigest() == (
        roots.INTEL_SGX_ROOT_CA_SHA256
    )
    assert hashlib.sha256(roots.AWS_NITRO_ROOT_G1_DER).hexdigest() == (
        roots.AWS_NITRO_ROOT_G1_SHA256
    )
    _, certs = _snp()
    assert hashlib.sha256(certs[2]).hexdigest() == roots.AMD_MILAN_ARK_SHA256
    # The Nitro sample's own cabundle[0] is the same root we ship.
    assert parse_nitro_document(_nitro()).cabundle[0] == roots.AWS_NITRO_ROOT_G1_DER


# -- Intel TDX ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v4", "v5"])
def test_tdx_sample_verifies_at_collateral_time(version: str) -> None:
    quote, collateral, now = _tdx(version)
    report_data = dcap_qvl.parse_quote(quote).report.report_data
    first = verify_tdx_quote(
        quote,
        collateral=collateral,
        expected_report_data=report_data,
        issued_unix_ms=now,
        policy=AttestationPolicy(now_unix_ms=now),
    )
    assert first.reasons == (Reason.MEASUREMENT,)  # genuine, but nothing is allowed by default
    assert first.claims["tcb_status"] == "UpToDate"
    assert first.measurement is not None and len(first.measurement) == 5 * 48 * 2
    ok = verify_tdx_quote(
        quote,
        collateral=collateral,
        expected_report_data=report_data,
        issued_unix_ms=now,
        policy=_allow("tdx", first.measurement, now_unix_ms=now),
    )
    assert ok.ok, ok.reasons


@pytest.mark.parametrize(
    ("where", "offset", "reason"),
    [
        ("td body (MRTD)", 48 + 136, Reason.SIGNATURE),
        ("td body (report_data)", 48 + 520 + 3, Reason.SIGNATURE),
        ("quote signature", 636 + 5, Reason.SIGNATURE),
        ("attestation key", 700 + 3, Reason.SIGNATURE),
        ("QE report", 770, Reason.SIGNATURE),
    ],
)
def test_tdx_tampered_quote_rejected(where: str, offset: int, reason: str) -> None:
    quote, collateral, now = _tdx("v4")
    report_data = dcap_qvl.parse_quote(quote).report.report_data
    verdict = verify_tdx_quote(
        _flip(quote, offset),
        collateral=collateral,
        expected_report_data=report_data,
        issued_unix_ms=now,
        policy=AttestationPolicy(now_unix_ms=now),
    )
    assert not verdict.ok, where
    assert verdict.reasons[0].startswith(reason), verdict.reasons
    assert verdict.measurement is None  # nothing from an unverified quote is reported


def test_tdx_policy_rejections() -> None:
    quote, collateral, now = _tdx("v4")
    report_data = dcap_qvl.parse_quote(quote).report.report_data

    def run(**kw: Any) -> tuple[str, ...]:
        args: dict[str, Any] = {
            "collateral": collateral,
            "expected_report_data": report_data,
            "issued_unix_ms": now,
        }
        policy = kw.pop("policy", AttestationPolicy(now_unix_ms=now))
        args.update(kw)
        return verify_tdx_quote(quote, policy=policy, **args).reasons

    assert Reason.REPORT_DATA in run(expected_report_data=bytes(64))
    assert run(collateral=None)[0].startswith(Reason.COLLATERAL)
    # The collateral expires a month after issue: the same quote is refused later.
    late = run(policy=AttestationPolicy(now_unix_ms=now + 60 * 86_400_000))
    assert late[0].startswith(Reason.COLLATERAL)
    assert any(r.startswith(Reason.STALE) for r in run(issued_unix_ms=now - 8 * 86_400_000))
    assert any(r.startswith(Reason.FUTURE) for r in run(issued_unix_ms=now + 3_600_000))
    strict = AttestationPolicy(now_unix_ms=now, tdx_allowed_tcb_statuses=frozenset())
    assert any(r.startswith(Reason.TCB_STATUS) for r in run(policy=strict))
    # A verifier-supplied collateral replaces the node's (here: a corrupted one is ignored).
    broken = dict(collateral, tcb_info_signature="00" * 64)
    fixed = AttestationPolicy(now_unix_ms=now, tdx_collateral=collateral)
    assert run(collateral=broken, policy=fixed) == (Reason.MEASUREMENT,)
    assert run(collateral=broken)[0].startswith(Reason.COLLATERAL)


def test_tdx_untrusted_root_rejected() -> None:
    quote, collateral, now = _tdx("v4")
    other_root = roots.AWS_NITRO_ROOT_G1_DER
    verdict = verify_tdx_quote(
        quote,
        collateral=collateral,
        expected_report_data=bytes(64),
        issued_unix_ms=now,
        policy=AttestationPolicy(now_unix_ms=now, tdx_root_ca_der=other_root),
    )
    assert not verdict.ok and verdict.measurement is None


def test_tdx_garbage_and_sgx_quotes_rejected() -> None:
    _, collateral, now = _tdx("v4")
    policy = AttestationPolicy(now_unix_ms=now)
    for junk in (b"", b"\x04\x00" + bytes(100), bytes(40_000)):
        verdict = verify_tdx_quote(
            junk,
            collateral=collateral,
            expected_report_data=bytes(64),
            issued_unix_ms=now,
            policy=policy,
        )
        assert not verdict.ok and verdict.reasons[0].startswith(Reason.MALFORMED)


def test_tdx_through_attestation_record() -> None:
    quote, collateral, now = _tdx("v5")
    report_data = dcap_qvl.parse_quote(quote).report.report_data
    record = Attestation(
        kind="tdx",
        evidence=encode_b64(quote),
        report_data=report_data.hex(),
        issued_unix_ms=now,
        collateral=collateral,
    )
    probe = verify_attestation(
        record, expected_report_data=report_data, policy=AttestationPolicy(now_unix_ms=now)
    )
    policy = _allow("tdx", probe.measurement, now_unix_ms=now)
    assert verify_attestation(record, expected_report_data=report_data, policy=policy).ok
    # The record's report_data must be the expected binding too, not only the quote's.
    other = verify_attestation(record, expected_report_data=bytes(64), policy=policy)
    assert other.reasons == (Reason.REPORT_DATA,)
    # An SEV-SNP report labelled tdx is refused.
    snp_report, _ = _snp()
    relabelled = record.model_copy(update={"evidence": encode_b64(snp_report)})
    assert not verify_attestation(relabelled, expected_report_data=report_data, policy=policy).ok


# -- AMD SEV-SNP ----------------------------------------------------------------------------


def test_snp_sample_genuine_but_debug() -> None:
    report, certs = _snp()
    report_data = report[0x50:0x90]
    verdict = verify_snp_report(
        report,
        certificates=certs,
        expected_report_data=report_data,
        issued_unix_ms=SNP_TIME_MS,
        policy=AttestationPolicy(now_unix_ms=SNP_TIME_MS),
    )
    # The sample VM was launched with the debug bit (policy 0xb0000): rejected by default.
    assert verdict.reasons[0].startswith(Reason.DEBUG)
    assert verdict.claims["guest_policy"] == "0xb0000"
    permissive = _allow("sev-snp", verdict.measurement, now_unix_ms=SNP_TIME_MS, allow_debug=True)
    ok = verify_snp_report(
        report,
        certificates=certs,
        expected_report_data=report_data,
        issued_unix_ms=SNP_TIME_MS,
        policy=permissive,
    )
    assert ok.ok, ok.reasons


@pytest.mark.parametrize(
    ("where", "offset", "reason"),
    [
        ("report_data", 0x50 + 7, Reason.SIGNATURE),
        ("measurement", 0x90 + 1, Reason.SIGNATURE),
        ("guest policy (debug bit)", 0x0A, Reason.SIGNATURE),
        ("chip id", 0x1A0 + 4, Reason.SIGNATURE),
        ("signature r", 0x2A0 + 2, Reason.SIGNATURE),
    ],
)
def test_snp_tampered_report_rejected(where: str, offset: int, reason: str) -> None:
    report, certs = _snp()
    verdict = verify_snp_report(
        _flip(report, offset),
        certificates=certs,
        expected_report_data=report[0x50:0x90],
        issued_unix_ms=SNP_TIME_MS,
        policy=AttestationPolicy(now_unix_ms=SNP_TIME_MS, allow_debug=True),
    )
    assert not verdict.ok, where
    assert verdict.reasons[0].startswith(reason), verdict.reasons


def test_snp_chain_and_policy_rejections() -> None:
    report, (vcek, ask, ark) = _snp()
    rd = report[0x50:0x90]
    base = AttestationPolicy(now_unix_ms=SNP_TIME_MS, allow_debug=True)

    def run(certs: list[bytes], policy: AttestationPolicy = base, **kw: Any) -> tuple[str, ...]:
        args: dict[str, Any] = {"expected_report_data": rd, "issued_unix_ms": SNP_TIME_MS}
        args.update(kw)
        return verify_snp_report(report, certificates=certs, policy=policy, **args).reasons

    assert run([vcek, ask])[0].startswith(Reason.CHAIN)
    assert run([vcek, ask, ask])[0].startswith(Reason.CHAIN)  # ARK not pinned
    assert run([ask, ask, ark])[0].startswith(Reason.CHAIN)  # an RSA key is no VCEK
    unpinned = AttestationPolicy(now_unix_ms=SNP_TIME_MS, snp_ark_sha256=frozenset())
    assert run([vcek, ask, ark], unpinned)[0].startswith(Reason.CHAIN)
    assert Reason.REPORT_DATA in run([vcek, ask, ark], expected_report_data=bytes(64))
    before_vcek = AttestationPolicy(now_unix_ms=SNP_TIME_MS - 30 * 86_400_000, allow_debug=True)
    assert any("VCEK not valid" in r for r in run([vcek, ask, ark], before_vcek))
    assert run([vcek, ask, _flip(ark, 500)])[0].startswith(Reason.CHAIN)
    assert run([vcek, ask, ark], AttestationPolicy(now_unix_ms=SNP_TIME_MS)) == (
        f"{Reason.DEBUG}: guest policy allows debugging",
        Reason.MEASUREMENT,
    )


def test_snp_through_attestation_record() -> None:
    report, certs = _snp()
    rd = report[0x50:0x90]
    record = Attestation(
        kind="sev-snp",
        evidence=encode_b64(report),
        report_data=rd.hex(),
        issued_unix_ms=SNP_TIME_MS,
        certificates=[encode_b64(c) for c in certs],
    )
    probe = verify_attestation(
        record, expected_report_data=rd, policy=AttestationPolicy(now_unix_ms=SNP_TIME_MS)
    )
    policy = _allow("sev-snp", probe.measurement, now_unix_ms=SNP_TIME_MS, allow_debug=True)
    assert verify_attestation(record, expected_report_data=rd, policy=policy).ok
    other = _allow("sev-snp", "00" * 48, now_unix_ms=SNP_TIME_MS, allow_debug=True)
    assert verify_attestation(record, expected_report_data=rd, policy=other).reasons == (
        Reason.MEASUREMENT,
    )


# -- AWS Nitro (real document) --------------------------------------------------------------


def test_nitro_sample_verifies_at_its_time() -> None:
    raw = _nitro()
    doc = parse_nitro_document(raw)
    assert doc.module_id == "i-0697c9729fa547b20-enc0183422ede9a5dc8"
    at = AttestationPolicy(now_unix_ms=doc.timestamp_ms + 5000)
    assert doc.user_data is not None
    probe = verify_nitro_document(raw, expected_user_data=doc.user_data, policy=at)
    assert probe.reasons == (Reason.MEASUREMENT,)
    assert probe.measurement == (doc.pcrs[0] + doc.pcrs[1] + doc.pcrs[2]).hex()
    policy = _allow("nitro", probe.measurement, now_unix_ms=doc.timestamp_ms + 5000)
    assert verify_nitro_document(raw, expected_user_data=doc.user_data, policy=policy).ok
    assert verify_nitro_document(raw, expected_user_data=b"x", policy=policy).reasons == (
        Reason.REPORT_DATA,
    )


def test_nitro_sample_tampered_or_out_of_time_rejected() -> None:
    raw = _nitro()
    doc = parse_nitro_document(raw)
    assert doc.user_data is not None
    policy = AttestationPolicy(now_unix_ms=doc.timestamp_ms + 5000, allow_debug=True)

    def reasons(data: bytes, p: AttestationPolicy = policy) -> tuple[str, ...]:
        return verify_nitro_document(
            data, expected_user_data=doc.user_data or b"", policy=p
        ).reasons

    pcr0_at = raw.index(doc.pcrs[0])
    assert reasons(_flip(raw, pcr0_at + 5)) == (Reason.SIGNATURE,)
    user_data_at = raw.index(doc.user_data)
    assert reasons(_flip(raw, user_data_at + 3)) == (Reason.SIGNATURE,)
    assert reasons(_flip(raw, len(raw) - 10)) == (Reason.SIGNATURE,)  # inside the signature
    # The chain is judged at the document's time; its age against max_age_s (default 7 days).
    next_day = AttestationPolicy(now_unix_ms=doc.timestamp_ms + 86_400_000, allow_debug=True)
    assert reasons(raw, next_day) == (Reason.MEASUREMENT,)
    years_later = AttestationPolicy(now_unix_ms=doc.timestamp_ms + 3 * 365 * 86_400_000)
    assert reasons(raw, years_later)[-1].startswith(Reason.STALE)
    before = AttestationPolicy(now_unix_ms=doc.timestamp_ms - 3_600_000)
    assert reasons(raw, before)[-1].startswith(Reason.FUTURE)
    untrusted = AttestationPolicy(
        now_unix_ms=doc.timestamp_ms + 5000, nitro_root_ders=(roots.INTEL_SGX_ROOT_CA_DER,)
    )
    assert reasons(raw, untrusted)[0].startswith(Reason.CHAIN)
    assert reasons(raw[:-1])[0].startswith(Reason.MALFORMED)
    assert reasons(b"\xa0")[0].startswith(Reason.MALFORMED)


def test_bad_base64_and_unknown_bytes_never_raise() -> None:
    policy = AttestationPolicy(allow_dev=True)
    for kind in ("tdx", "sev-snp", "nitro", "dev"):
        record = Attestation.model_validate(
            {"kind": kind, "evidence": "AAAA", "report_data": "00" * 64, "issued_unix_ms": 1}
        )
        verdict = verify_attestation(record, expected_report_data=bytes(64), policy=policy)
        assert not verdict.ok and verdict.kind == kind


def test_every_signed_byte_is_covered() -> None:
    """Flip each byte of the TDX header and TD report body (bytes 0..631 of a v4 quote) and of
    the signed SEV-SNP region (0..0x29f): every copy is rejected before any measurement is
    read. (DCAP leaves some bytes of a quote unsigned, e.g. PEM line breaks in the embedded
    certificate chain; those carry no claims.)"""
    quote, collateral, now = _tdx("v4")
    tdx_policy = AttestationPolicy(now_unix_ms=now)
    for offset in range(632):
        verdict = verify_tdx_quote(
            _flip(quote, offset),
            collateral=collateral,
            expected_report_data=bytes(64),
            issued_unix_ms=now,
            policy=tdx_policy,
        )
        assert verdict.measurement is None, offset
    report, certs = _snp()
    snp_policy = AttestationPolicy(now_unix_ms=SNP_TIME_MS, allow_debug=True)
    for offset in range(0x2A0):
        verdict = verify_snp_report(
            _flip(report, offset),
            certificates=certs,
            expected_report_data=bytes(64),
            issued_unix_ms=SNP_TIME_MS,
            policy=snp_policy,
        )
        assert verdict.measurement is None, offset


def test_nitro_document_bytes_are_covered() -> None:
    raw = _nitro()
    doc = parse_nitro_document(raw)
    policy = AttestationPolicy(now_unix_ms=doc.timestamp_ms + 5000, allow_debug=True)
    for offset in range(0, len(raw), 3):
        verdict = verify_nitro_document(
            _flip(raw, offset), expected_user_data=doc.user_data or b"", policy=policy
        )
        assert verdict.measurement is None, offset
