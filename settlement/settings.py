"""Settlement settings (env prefix ``OG_SETTLEMENT_``, nested ``__``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.admission import AdmissionSettings
from infra.kafka import KafkaSettings
from schemas.batches import MAX_PUBLISHED_LEAVES
from schemas.topics import DEFAULT_NAMESPACE, Topics
from schemas.verify.record import RecordRules
from settlement.chain import ChainSettings
from settlement.nodes import RegistrySettings

__all__ = ["ProofSettings", "SettlementSettings"]


class ProofSettings(BaseModel):
    """ZKML proof verification (``OG_SETTLEMENT_ZK__*``)."""

    vk_store_dir: Path | None = Field(
        default=None,
        description="pinned verifying keys: <dir>/<model digest>/{manifest.json,settings.json,"
        "vk.key} and <dir>/srs/<sha256>.srs (inference-node models zk-prepare --export DIR);"
        " unset: every proof record is rejected (unknown_circuit)",
    )
    allow_dev_srs: bool = Field(
        default=False, description="accept proofs made with a locally generated (dev-) SRS"
    )
    verify_timeout_s: float = Field(
        default=120.0, gt=0, description="per batch of proofs (verified in a child process)"
    )


class SettlementSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OG_SETTLEMENT_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    namespace: str = DEFAULT_NAMESPACE
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    group_id: str = "og-settlement"
    ledger_url: str = Field(
        default="var/settlement/ledger.sqlite3",
        description="a SQLite path (or sqlite:///path) or postgresql://user@host/db[?schema=s]",
    )
    max_batch: int = Field(
        default=500, ge=1, le=10_000, description="records consumed per ledger transaction"
    )
    chain: ChainSettings = Field(default_factory=ChainSettings)
    anchor: bool = Field(
        default=False, description="batch records into Merkle roots and anchor them on chain"
    )
    merkle_batch_max_records: int = Field(
        default=1000,
        ge=1,
        le=MAX_PUBLISHED_LEAVES,
        description="a batch's published leaves fit one message",
    )
    merkle_batch_max_age_s: float = Field(default=5.0, gt=0)
    publish_dir: Path | None = Field(
        default=None,
        description="also write each anchored batch's published leaves here "
        "(batch-<index>.json, the file whose sha256 is its batchRef); they always go to "
        "<namespace>.batches",
    )
    zk: ProofSettings = Field(default_factory=ProofSettings)
    max_clock_skew_s: float = Field(
        default=300.0, gt=0, description="records signed further in the future are rejected"
    )
    max_record_age_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="records signed, or whose request was created, longer before receipt are "
        "rejected (too_old): no back-dating into an old window, no replays years later",
    )
    require_payer: bool = Field(
        default=False,
        description="reject records of requests that name no payer (no_payer); "
        "else they are booked unbilled",
    )
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings,
        description="who admits nodes: records of nodes it does not count are rejected",
    )
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings,
        description="which nodes' records are accepted: registration, freshness, revocation, TEE",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65_535, description="serve /metrics /healthz /readyz; unset: off"
    )
    metrics_host: str = Field(default="127.0.0.1", description="bind address; 0.0.0.0 in a pod")
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _anchoring_needs_a_contract(self) -> SettlementSettings:
        if self.anchor and (self.chain.contract_address is None or self.chain.relayer_key is None):
            raise ValueError("anchor=true needs chain.contract_address and chain.relayer_key")
        return self

    def record_rules(self) -> RecordRules:
        return RecordRules(
            max_clock_skew_s=self.max_clock_skew_s,
            max_record_age_s=self.max_record_age_s,
            require_payer=self.require_payer,
        )

    @property
    def topics(self) -> Topics:
        return Topics(self.namespace)
