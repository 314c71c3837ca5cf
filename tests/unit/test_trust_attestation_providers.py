"""Attestation providers against emulated kernel interfaces, and the provider -> verifier path.

This machine has no TEE (no configfs-tsm, no /dev/nsm). ``FakeTsmKernel`` emulates a
configfs-tsm report entry the way the kernel behaves: ``inblob`` and ``outblob`` are FIFOs
served by a thread, so the report is produced only after the provider's write and handed over
on its read, and ``generation`` counts writes. Fed REAL evidence (the TDX and SEV-SNP samples),
the provider's output must verify with ``schemas.verify.attestation``.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import dcap_qvl
import pytest
from pydantic import SecretStr

import worker.trust.attestation as wta
from schemas.attestation import DEV_NOTICE, binding_report_data, decode_b64
from schemas.verify.attestation import AttestationPolicy, Reason, verify_attestation
from worker.trust.attestation import (
    AttestationFailed,
    AttestationSettings,
    AttestationUnavailable,
    ConfigfsTsmProvider,
    DevProvider,
    NitroProvider,
    attest_node,
    load_attestation_provider,
)
from worker.trust.attestation import configfs_tsm as tsm
from worker.trust.attestation.nitro import attestation_request, parse_response

DATA = Path(__file__).parents[1] / "data" / "attestation"
KEYS = {"node_id": "aa" * 32, "x25519_public_key": "bb" * 32, "chain_address": "0x" + "cc" * 20}
SNP_TIME_MS = int(datetime(2026, 9, 1, tzinfo=UTC).timestamp() * 1000)

pytestmark = pytest.mark.timeout(30)


class FakeTsmKernel:
    """One emulated ``/sys/kernel/config/tsm/report/<entry>``."""

    def __init__(
        self,
        *,
        provider: str = "tdx_guest",
        report: Callable[[bytes], bytes] = lambda rd: b"QUOTE:" + rd,
        auxblob: bytes | None = None,
        extra_writers: list[int] | None = None,
    ) -> None:
        self.provider = provider
        self.report = report
        self.auxblob = auxblob
        self.extra_writers = list(extra_writers or [])
        """Per request: how many foreign inblob writes happened meanwhile."""
        self.inblobs: list[bytes] = []
        self.entries: list[Path] = []
        self._servers: dict[Path, tuple[threading.Thread, threading.Event]] = {}

    def mkdir(self, entry: Path) -> None:
        entry.mkdir()
        (entry / "provider").write_text(self.provider + "\n")
        (entry / "generation").write_text("0\n")
        if self.auxblob is not None:
            (entry / "auxblob").write_bytes(self.auxblob)
        os.mkfifo(entry / "inblob")
        os.mkfifo(entry / "outblob")
        self.entries.append(entry)
        stop = threading.Event()
        thread = threading.Thread(target=self._serve, args=(entry, stop), daemon=True)
        thread.start()
        self._servers[entry] = (thread, stop)

    def _serve(self, entry: Path, stop: threading.Event) -> None:
        generation = 0
        while True:
            with (entry / "inblob").open("rb") as f:
                data = f.read()
            if stop.is_set():
                return
            self.inblobs.append(data)
            generation += 1 + (self.extra_writers.pop(0) if self.extra_writers else 0)
            (entry / "generation").write_text(f"{generation}\n")
            with (entry / "outblob").open("wb") as f:
                f.write(self.report(data))

    def rmdir(self, entry: Path) -> None:
        thread, stop = self._servers.pop(entry)
        stop.set()
        while thread.is_alive():  # wake the server, once it waits on inblob again
            try:
                os.close(os.open(entry / "inblob", os.O_WRONLY | os.O_NONBLOCK))
            except OSError as e:  # ENXIO: it is still finishing the last request
                assert e.errno == errno.ENXIO
                time.sleep(0.001)
                continue
            thread.join(timeout=5)
        for child in entry.iterdir():
            child.unlink()
        entry.rmdir()


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeTsmKernel]:
    """configfs mkdir/rmdir semantics (attributes appear and vanish with the directory)."""
    fake = FakeTsmKernel()
    monkeypatch.setattr(tsm, "_mkdir_entry", lambda path: fake.mkdir(path))
    monkeypatch.setattr(tsm, "_rmdir_entry", lambda path: fake.rmdir(path))
    (tmp_path / "report").mkdir()
    yield fake
    for entry in fake.entries:
        if entry.exists():
            fake.rmdir(entry)


def _cert_table(certs: dict[uuid.UUID, bytes], *, little_endian: bool = False) -> bytes:
    header_len = 24 * (len(certs) + 1)
    table, body = b"", b""
    for guid, der in certs.items():
        raw = guid.bytes_le if little_endian else guid.bytes
        offset = header_len + len(body)
        table += raw + offset.to_bytes(4, "little") + len(der).to_bytes(4, "little")
        body += der
    return table + bytes(24) + body


def _snp_certs() -> list[bytes]:
    names = ("snp_kds_vcek.der", "snp_milan_ask.der", "snp_milan_ark.der")
    return [(DATA / n).read_bytes() for n in names]


# -- configfs-tsm ---------------------------------------------------------------------------


def test_configfs_tsm_round_trip(kernel: FakeTsmKernel, tmp_path: Path) -> None:
    provider = ConfigfsTsmProvider(tmp_path / "report", clock_ms=lambda: 1234)
    assert isinstance(provider, wta.AttestationProvider)
    binding = binding_report_data(**KEYS)
    att = attest_node(provider, **KEYS)
    assert kernel.inblobs == [binding]  # exactly the 64 binding bytes reach the kernel
    assert att.kind == "tdx" and att.provider == "tdx_guest" and att.issued_unix_ms == 1234
    assert att.evidence_bytes() == b"QUOTE:" + binding
    assert att.report_data == binding.hex()
    assert att.collateral is None and att.certificates == []
    # the entry was created under the root, named for this process, and removed again
    (entry,) = kernel.entries
    assert entry.parent == tmp_path / "report" and entry.name.startswith(f"og-{os.getpid()}-")
    assert not entry.exists()


def test_configfs_tsm_retries_when_another_writer_interleaves(
    kernel: FakeTsmKernel, tmp_path: Path
) -> None:
    kernel.extra_writers = [1]  # first request: someone else wrote inblob too
    att = ConfigfsTsmProvider(tmp_path / "report").attest(bytes(range(64)))
    assert kernel.inblobs == [bytes(range(64))] * 2
    assert att.evidence_bytes() == b"QUOTE:" + bytes(range(64))
    kernel.extra_writers = [1, 1, 1]
    with pytest.raises(AttestationFailed, match="concurrently"):
        ConfigfsTsmProvider(tmp_path / "report").attest(bytes(64))


def test_configfs_tsm_errors(kernel: FakeTsmKernel, tmp_path: Path) -> None:
    with pytest.raises(AttestationUnavailable, match="configfs-tsm is not available"):
        ConfigfsTsmProvider(tmp_path / "missing").attest(bytes(64))
    with pytest.raises(ValueError, match="64 bytes"):
        ConfigfsTsmProvider(tmp_path / "report").attest(bytes(32))
    with pytest.raises(AttestationUnavailable, match="configured for sev-snp but this is tdx"):
        ConfigfsTsmProvider(tmp_path / "report", kind="sev-snp").attest(bytes(64))
    kernel.provider = "arm_cca_guest"
    with pytest.raises(AttestationUnavailable, match="unsupported configfs-tsm provider"):
        ConfigfsTsmProvider(tmp_path / "report").attest(bytes(64))
    kernel.provider = "sev_guest"  # no certificate table and none configured
    with pytest.raises(AttestationFailed, match="VCEK"):
        ConfigfsTsmProvider(tmp_path / "report").attest(bytes(64))
    assert all(not e.exists() for e in kernel.entries)  # cleaned up after every failure


def test_configfs_tsm_pre_created_entry(tmp_path: Path) -> None:
    """A privileged step created the entry: the provider reuses it and never removes it."""
    fake = FakeTsmKernel()
    entry = tmp_path / "report" / "worker0"
    (tmp_path / "report").mkdir()
    fake.mkdir(entry)
    try:
        provider = ConfigfsTsmProvider(tmp_path / "report", entry="worker0")
        first = provider.attest(bytes(64))
        second = provider.attest(b"\x01" * 64)
        assert entry.exists()
        assert first.evidence_bytes() == b"QUOTE:" + bytes(64)
        assert second.evidence_bytes() == b"QUOTE:" + b"\x01" * 64
        with pytest.raises(AttestationUnavailable, match="not a configfs-tsm report entry"):
            ConfigfsTsmProvider(tmp_path / "report", entry="nope").attest(bytes(64))
    finally:
        fake.rmdir(entry)


def test_configfs_tsm_real_tdx_quote_verifies(kernel: FakeTsmKernel, tmp_path: Path) -> None:
    quote = (DATA / "tdx_quote_v4.bin").read_bytes()
    collateral = json.loads((DATA / "tdx_quote_v4_collateral.json").read_text())
    now = int(datetime.fromisoformat(json.loads(collateral["tcb_info"])["issueDate"]).timestamp())
    now_ms = (now + 3600) * 1000
    kernel.report = lambda _rd: quote
    sample_rd = dcap_qvl.parse_quote(quote).report.report_data
    provider = ConfigfsTsmProvider(
        tmp_path / "report", kind="tdx", tdx_collateral=collateral, clock_ms=lambda: now_ms
    )
    att = provider.attest(sample_rd)
    assert att.collateral == collateral
    probe = verify_attestation(
        att, expected_report_data=sample_rd, policy=AttestationPolicy(now_unix_ms=now_ms)
    )
    assert probe.reasons == (Reason.MEASUREMENT,) and probe.measurement is not None
    policy = AttestationPolicy(
        now_unix_ms=now_ms, allowed_measurements={"tdx": frozenset({probe.measurement})}
    )
    assert verify_attestation(att, expected_report_data=sample_rd, policy=policy).ok


@pytest.mark.parametrize("little_endian", [False, True])
def test_configfs_tsm_real_snp_report_with_cert_table_verifies(
    kernel: FakeTsmKernel, tmp_path: Path, little_endian: bool
) -> None:
    report = (DATA / "snp_report.bin").read_bytes()
    vcek, ask, ark = _snp_certs()
    kernel.provider = "sev_guest"
    kernel.report = lambda _rd: report
    kernel.auxblob = _cert_table(
        {tsm.ARK_GUID: ark, tsm.VCEK_GUID: vcek, tsm.ASK_GUID: ask}, little_endian=little_endian
    )
    rd = report[0x50:0x90]
    att = ConfigfsTsmProvider(tmp_path / "report", clock_ms=lambda: SNP_TIME_MS).attest(rd)
    assert att.kind == "sev-snp"
    assert [decode_b64(c) for c in att.certificates] == [vcek, ask, ark]
    policy = AttestationPolicy(now_unix_ms=SNP_TIME_MS, allow_debug=True)
    probe = verify_attestation(att, expected_report_data=rd, policy=policy)
    assert probe.reasons == (Reason.MEASUREMENT,) and probe.measurement is not None
    allowed = AttestationPolicy(
        now_unix_ms=SNP_TIME_MS,
        allow_debug=True,
        allowed_measurements={"sev-snp": frozenset({probe.measurement})},
    )
    assert verify_attestation(att, expected_report_data=rd, policy=allowed).ok


def test_snp_cert_table_parsing() -> None:
    vcek, ask, ark = _snp_certs()
    full = {tsm.VCEK_GUID: vcek, tsm.ASK_GUID: ask, tsm.ARK_GUID: ark}
    assert tsm.parse_snp_cert_table(_cert_table(full)) == [vcek, ask, ark]
    assert tsm.parse_snp_cert_table(_cert_table({tsm.VCEK_GUID: vcek})) == []
    assert tsm.parse_snp_cert_table(b"") == []
    truncated = _cert_table(full)[:-10]  # the ARK runs past the end
    assert tsm.parse_snp_cert_table(truncated) == []


def test_configfs_tsm_snp_falls_back_to_configured_certs(
    kernel: FakeTsmKernel, tmp_path: Path
) -> None:
    kernel.provider = "sev_guest"
    certs = _snp_certs()
    att = ConfigfsTsmProvider(tmp_path / "report", snp_certificates=certs).attest(bytes(64))
    assert [decode_b64(c) for c in att.certificates] == certs


# -- dev ------------------------------------------------------------------------------------


def test_dev_attestation_labelled_and_rejected_by_default() -> None:
    provider = DevProvider(bytes(32), clock_ms=lambda: 1_795_000_000_000)
    att = attest_node(provider, **KEYS)
    assert att.kind == "dev" and att.provider == "dev"
    statement = json.loads(att.evidence_bytes())["statement"]
    assert statement["notice"] == DEV_NOTICE and statement["type"] == "og-dev-attestation"
    binding = binding_report_data(**KEYS)
    now = AttestationPolicy(now_unix_ms=1_795_000_001_000)
    assert verify_attestation(att, expected_report_data=binding, policy=now).reasons == (
        Reason.DEV_NOT_ALLOWED,
    )
    allowing = AttestationPolicy(now_unix_ms=1_795_000_001_000, allow_dev=True)
    verdict = verify_attestation(att, expected_report_data=binding, policy=allowing)
    assert verdict.ok and verdict.measurement == provider.public_key
    pinned = AttestationPolicy(
        now_unix_ms=1_795_000_001_000,
        allow_dev=True,
        allowed_measurements={"dev": frozenset({"00" * 32})},
    )
    assert not verify_attestation(att, expected_report_data=binding, policy=pinned).ok
    assert verify_attestation(att, expected_report_data=bytes(64), policy=allowing).reasons == (
        Reason.REPORT_DATA,
    )


def test_dev_attestation_tampering_rejected() -> None:
    att = DevProvider(clock_ms=lambda: 1000).attest(bytes(64))
    policy = AttestationPolicy(now_unix_ms=2000, allow_dev=True)
    signed = json.loads(att.evidence_bytes())
    signed["statement"]["report_data"] = "01" * 64
    forged = att.model_copy(
        update={"evidence": base64.b64encode(json.dumps(signed).encode()).decode()}
    )
    assert (
        verify_attestation(forged, expected_report_data=b"\x01" * 64, policy=policy)
        .reasons[0]
        .startswith(Reason.SIGNATURE)
    )
    assert DevProvider().public_key != DevProvider().public_key  # random unless seeded


# -- nitro ----------------------------------------------------------------------------------


def test_nitro_without_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AttestationUnavailable, match="not running inside an AWS Nitro Enclave"):
        NitroProvider(tmp_path / "nsm").attest(bytes(64))
    not_nsm = tmp_path / "file"
    not_nsm.write_bytes(b"")
    with pytest.raises(AttestationUnavailable, match="does not answer NSM requests"):
        NitroProvider(not_nsm).attest(bytes(64))


def test_nsm_messages() -> None:
    request = cbor2.loads(attestation_request(b"\x07" * 64))
    assert request == {
        "Attestation": {"user_data": b"\x07" * 64, "nonce": None, "public_key": None}
    }
    document = (DATA / "nitro_document.b64").read_text()
    raw = base64.b64decode(document)
    assert parse_response(cbor2.dumps({"Attestation": {"document": raw}})) == raw
    with pytest.raises(AttestationFailed, match="InvalidArgument"):
        parse_response(cbor2.dumps({"Error": "InvalidArgument"}))
    with pytest.raises(AttestationFailed):
        parse_response(b"\xff\x00")
    with pytest.raises(AttestationFailed):
        parse_response(cbor2.dumps({"Attestation": {}}))


# -- loader ---------------------------------------------------------------------------------


def test_loader_choices(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    no_tsm, no_nsm = tmp_path / "no-tsm", tmp_path / "no-nsm"
    assert load_attestation_provider(AttestationSettings()) is None
    dev = load_attestation_provider(
        AttestationSettings(provider="dev", dev_key=SecretStr("01" * 32))
    )
    assert isinstance(dev, DevProvider) and dev.public_key == DevProvider(b"\x01" * 32).public_key
    tdx = load_attestation_provider(AttestationSettings(provider="tdx"))
    assert isinstance(tdx, ConfigfsTsmProvider) and tdx.kind == "tdx"
    snp = load_attestation_provider(AttestationSettings(provider="sev-snp"))
    assert isinstance(snp, ConfigfsTsmProvider) and snp.kind == "sev-snp"
    assert isinstance(
        load_attestation_provider(AttestationSettings(provider="nitro")), NitroProvider
    )
    with caplog.at_level(logging.WARNING):
        fallback = load_attestation_provider(
            AttestationSettings(provider="auto", configfs_tsm_root=no_tsm, nsm_device=no_nsm)
        )
    assert isinstance(fallback, DevProvider) and "development attestation" in caplog.text
    (tmp_path / "tsm").mkdir()
    auto_tsm = load_attestation_provider(
        AttestationSettings(provider="auto", configfs_tsm_root=tmp_path / "tsm", nsm_device=no_nsm)
    )
    assert isinstance(auto_tsm, ConfigfsTsmProvider) and auto_tsm.kind is None
    (tmp_path / "nsm").write_bytes(b"")
    auto_nitro = load_attestation_provider(
        AttestationSettings(provider="auto", nsm_device=tmp_path / "nsm")
    )
    assert isinstance(auto_nitro, NitroProvider)


def test_loader_reads_collateral_and_certs(tmp_path: Path) -> None:
    collateral = tmp_path / "collateral.json"
    collateral.write_text((DATA / "tdx_quote_v4_collateral.json").read_text())
    certs = tmp_path / "certs"
    certs.mkdir()
    for name, der in zip(("vcek.der", "ask.der", "ark.der"), _snp_certs(), strict=True):
        (certs / name).write_bytes(der)
    provider = load_attestation_provider(
        AttestationSettings(provider="tdx", tdx_collateral_file=collateral, snp_certs_dir=certs)
    )
    assert isinstance(provider, ConfigfsTsmProvider)
    with pytest.raises(AttestationUnavailable, match="cannot read TDX collateral"):
        load_attestation_provider(
            AttestationSettings(provider="tdx", tdx_collateral_file=tmp_path / "none.json")
        )
    collateral.write_text("[1, 2]")
    with pytest.raises(AttestationUnavailable, match="JSON object"):
        load_attestation_provider(
            AttestationSettings(provider="tdx", tdx_collateral_file=collateral)
        )
    with pytest.raises(AttestationUnavailable, match="SEV-SNP certificates"):
        load_attestation_provider(
            AttestationSettings(provider="sev-snp", snp_certs_dir=tmp_path / "nothing")
        )
    with pytest.raises(AttestationUnavailable, match="32-byte"):
        load_attestation_provider(AttestationSettings(provider="dev", dev_key=SecretStr("0102")))


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The field a worker adds (``attestation: AttestationSettings``) reads nested env vars."""
    from pydantic import Field
    from pydantic_settings import BaseSettings, SettingsConfigDict

    class Host(BaseSettings):
        model_config = SettingsConfigDict(env_prefix="OG_WORKER_", env_nested_delimiter="__")
        attestation: AttestationSettings = Field(default_factory=AttestationSettings)

    monkeypatch.setenv("OG_WORKER_ATTESTATION__PROVIDER", "sev-snp")
    monkeypatch.setenv("OG_WORKER_ATTESTATION__CONFIGFS_TSM_ENTRY", "w0")
    settings = Host().attestation
    assert settings.provider == "sev-snp" and settings.configfs_tsm_entry == "w0"
    assert "ab" * 32 not in repr(AttestationSettings(dev_key=SecretStr("ab" * 32)))
