"""The model hub protocol: where model artifacts come from, and the errors of getting them.

A hub lists models (``index``, ``resolve``) and moves one artifact's bytes into a local file
(``fetch``), resuming a partial download where it can. Hubs only move bytes: the shared cache
(``worker.modelstore.cache.ModelCache``) owns digest verification, cross-process locking,
publication under the final name, eviction and in-use leases, the same for every hub.

    ModelHub (Protocol)
    ├── LocalHub    a directory with index.json and blobs (local_hub.py), the default
    └── HttpHub     the same layout served over HTTP(S), Range-resumed (http_hub.py)

Errors, by what the caller should do::

    ModelError
    ├── ModelIntegrityError   the artifact does not match its digest, or its archive is unsafe:
    │                         the hub (or the disk) is broken; never serve it
    ├── HubUnavailableError   the hub cannot be reached or refused the download: try later
    ├── CacheFullError        the byte budget cannot fit the model without evicting a model in
    │                         use: try later, or raise the budget
    └── CacheLockTimeout      another process held the model's lock too long
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from worker.modelstore.refs import HubIndex, ModelRef

__all__ = [
    "CacheFullError",
    "CacheLockTimeout",
    "HubUnavailableError",
    "ModelError",
    "ModelHub",
    "ModelIntegrityError",
]


class ModelError(Exception):
    """Something went wrong getting a model onto this node (not a request error)."""


class ModelIntegrityError(ModelError):
    """An artifact does not match its digest, or its archive is unsafe to unpack.

    Not a request error: the node (or the hub) is broken, so the model must not be served.
    """


class HubUnavailableError(ModelError):
    """The hub could not be reached, or answered with an error status; retrying may work."""


class CacheFullError(ModelError):
    """The cache's byte budget cannot fit the model: every other model is in use."""


class CacheLockTimeout(ModelError):
    """A per-model or budget lock stayed held by another process past the timeout."""


@runtime_checkable
class ModelHub(Protocol):
    def index(self) -> HubIndex:
        """The models this hub serves (may do I/O: call it through ``asyncio.to_thread``)."""
        ...

    def resolve(self, name: str) -> ModelRef:
        """The model called ``name``; ``KeyError`` if this hub does not serve it."""
        ...

    def fetch(self, ref: ModelRef, partial: Path) -> None:
        """Bring ``partial`` up to ``ref``'s whole blob, appending from its current size.

        ``partial`` may not exist yet (start from zero) or hold the first bytes of an earlier,
        interrupted fetch (resume). The hub never writes past ``ref.size_bytes``. The bytes are
        not verified here: the cache hashes the finished file. Synchronous and slow: call it
        from a thread.
        """
        ...
