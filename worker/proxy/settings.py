"""Settings of the LLM proxy: provider endpoints (keys, base URLs) and the proxied-model registry.

Part of ``WorkerSettings`` as ``proxy`` (env ``OG_WORKER_PROXY__...``), validated once at
start-up. Endpoints are named so that several models share one SDK client, one connection
pool and one circuit breaker per key; a model lists its endpoints in failover order.

Example::

    OG_WORKER_PROXY__ENDPOINTS='{"oa-1": {"provider": "openai", "api_key_env": "OPENAI_API_KEY"},
                                 "an-1": {"provider": "anthropic",
                                          "api_key_file": "/run/secrets/anthropic"}}'
    OG_WORKER_PROXY__MODELS='[{"name": "gpt-4o-mini", "provider": "openai",
                               "api_model": "gpt-4o-mini", "endpoints": ["oa-1"],
                               "prices": {"input_micros_per_mtok": 150000,
                                          "output_micros_per_mtok": 600000}}]'

Keys are ``SecretStr`` and come from the setting itself, from another environment variable
(``api_key_env``) or from a file (``api_key_file``, e.g. a mounted Kubernetes secret).
"""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from schemas import limits
from schemas.base import ModelName

__all__ = [
    "BreakerSettings",
    "Endpoint",
    "ModelPrices",
    "Provider",
    "ProxiedModel",
    "ProxySettings",
    "RetrySettings",
]


class Provider(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


DEFAULT_BASE_URLS = {
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com",
}
"""Passed explicitly so the SDKs never pick a base URL up from their own environment variables."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    """One credential at one base URL. Exactly one key source must be given."""

    provider: Provider
    base_url: str | None = None
    """Default: the provider's public API."""
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_key_file: Path | None = None

    @model_validator(mode="after")
    def _one_key_source(self) -> Endpoint:
        given = [s for s in (self.api_key, self.api_key_env, self.api_key_file) if s is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of api_key, api_key_env, api_key_file")
        return self

    @property
    def url(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS[self.provider]

    def read_key(self) -> SecretStr:
        """The key, read now (blocking file I/O: call it off the event loop). Raises
        ``ValueError`` naming the source, never the key."""
        if self.api_key is not None:
            value = self.api_key.get_secret_value()
        elif self.api_key_env is not None:
            value = os.environ.get(self.api_key_env, "")
            if not value:
                raise ValueError(f"environment variable {self.api_key_env} is empty or unset")
        else:
            assert self.api_key_file is not None
            try:
                value = self.api_key_file.read_text(encoding="utf-8").strip()
            except OSError as e:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}") from e
        if not value:
            raise ValueError("the API key is empty")
        return SecretStr(value)


class ModelPrices(_Strict):
    """Integer micro-units of ``currency`` per million tokens: no floats for money."""

    input_micros_per_mtok: int = Field(default=0, ge=0)
    output_micros_per_mtok: int = Field(default=0, ge=0)
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")


class ProxiedModel(_Strict):
    """A model this node serves by calling a provider with its own credentials."""

    name: ModelName
    """The model id clients use (topic ``<ns>.infer.<name>``)."""
    provider: Provider
    api: Literal["chat", "completions"] = "chat"
    """``chat``: OpenAI chat completions / Anthropic messages; ``completions``: OpenAI's legacy
    completions endpoint (single-prompt conversations only)."""
    api_model: str = Field(min_length=1, max_length=256)
    """The provider's model name, e.g. ``gpt-4o-mini``."""
    endpoints: list[str] = Field(min_length=1)
    """Endpoint names in failover order."""
    prices: ModelPrices = Field(default_factory=ModelPrices)
    max_tokens_cap: int | None = Field(default=None, ge=1, le=limits.MAX_NEW_TOKENS)
    """Requests asking for more ``max_tokens`` are rejected (``invalid_request``)."""
    max_concurrency: int = Field(default=32, ge=1, le=4096)
    """Provider calls in flight for this model; further requests wait (within their deadline)."""
    timeout_s: float = Field(default=60.0, gt=0, le=3600)
    """One provider call, a whole stream included. The request's deadline bounds it too."""

    @model_validator(mode="after")
    def _api_matches_provider(self) -> ProxiedModel:
        if self.api == "completions" and self.provider is not Provider.OPENAI:
            raise ValueError("api 'completions' exists only for provider openai")
        if len(set(self.endpoints)) != len(self.endpoints):
            raise ValueError("endpoints must be unique")
        return self


class RetrySettings(_Strict):
    max_attempts: int = Field(default=3, ge=1, le=10)
    """Provider calls per request, across all endpoints."""
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=8.0, ge=0)
    backoff_multiplier: float = Field(default=2.0, ge=1)
    jitter_ratio: float = Field(default=0.1, ge=0, le=1)
    """Up to this fraction of each backoff is added at random (never below the base delay)."""
    max_retry_after_s: float = Field(default=60.0, ge=0)
    """A provider asking us to wait longer than this gets no retry: we answer rate_limited."""


class BreakerSettings(_Strict):
    failure_threshold: int = Field(default=5, ge=1)
    """Consecutive failures that open an endpoint's circuit."""
    cooldown_s: float = Field(default=30.0, gt=0)
    """How long an open circuit refuses calls before letting one probe through."""


class ProxySettings(_Strict):
    endpoints: dict[str, Endpoint] = Field(default_factory=dict)
    models: list[ProxiedModel] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)

    @field_validator("endpoints")
    @classmethod
    def _endpoint_names(cls, value: dict[str, Endpoint]) -> dict[str, Endpoint]:
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError("endpoint names are 1-64 letters, digits, '-' or '_'")
        return value

    @model_validator(mode="after")
    def _references(self) -> ProxySettings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("proxied model names must be unique")
        for model in self.models:
            for name in model.endpoints:
                endpoint = self.endpoints.get(name)
                if endpoint is None:
                    raise ValueError(f"model {model.name}: unknown endpoint {name}")
                if endpoint.provider is not model.provider:
                    raise ValueError(
                        f"model {model.name}: endpoint {name} is {endpoint.provider.value}"
                    )
        return self
