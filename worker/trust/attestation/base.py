"""The attestation provider contract, its errors, and the one call registration makes.

    AttestationError
    ├── AttestationUnavailable   this machine has no such TEE interface (device or configfs
    │                            entry missing, no permission, another TEE kind): a
    │                            configuration problem, so the worker exits with this message
    └── AttestationFailed        the interface exists but did not produce evidence (driver
                                 error, concurrent writer, malformed answer): retrying may help

Providers are synchronous (the kernel interfaces are blocking file and ioctl calls that take
milliseconds); the worker calls them through ``asyncio.to_thread`` at start-up and on
re-attestation, never on the request path.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from schemas.attestation import REPORT_DATA_BYTES, Attestation, binding_report_data

__all__ = [
    "AttestationError",
    "AttestationFailed",
    "AttestationProvider",
    "AttestationUnavailable",
    "attest_node",
    "check_report_data",
]


class AttestationError(Exception):
    """Base of provider errors. Messages name paths and causes, never key material."""


class AttestationUnavailable(AttestationError):
    pass


class AttestationFailed(AttestationError):
    pass


@runtime_checkable
class AttestationProvider(Protocol):
    """Produces evidence binding 64 bytes of ``report_data``."""

    @property
    def name(self) -> str:
        """Short label for logs: ``configfs-tsm``, ``nitro``, ``dev``."""
        ...

    def attest(self, report_data: bytes) -> Attestation:
        """Evidence whose hardware-signed report_data is exactly ``report_data`` (64 bytes)."""
        ...


def check_report_data(report_data: bytes) -> None:
    if len(report_data) != REPORT_DATA_BYTES:
        raise ValueError(f"report_data must be {REPORT_DATA_BYTES} bytes")


def attest_node(
    provider: AttestationProvider,
    *,
    node_id: str,
    x25519_public_key: str,
    chain_address: str,
) -> Attestation:
    """Evidence binding the node's three public keys (``schemas.attestation``): what the
    registration carries. Blocking: call it through ``asyncio.to_thread``."""
    binding = binding_report_data(
        node_id=node_id, x25519_public_key=x25519_public_key, chain_address=chain_address
    )
    return provider.attest(binding)
