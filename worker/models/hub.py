"""The model hub protocol: where model artifacts come from.

A hub lists models (``index``) and turns a ``ModelRef`` into a local path an engine can load
(``materialize``), verifying the artifact's digest on the way. Implementations: ``LocalHub``
(a directory, the default). Cross-process locks, LRU eviction and an HTTP hub fit behind the
same two methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from worker.models.refs import HubIndex, ModelRef

__all__ = ["ModelHub", "ModelIntegrityError"]


class ModelIntegrityError(Exception):
    """An artifact does not match its digest, or its archive is unsafe to unpack.

    Not a request error: the node (or the hub) is broken, so the model must not be served.
    """


@runtime_checkable
class ModelHub(Protocol):
    def index(self) -> HubIndex:
        """The models this hub serves."""
        ...

    def materialize(self, ref: ModelRef, cache_dir: Path) -> Path:
        """Return a verified local path for ``ref`` (a file or a directory, by format).

        Synchronous and possibly slow (I/O, hashing): call it through ``asyncio.to_thread``.
        """
        ...
