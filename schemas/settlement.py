"""Settlement records on ``<ns>.settlement``. Kafka key: the node id.

A record repeats the signed envelope of a result (hashes only, no user data) so the settlement
service can verify and account for it without seeing the prompt or the output.
"""

from __future__ import annotations

from typing import Literal

from schemas.base import ChainSignature, Hex64, WireModel
from schemas.results import ResultEnvelope
from schemas.version import SCHEMA_VERSION, SchemaVersion

__all__ = ["SettlementRecord"]


class SettlementRecord(WireModel):
    schema_version: SchemaVersion = SCHEMA_VERSION
    type: Literal["settlement_record"] = "settlement_record"
    envelope: ResultEnvelope
    signature: Hex64
    chain_signature: ChainSignature
