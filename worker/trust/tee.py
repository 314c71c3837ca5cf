"""TEE mode: results a node signs inside an attested environment.

Nothing extra happens per request: the guarantee comes from the node's registration, whose
attestation binds the signing key to a measured TEE image. The node accepts TEE requests only
when it has hardware evidence (``dev`` evidence only with ``attestation.allow_dev_tee``);
settlement and clients accept TEE-mode records only from nodes whose
evidence verifies under their policy (``schemas.verify.registry``).
"""

from __future__ import annotations

from schemas.attestation import Attestation
from schemas.requests import InferenceRequest
from schemas.results import ResultEnvelope
from worker.engines.base import EngineResult

__all__ = ["TeeMode"]


class TeeMode:
    """``ModeHandler`` for ``VerificationMode.TEE``."""

    def __init__(self, attestation: Attestation | None, *, allow_dev: bool = False) -> None:
        self._allow_dev = allow_dev
        self._attested = False
        self.update(attestation)

    def update(self, attestation: Attestation | None) -> None:
        """Re-attestation: fresh evidence replaces the old. Development evidence proves
        nothing, so it serves TEE requests only where a development setting says so."""
        self._attested = attestation is not None and (attestation.kind != "dev" or self._allow_dev)

    def accepts(self, model: str) -> bool:
        return self._attested

    def signed(
        self, request: InferenceRequest, result: EngineResult, envelope: ResultEnvelope
    ) -> None:
        return None
