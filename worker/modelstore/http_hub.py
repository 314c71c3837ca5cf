"""A model hub served over HTTP(S): ``<base>/index.json`` and blobs at ``<base>/<uri>``.

The layout is the local hub's, so any static file server (nginx, S3 behind a CDN, ``python -m
http.server`` on a hub directory) can serve one. Downloads resume: when the cache's partial
file already holds N bytes, the request carries ``Range: bytes=N-``; a ``206`` with a matching
``Content-Range`` is appended, a ``200`` (server ignores ranges) starts over. A connection that
drops mid-body is retried from wherever the partial file got to, with backoff, up to
``attempts`` times. The hub never writes past the size its index declares.

Status handling: 5xx, 408 and 429 are transient (retried); other 4xx fail at once
(``HubUnavailableError``). A ``416`` on a resume means the blob is shorter than the index says,
which is the hub's integrity problem, not a network one.

A client is opened per operation rather than kept for the process: downloads are rare and
long, so a pool buys nothing, and no connection outlives the call that needed it.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import quote

import httpx
from pydantic import SecretStr, ValidationError

from worker.modelstore.hub import HubUnavailableError, ModelIntegrityError
from worker.modelstore.local_hub import INDEX_FILE
from worker.modelstore.refs import HubIndex, ModelRef

__all__ = ["HttpHub"]

_MAX_INDEX_BYTES = 16 << 20
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class _Retry(Exception):
    """One attempt failed in a way the next attempt may fix."""


class HttpHub:
    """Implements ``worker.modelstore.hub.ModelHub`` over HTTP(S)."""

    def __init__(
        self,
        base_url: str,
        *,
        token: SecretStr | None = None,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError("hub URL must start with http:// or https://")
        self.base_url = base_url.rstrip("/") + "/"
        self._token = token
        self._timeout = httpx.Timeout(timeout_s)
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._transport = transport

    def __repr__(self) -> str:
        return f"HttpHub({self.base_url!r})"  # never the token

    def index(self) -> HubIndex:
        """GET ``index.json`` (at most 16 MiB), retrying transient failures."""
        url = self.base_url + INDEX_FILE
        for attempt in range(1, self._attempts + 1):
            try:
                with self._client() as client, client.stream("GET", url) as response:
                    self._check_status(response, "index")
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > _MAX_INDEX_BYTES:
                            raise HubUnavailableError("hub index is larger than 16 MiB")
                try:
                    return HubIndex.model_validate_json(bytes(body))
                except ValidationError as e:
                    raise HubUnavailableError(
                        f"hub index is not a valid index ({e.error_count()} errors)"
                    ) from e
            except (_Retry, httpx.TransportError) as e:
                self._pause_or_give_up(attempt, "index", e)
        raise AssertionError("unreachable")  # pragma: no cover

    def resolve(self, name: str) -> ModelRef:
        return self.index().get(name)

    def fetch(self, ref: ModelRef, partial: Path) -> None:
        """Bring ``partial`` up to the whole blob, resuming (see ``ModelHub.fetch``)."""
        url = self.base_url + quote(ref.uri, safe="/")
        for attempt in range(1, self._attempts + 1):
            offset = partial.stat().st_size if partial.exists() else 0
            if offset > ref.size_bytes:
                partial.unlink()
                offset = 0
            if offset == ref.size_bytes:
                return
            try:
                self._fetch_once(ref, url, partial, offset)
            except (_Retry, httpx.TransportError) as e:
                self._pause_or_give_up(attempt, f"model {ref.name}", e)
                continue
            if partial.stat().st_size == ref.size_bytes:
                return
            # The server ended a response early without an error: resume.
            self._pause_or_give_up(attempt, f"model {ref.name}", _Retry("short body"))

    def _fetch_once(self, ref: ModelRef, url: str, partial: Path, offset: int) -> None:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        with self._client() as client, client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:
                raise ModelIntegrityError(
                    f"model {ref.name}: the hub's blob is shorter than the {ref.size_bytes} "
                    "bytes its index declares"
                )
            self._check_status(response, f"model {ref.name}")
            if response.status_code == 206:
                if _range_start(response.headers.get("content-range")) != offset:
                    partial.unlink()  # not the range we asked for: start clean next time
                    raise _Retry("unexpected Content-Range")
                mode, written = "ab", offset
            else:
                mode, written = "wb", 0  # a full body: the server ignored (or lacks) ranges
            with partial.open(mode) as out:
                try:
                    for chunk in response.iter_bytes():
                        written += len(chunk)
                        if written > ref.size_bytes:
                            raise ModelIntegrityError(
                                f"model {ref.name}: the hub sent more than the "
                                f"{ref.size_bytes} bytes its index declares"
                            )
                        out.write(chunk)
                finally:
                    out.flush()  # keep what arrived: the next attempt resumes from it

    def _client(self) -> httpx.Client:
        headers = {}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        return httpx.Client(
            headers=headers,
            timeout=self._timeout,
            follow_redirects=True,
            transport=self._transport,
        )

    def _check_status(self, response: httpx.Response, what: str) -> None:
        status = response.status_code
        if status in (200, 206):
            return
        if status in _TRANSIENT_STATUS:
            raise _Retry(f"HTTP {status}")
        raise HubUnavailableError(f"hub answered HTTP {status} for {what}")

    def _pause_or_give_up(self, attempt: int, what: str, error: Exception) -> None:
        if attempt >= self._attempts:
            # The type and status only: a URL may carry credentials in a query string.
            detail = str(error) if isinstance(error, _Retry) else type(error).__name__
            raise HubUnavailableError(
                f"hub unavailable for {what} after {attempt} attempts ({detail})"
            ) from error
        time.sleep(self._backoff_s * 2 ** (attempt - 1))


def _range_start(content_range: str | None) -> int | None:
    """The first byte of ``Content-Range: bytes START-END/TOTAL``."""
    if not content_range or not content_range.startswith("bytes "):
        return None
    try:
        return int(content_range[6:].split("-", 1)[0])
    except ValueError:
        return None
