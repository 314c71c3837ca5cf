"""Model cache and hub settings: the ``cache`` field of ``WorkerSettings``.

Environment: ``OG_WORKER_CACHE__HUB_URL=https://hub.example/models``,
``OG_WORKER_CACHE__BUDGET_BYTES=20000000000``, ``OG_WORKER_CACHE__PREWARM='["demo-mlp"]'``.
The cache directory and the local hub directory stay the worker's ``cache_dir`` and
``hub_dir`` settings (``OG_WORKER_CACHE_DIR``, ``OG_WORKER_HUB_DIR``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ["CacheSettings"]


class CacheSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hub_url: str | None = Field(
        default=None,
        description="HTTP(S) hub base URL (index.json and blobs under it); when unset, the "
        "local directory hub at hub_dir",
    )
    hub_token: SecretStr | None = Field(
        default=None, description="bearer token sent to the HTTP hub"
    )
    hub_timeout_s: float = Field(default=30.0, gt=0)
    hub_attempts: int = Field(
        default=5, ge=1, le=100, description="tries per download, each resuming the last"
    )
    budget_bytes: int | None = Field(
        default=None,
        ge=1,
        description="hard limit on the bytes of models kept in cache_dir; least recently "
        "used models not in use by any process are evicted to fit a new one",
    )
    verify_cached: bool = Field(
        default=True,
        description="re-hash a cached model before every load (False: compare sizes only)",
    )
    lock_timeout_s: float = Field(
        default=1800.0, gt=0, description="how long to wait for another process's download"
    )
    prewarm: list[str] | None = Field(
        default=None,
        description="models loaded at start-up and kept loaded; default: every served model. "
        "Others load on their first request and share the engine LRU",
    )
    engine_lru_size: int = Field(
        default=4, ge=1, le=1024, description="on-demand models kept loaded at once"
    )

    @field_validator("hub_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("hub_url must start with http:// or https://")
        return value
