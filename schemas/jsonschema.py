"""JSON Schema export of every wire message, for producers in other languages."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from schemas.admission import SignedAdmissionList
from schemas.dlq import DlqEntry
from schemas.inclusion import InclusionProof
from schemas.proofs import ProofRecord
from schemas.registry import RegistrationRecord
from schemas.requests import InferenceRequest
from schemas.results import Reply
from schemas.sealed import SealedPlaintext
from schemas.settlement import SettlementRecord

__all__ = ["all_schemas"]


def all_schemas() -> dict[str, dict[str, Any]]:
    """Message name -> JSON Schema (draft 2020-12, as pydantic emits it)."""
    return {
        "InferenceRequest": InferenceRequest.model_json_schema(),
        "Reply": TypeAdapter(Reply).json_schema(),
        "SettlementRecord": SettlementRecord.model_json_schema(),
        "ProofRecord": ProofRecord.model_json_schema(),
        "RegistrationRecord": RegistrationRecord.model_json_schema(),
        "SignedAdmissionList": SignedAdmissionList.model_json_schema(),
        "DlqEntry": DlqEntry.model_json_schema(),
        "InclusionProof": InclusionProof.model_json_schema(),
        "SealedPlaintext": SealedPlaintext.model_json_schema(),
    }
