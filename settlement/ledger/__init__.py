"""The settlement ledger: one row per (request id, node id), rejections with their reason, and
the Merkle batches that anchor records on chain.

``Ledger`` is the protocol; ``SqliteLedger`` (default) and ``PostgresLedger`` implement it with
the same tables and the same behaviour. ``open_ledger(url)`` picks one from a URL.
Synchronous by design; the service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from settlement.ledger.base import (
    Accepted,
    BatchConflictError,
    BatchMember,
    BatchNotFoundError,
    BatchRow,
    BatchStatus,
    Leaf,
    Ledger,
    LedgerError,
    Origin,
    ProofEntry,
    Rejection,
    Stored,
    StoredRecord,
)
from settlement.ledger.postgres import PostgresLedger
from settlement.ledger.sqlite import SqliteLedger

__all__ = [
    "Accepted",
    "BatchConflictError",
    "BatchMember",
    "BatchNotFoundError",
    "BatchRow",
    "BatchStatus",
    "Leaf",
    "Ledger",
    "LedgerError",
    "Origin",
    "PostgresLedger",
    "ProofEntry",
    "Rejection",
    "SqliteLedger",
    "Stored",
    "StoredRecord",
    "open_ledger",
]


def open_ledger(url: str) -> Ledger:
    """Open (and migrate) the ledger at ``url``.

    - ``sqlite:///relative/file.sqlite3``, ``sqlite:////absolute/file.sqlite3`` or a plain path:
      SQLite;
    - ``postgresql://...`` (or ``postgres://``): PostgreSQL. An optional ``schema=name`` query
      parameter selects the schema and is removed before the DSN reaches libpq.
    """
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [value for key, value in query if key == "schema"]
        rest = [(key, value) for key, value in query if key != "schema"]
        dsn = urlunsplit(parts._replace(query=urlencode(rest)))
        return PostgresLedger(dsn, schema=schemas[-1] if schemas else "public")
    if url.startswith("sqlite://"):
        if not url.startswith("sqlite:///"):
            raise ValueError(f"expected sqlite:///path, got {url!r}")
        return SqliteLedger(Path(url.removeprefix("sqlite:///")))
    if "://" in url:
        raise ValueError(f"unsupported ledger URL scheme: {url.split('://', 1)[0]!r}")
    return SqliteLedger(Path(url))
