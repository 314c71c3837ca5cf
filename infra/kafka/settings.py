"""Kafka client settings shared by the worker, settlement and clients.

A production cluster is one setting away: ``bootstrap_servers`` plus, where the cluster needs
them, SASL/TLS options. The development broker (Tansu) has no idempotent producer, so
idempotence is a setting that defaults to off; turn it on against Apache Kafka.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["KafkaSettings"]


class KafkaSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "og-inference-node"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    enable_idempotence: bool = False
    linger_ms: int = Field(default=2, ge=0)
    max_batch_size_bytes: int = Field(
        default=262_144,
        ge=16_384,
        description="producer batch per partition; aiokafka's 16 KiB default makes sends wait "
        "for a full batch to drain under load",
    )
    request_timeout_ms: int = Field(default=30_000, ge=1000)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    compression_type: Literal["gzip", "lz4", "zstd", "snappy"] | None = None
    max_request_size_bytes: int = Field(
        default=1_048_576,
        ge=65_536,
        description="largest message the producer sends (keep it at or under the broker's "
        "message.max.bytes); a larger reply is answered as output_too_large instead",
    )
    fetch_max_wait_ms: int = Field(
        default=500,
        ge=0,
        description="how long a fetch may wait for data; Tansu answers a waiting fetch only "
        "when this runs out, so 10-50 ms cuts latency there (Apache Kafka answers on arrival)",
    )

    def _common(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
        }
        if self.sasl_mechanism is not None:
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            if self.sasl_password is not None:
                kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    def admin_kwargs(self) -> dict[str, Any]:
        """For the admin client (topic provisioning): the connection and security options."""
        kwargs = self._common()
        kwargs.pop("request_timeout_ms")
        return kwargs

    def producer_kwargs(self) -> dict[str, Any]:
        """acks=all always: a reply counts as sent only once the cluster has it durably."""
        return {
            **self._common(),
            "acks": "all",
            "enable_idempotence": self.enable_idempotence,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size_bytes,
            "compression_type": self.compression_type,
            "max_request_size": self.max_request_size_bytes,
        }

    def consumer_kwargs(self, group_id: str | None) -> dict[str, Any]:
        """Manual commits only: offsets are committed after the work is answered."""
        return {
            **self._common(),
            "group_id": group_id,
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "max_poll_interval_ms": self.max_poll_interval_ms,
            "fetch_max_wait_ms": self.fetch_max_wait_ms,
        }
