"""AWS Nitro Enclaves evidence from the Nitro Secure Module (``/dev/nsm``).

Inside an enclave the NSM driver takes one ioctl, ``NSM_IOCTL_REQUEST`` =
``_IOWR(0x0A, 0, struct nsm_message)``, where ``nsm_message`` is two ``struct iovec``s
(request, response). The request is CBOR ``{"Attestation": {"user_data": bytes | null,
"nonce": bytes | null, "public_key": bytes | null}}``; the answer is CBOR
``{"Attestation": {"document": bytes}}`` or ``{"Error": "<code>"}``
(aws-nitro-enclaves-nsm-api). The node's 64-byte binding goes in ``user_data``; the document
is a COSE_Sign1 signed by a key that chains to AWS's Nitro root
(``schemas.verify.attestation.nitro``).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2

from schemas.attestation import Attestation, encode_b64
from worker.trust.attestation.base import (
    AttestationFailed,
    AttestationUnavailable,
    check_report_data,
)

__all__ = ["DEFAULT_NSM_DEVICE", "NitroProvider", "attestation_request", "parse_response"]

DEFAULT_NSM_DEVICE = Path("/dev/nsm")
NSM_REQUEST_MAX_BYTES = 0x1000
NSM_RESPONSE_MAX_BYTES = 0x3000
_IOC_READ_WRITE = 3
_NSM_MESSAGE = struct.Struct("=QQQQ")  # two struct iovec {void *base; size_t len} (64-bit)
NSM_IOCTL_REQUEST = (
    (_IOC_READ_WRITE << 30) | (_NSM_MESSAGE.size << 16) | (0x0A << 8) | 0
)  # 0xC0200A00


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def attestation_request(
    user_data: bytes, *, nonce: bytes | None = None, public_key: bytes | None = None
) -> bytes:
    """The CBOR request the NSM expects."""
    return cbor2.dumps(
        {"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}}
    )


def parse_response(raw: bytes) -> bytes:
    """The attestation document from an NSM response; raises ``AttestationFailed``."""
    try:
        answer: Any = cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError) as e:
        raise AttestationFailed("NSM answered something that is not CBOR") from e
    if isinstance(answer, dict) and "Error" in answer:
        raise AttestationFailed(f"NSM refused the request ({str(answer['Error'])[:64]})")
    try:
        document = answer["Attestation"]["document"]
    except (KeyError, TypeError) as e:
        raise AttestationFailed("NSM answer has no attestation document") from e
    if not isinstance(document, bytes) or not document:
        raise AttestationFailed("NSM attestation document is not bytes")
    return document


class NitroProvider:
    name = "nitro"

    def __init__(
        self, device: Path = DEFAULT_NSM_DEVICE, *, clock_ms: Callable[[], int] = _now_ms
    ) -> None:
        self.device = device
        self._clock_ms = clock_ms

    def __repr__(self) -> str:
        return f"NitroProvider(device={str(self.device)!r})"

    def attest(self, report_data: bytes) -> Attestation:
        check_report_data(report_data)
        document = parse_response(self._call(attestation_request(report_data)))
        return Attestation(
            kind="nitro",
            evidence=encode_b64(document),
            report_data=report_data.hex(),
            issued_unix_ms=self._clock_ms(),
            provider="nsm",
        )

    def _call(self, request: bytes) -> bytes:
        if len(request) > NSM_REQUEST_MAX_BYTES:
            raise AttestationFailed("NSM request too large")
        try:
            fd = os.open(self.device, os.O_RDWR)
        except FileNotFoundError as e:
            raise AttestationUnavailable(
                f"no Nitro Secure Module at {self.device}: not running inside an AWS Nitro "
                "Enclave (the nsm driver exposes /dev/nsm only there)"
            ) from e
        except PermissionError as e:
            raise AttestationUnavailable(f"no permission to open {self.device}") from e
        try:
            req_buf = ctypes.create_string_buffer(request, len(request))
            resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_BYTES)
            message = bytearray(
                _NSM_MESSAGE.pack(
                    ctypes.addressof(req_buf),
                    len(request),
                    ctypes.addressof(resp_buf),
                    NSM_RESPONSE_MAX_BYTES,
                )
            )
            try:
                fcntl.ioctl(fd, NSM_IOCTL_REQUEST, message, True)
            except OSError as e:
                if e.errno in (errno.ENOTTY, errno.EINVAL):
                    raise AttestationUnavailable(
                        f"{self.device} does not answer NSM requests ({e.strerror})"
                    ) from e
                raise AttestationFailed(f"NSM request failed ({e.strerror})") from e
            _, _, _, response_len = _NSM_MESSAGE.unpack(bytes(message))
            return resp_buf.raw[: min(response_len, NSM_RESPONSE_MAX_BYTES)]
        finally:
            os.close(fd)
