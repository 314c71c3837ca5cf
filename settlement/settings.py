"""Settlement settings (env prefix ``OG_SETTLEMENT_``, nested ``__``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.kafka import KafkaSettings
from schemas.topics import DEFAULT_NAMESPACE, Topics

__all__ = ["SettlementSettings"]


class SettlementSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OG_SETTLEMENT_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    namespace: str = DEFAULT_NAMESPACE
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    group_id: str = "og-settlement"
    ledger_path: Path = Path("var/settlement/ledger.sqlite3")
    max_batch: int = Field(default=500, ge=1, le=10_000)
    max_clock_skew_s: float = Field(
        default=300.0, gt=0, description="records signed further in the future are rejected"
    )
    log_level: str = "INFO"

    @property
    def topics(self) -> Topics:
        return Topics(self.namespace)
