"""Intel TDX quotes (v4 and v5), verified offline with ``dcap-qvl`` and collateral as data.

dcap-qvl checks the whole DCAP chain: the quote body's ECDSA signature by the attestation key,
the QE report binding that key, the QE report's signature by the PCK key, the PCK certificate
chain to the pinned Intel SGX Root CA, the CRLs, and the signed TCB info and QE identity
(each valid at the verifier's clock). On top of that we apply our policy: TCB status, the
TD's DEBUG attribute, the report_data binding, the measurement allow-list and the age.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping

import dcap_qvl  # type: ignore[import-untyped]

from schemas.verify.attestation.policy import AttestationPolicy, AttestationVerdict, Reason

__all__ = ["tdx_measurement", "verify_tdx_quote"]

TD_ATTRIBUTES_DEBUG = 0x01
"""TD_ATTRIBUTES bit 0 (TUD.DEBUG): the TD runs in debug mode, its memory readable by the host."""
MAX_QUOTE_BYTES = 32_768


def tdx_measurement(
    mr_td: bytes, rt_mr0: bytes, rt_mr1: bytes, rt_mr2: bytes, rt_mr3: bytes
) -> str:
    """The allow-list value: hex(MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3)."""
    return (mr_td + rt_mr0 + rt_mr1 + rt_mr2 + rt_mr3).hex()


def _collateral(data: Mapping[str, str]) -> object:
    return dcap_qvl.QuoteCollateralV3.from_json(json.dumps(dict(data)))


def verify_tdx_quote(
    quote: bytes,
    *,
    collateral: Mapping[str, str] | None,
    expected_report_data: bytes,
    issued_unix_ms: int,
    policy: AttestationPolicy,
) -> AttestationVerdict:
    """Verify a raw TDX quote. ``collateral`` is the node's; ``policy.tdx_collateral``, when
    set, takes precedence. Never raises on bad input."""
    kind = "tdx"
    if not 0 < len(quote) <= MAX_QUOTE_BYTES:
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: quote size")
    data = policy.tdx_collateral if policy.tdx_collateral is not None else collateral
    if data is None:
        return AttestationVerdict.reject(kind, f"{Reason.COLLATERAL}: none supplied")
    try:
        parsed = dcap_qvl.parse_quote(quote)
    except Exception:  # dcap-qvl reports parse failures as ValueError; be safe with the rest
        return AttestationVerdict.reject(kind, f"{Reason.MALFORMED}: quote does not parse")
    if not parsed.is_tdx():
        return AttestationVerdict.reject(kind, f"{Reason.KIND_MISMATCH}: not a TDX quote")
    try:
        coll = _collateral(data)
    except (ValueError, TypeError):
        return AttestationVerdict.reject(kind, f"{Reason.COLLATERAL}: does not parse")
    try:
        report = dcap_qvl.verify_with_root_ca(
            quote, coll, policy.tdx_root_ca_der, policy.now_ms() // 1000
        )
    except Exception as e:
        return AttestationVerdict.reject(kind, _dcap_reason(str(e)))

    td = parsed.report
    measurement = tdx_measurement(td.mr_td, td.rt_mr0, td.rt_mr1, td.rt_mr2, td.rt_mr3)
    status = str(report.status)
    reasons: list[str] = []
    if status not in policy.tdx_allowed_tcb_statuses:
        reasons.append(f"{Reason.TCB_STATUS}: {status}")
    if td.td_attributes[0] & TD_ATTRIBUTES_DEBUG and not policy.allow_debug:
        reasons.append(f"{Reason.DEBUG}: TD_ATTRIBUTES.DEBUG set")
    if not hmac.compare_digest(bytes(td.report_data), expected_report_data):
        reasons.append(Reason.REPORT_DATA)
    if not policy.measurement_allowed(kind, measurement):
        reasons.append(Reason.MEASUREMENT)
    reasons += policy.age_reasons(issued_unix_ms)
    claims = {
        "tcb_status": status,
        "advisory_ids": ",".join(report.advisory_ids),
        "mr_td": bytes(td.mr_td).hex(),
        "quote_version": str(parsed.header.version),
    }
    return AttestationVerdict.decide(kind, reasons, measurement, claims)


def _dcap_reason(message: str) -> str:
    """Map a dcap-qvl failure to our reason. Its messages name the failing check, never data
    from the quote, so a short prefix is safe to keep as detail."""
    detail = message.removeprefix("Verification failed: ")[:120]
    lowered = detail.lower()
    if any(word in lowered for word in ("expired", "crl", "tcb", "collateral", "qe identity")):
        return f"{Reason.COLLATERAL}: {detail}"
    if "signature" in lowered:
        return f"{Reason.SIGNATURE}: {detail}"
    if "cert" in lowered or "chain" in lowered or "root" in lowered:
        return f"{Reason.CHAIN}: {detail}"
    return f"{Reason.SIGNATURE}: {detail}"
