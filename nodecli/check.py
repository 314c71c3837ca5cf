"""``inference-node check``: exit 0 when a service's ``/readyz`` (or any health URL) passes.

For exec probes and ``docker compose`` health checks where no HTTP client is installed: it
prints the endpoint's JSON (which checks failed) and exits 0 on HTTP 200, 1 on anything else
(503, a refused connection, a timeout), 2 on a malformed URL. Also runnable before the CLI
wiring as ``python -m nodecli.check --url ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

import httpx

__all__ = ["DEFAULT_URL", "add_arguments", "add_parser", "check", "main"]

DEFAULT_URL = "http://127.0.0.1:9108/readyz"


def check(url: str = DEFAULT_URL, timeout_s: float = 3.0) -> int:
    """0 when ``url`` answers 200, 1 otherwise, 2 for a URL that is not http(s)://host..."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        sys.stderr.write(f"inference-node check: not an http(s) URL: {url!r}\n")
        return 2
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as e:
        sys.stderr.write(f"inference-node check: {url}: {type(e).__name__}\n")
        return 1
    sys.stdout.write(response.text if response.text.endswith("\n") else response.text + "\n")
    return 0 if response.status_code == 200 else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"health endpoint to query (default {DEFAULT_URL})"
    )
    parser.add_argument("--timeout-s", type=float, default=3.0)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``check`` on the ``inference-node`` sub-command parser."""
    parser = sub.add_parser("check", help="exit 0 when a service's /readyz passes (exec probe)")
    add_arguments(parser)
    parser.set_defaults(func=lambda args: check(args.url, args.timeout_s))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="inference-node check", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return check(args.url, args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
