"""Worker settings, validated once at start-up (env prefix ``OG_WORKER_``, nested ``__``).

Example: ``OG_WORKER_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 OG_WORKER_MODELS='["demo-mlp"]'``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.admission import AdmissionSettings
from infra.kafka import KafkaSettings
from infra.tracing import TracingSettings
from schemas.topics import DEFAULT_NAMESPACE, Topics
from worker.modelstore.settings import CacheSettings
from worker.proxy.settings import ProxySettings
from worker.trust.attestation.settings import AttestationSettings
from worker.zkml.settings import ZkSettings

__all__ = ["WorkerSettings"]


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OG_WORKER_", env_nested_delimiter="__", env_file=".env", extra="ignore"
    )

    namespace: str = DEFAULT_NAMESPACE
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    group_id: str = "og-workers"
    models: list[str] = Field(default_factory=lambda: ["demo-mlp", "demo-lm"], min_length=1)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    hub_dir: Path = Path("var/hub")
    cache_dir: Path = Path("var/cache")
    cache: CacheSettings = Field(
        default_factory=CacheSettings,
        description="model hub (local dir or HTTP), shared cache budget, pre-warm list",
    )
    key_dir: Path = Path("var/keys")
    node_key: SecretStr | None = Field(
        default=None, description="hex ed25519 seed; when unset a key file in key_dir is used"
    )
    dlq_public_key: str | None = Field(
        default=None,
        description="hex X25519 key that DLQ payloads are sealed to; default: key_dir/dlq",
    )
    x25519_key: SecretStr | None = Field(
        default=None,
        description="hex X25519 seed that sealed requests are opened with; default: key_dir file",
    )
    chain_key: SecretStr | None = Field(
        default=None,
        description="hex secp256k1 key of the node's chain account; default: key_dir file",
    )
    admission: AdmissionSettings = Field(
        default_factory=AdmissionSettings,
        description="who admits this node: it serves only once admitted (and answers "
        "not_admitted after a revocation)",
    )
    reply_topic_prefixes: list[str] | None = Field(
        default=None,
        description="reply topics a request may name besides <ns>.replies (which must exist); "
        "default: [<ns>.replies.]",
    )
    max_request_age_s: float = Field(
        default=3600.0,
        gt=0,
        description="requests created longer ago are refused (stale_request): no replays",
    )
    private_models: list[str] = Field(
        default_factory=list,
        description="models (among those served) that accept sealed requests only",
    )
    attestation: AttestationSettings = Field(
        default_factory=AttestationSettings,
        description="TEE evidence binding the node keys, carried in the registration",
    )
    zk: ZkSettings = Field(
        default_factory=ZkSettings, description="ZKML proofs (EZKL) for ONNX models"
    )
    heartbeat_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="registry heartbeat period"
    )
    window_per_partition: int = Field(default=64, ge=1, le=4096)
    max_in_flight: int = Field(default=256, ge=1, le=65_536)
    commit_interval_ms: int = Field(default=100, ge=10)
    drain_timeout_s: float = Field(default=20.0, gt=0)
    revoke_timeout_s: float = Field(default=10.0, gt=0)
    max_execution_s: float = Field(
        default=300.0,
        gt=0,
        description="longest one request may run (its deadline, when sooner, bounds it too); "
        "past it the request is aborted and answered timeout, so its partition moves on",
    )
    engine_retries: int = Field(default=2, ge=0, le=10)
    engine_retry_backoff_ms: int = Field(default=100, ge=0)
    dedupe_window: int = Field(default=10_000, ge=0)
    metrics_port: int | None = Field(
        default=None, ge=0, le=65_535, description="serve /metrics /healthz /readyz; unset: off"
    )
    metrics_host: str = Field(default="127.0.0.1", description="bind address; 0.0.0.0 in a pod")
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    log_level: str = "INFO"

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str]) -> list[str]:
        topics = Topics()
        for name in value:
            topics.infer(name)
        if len(set(value)) != len(value):
            raise ValueError("models must be unique")
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.namespace)
