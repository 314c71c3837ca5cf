"""Client settings (env prefix ``OG_CLIENT_``, nested ``__``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.admission import AdmissionSettings
from infra.kafka import KafkaSettings
from schemas.topics import DEFAULT_NAMESPACE
from schemas.verify.attestation import AttestationPolicySettings

__all__ = ["ClientSettings"]


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OG_CLIENT_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    namespace: str = DEFAULT_NAMESPACE
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    reply_to: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings,
        description="who admits nodes: replies are accepted only from nodes it counts",
    )
    attestation: AttestationPolicySettings = Field(
        default_factory=AttestationPolicySettings,
        description="which TEE evidence counts (sealing and TEE requests need it)",
    )
    seal_to_attested_only: bool = Field(
        default=True,
        description="seal requests only to nodes whose TEE evidence verifies (a sealed "
        "request's prompt is readable by every recipient)",
    )
