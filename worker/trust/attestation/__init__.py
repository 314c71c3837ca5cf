"""Attestation providers: evidence that the node's keys live in a TEE.

One ``AttestationProvider`` protocol (``base``), one file per implementation: ``configfs_tsm``
(Intel TDX, AMD SEV-SNP), ``nitro`` (AWS Nitro Enclaves), ``dev`` (no TEE, clearly labelled).
``load_attestation_provider(settings)`` picks one; ``attest_node`` binds the node's keys.
Verification lives in ``schemas.verify.attestation``.
"""

from worker.trust.attestation.base import (
    AttestationError,
    AttestationFailed,
    AttestationProvider,
    AttestationUnavailable,
    attest_node,
)
from worker.trust.attestation.configfs_tsm import ConfigfsTsmProvider
from worker.trust.attestation.dev import DevProvider
from worker.trust.attestation.loader import load_attestation_provider
from worker.trust.attestation.nitro import NitroProvider
from worker.trust.attestation.settings import AttestationSettings

__all__ = [
    "AttestationError",
    "AttestationFailed",
    "AttestationProvider",
    "AttestationSettings",
    "AttestationUnavailable",
    "ConfigfsTsmProvider",
    "DevProvider",
    "NitroProvider",
    "attest_node",
    "load_attestation_provider",
]
