"""Client settings (env prefix ``OG_CLIENT_``, nested ``__``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.kafka import KafkaSettings
from schemas.topics import DEFAULT_NAMESPACE

__all__ = ["ClientSettings"]


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OG_CLIENT_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    namespace: str = DEFAULT_NAMESPACE
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    reply_to: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
