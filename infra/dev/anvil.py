"""Start, probe and stop the local development chain (anvil) used by the stack and tests.

Why this module exists: the settlement service anchors batch roots on a contract, and in
development and CI that contract lives on anvil, the Foundry project's local node. The npm
package ``@foundry-rs/anvil`` (installed under ``infra/node`` by ``npm ci --prefix infra/node``)
ships the native binary; we spawn the platform binary directly rather than the npm ``bin.mjs``
wrapper, so the pid we record is anvil's own and stopping it leaves no orphan behind.

Anvil facts this module relies on (anvil 1.7.1):

- The chain lives in memory: a restart forgets every block, contract and balance.
- It mines a block per transaction by default (``block_time_s=None``); ``--block-time``
  switches to interval mining.
- It prefunds ten accounts derived from the well-known test mnemonic (:data:`DEV_MNEMONIC`).
  Their keys are public knowledge: development only, never on a real network.
- Readiness is a JSON-RPC ``eth_chainId`` answered with the chain id we asked for, which also
  tells anvil apart from any other program holding the port.

Exceptions::

    ChainError                  anvil cannot be found, started, or did not become ready
    └── ChainAlreadyRunning     a JSON-RPC node already answers on the requested port
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from infra.dev.broker import free_port
from infra.dev.processes import port_open, spawn, stop_pidfile, terminate, wait_started

__all__ = [
    "DEV_ACCOUNTS",
    "DEV_MNEMONIC",
    "AnvilProcess",
    "ChainAlreadyRunning",
    "ChainError",
    "anvil_binary",
    "dev_private_key",
    "rpc_chain_id",
    "rpc_ready",
    "running_anvil",
    "start_anvil",
    "stop_anvil",
]

INSTALL_HINT = "install the npm chain tooling with `npm ci --prefix infra/node`"
NODE_MODULES = Path(__file__).resolve().parents[1] / "node" / "node_modules"

DEV_MNEMONIC = "test test test test test test test test test test test junk"
"""Anvil's default mnemonic. Its keys are public: **development and tests only**."""

DEV_ACCOUNTS: tuple[str, ...] = (
    "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
    "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
    "0x15d34AAf54267DB7D7c367839AAf71A00a2C6A65",
    "0x9965507D1a55bcC2695C58ba16FB37d819B0A4dc",
    "0x976EA74026E726554dB657fA54763abd0C3a0aa9",
    "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955",
    "0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f",
    "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
)
"""Addresses of anvil's ten prefunded accounts (index ``i`` ↔ :func:`dev_private_key` ``(i)``)."""


class ChainError(Exception):
    """The anvil binary is missing, or anvil could not be started or reached."""


class ChainAlreadyRunning(ChainError):
    """A JSON-RPC node already answers on the requested port (callers may reuse it)."""


@dataclass(frozen=True)
class AnvilProcess:
    """An anvil started by :func:`running_anvil`."""

    host: str
    port: int
    pid: int
    chain_id: int
    log_path: Path

    @property
    def rpc_url(self) -> str:
        """The HTTP JSON-RPC endpoint, e.g. ``http://127.0.0.1:8545``."""
        return f"http://{self.host}:{self.port}"


def anvil_binary() -> Path:
    """Return the native anvil binary from ``infra/node/node_modules/@foundry-rs``.

    The platform package (``anvil-linux-amd64``, ``anvil-darwin-arm64``, ...) is preferred over
    the ``bin.mjs`` wrapper so the process we start is anvil itself. Raises :class:`ChainError`
    with an install hint when it is missing.
    """
    scope = NODE_MODULES / "@foundry-rs"
    for candidate in sorted(scope.glob("anvil-*/bin/anvil")):
        if candidate.is_file():
            return candidate
    raise ChainError(f"the anvil binary is missing under {scope}: {INSTALL_HINT}")


def rpc_chain_id(url: str, timeout_s: float = 1.0) -> int | None:
    """The chain id a JSON-RPC node at ``url`` reports, or None if nothing valid answers."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an HTTP(S) JSON-RPC url: {url!r}")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []})
    request = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            reply = json.loads(response.read(1 << 16))
        result = reply["result"]
        return int(result, 16) if isinstance(result, str) else None
    except (OSError, ValueError, KeyError, TypeError):
        # URLError and timeouts are OSErrors; JSONDecodeError is a ValueError.
        return None


def rpc_ready(url: str, timeout_s: float = 1.0) -> bool:
    """True when a JSON-RPC node at ``url`` answers ``eth_chainId``."""
    return rpc_chain_id(url, timeout_s) is not None


def start_anvil(
    host: str = "127.0.0.1",
    port: int = 8545,
    *,
    log_path: Path,
    pid_path: Path | None = None,
    detach: bool = False,
    chain_id: int = 31337,
    block_time_s: float | None = None,
    ready_timeout_s: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start anvil on ``host:port`` and return once it answers with ``chain_id``.

    Output goes to ``log_path``. With ``detach=True`` anvil runs in its own session so it
    outlives the caller (``make`` / ``stack up``); stop it later with :func:`stop_anvil` and
    ``pid_path``. ``block_time_s=None`` mines one block per transaction. Raises
    :class:`ChainAlreadyRunning` when a JSON-RPC node already answers on the port, and
    :class:`ChainError` when something else holds it, when anvil exits early (the message
    carries the end of its log) or is not ready within ``ready_timeout_s``.
    """
    url = f"http://{host}:{port}"
    if port_open(host, port):
        if rpc_ready(url):
            raise ChainAlreadyRunning(f"a JSON-RPC node is already running on {url}")
        raise ChainError(f"port {host}:{port} is in use by something that is not a chain node")
    args = [
        str(anvil_binary()),
        "--host",
        host,
        "--port",
        str(port),
        "--chain-id",
        str(chain_id),
    ]
    if block_time_s is not None:
        args += ["--block-time", f"{block_time_s:g}"]
    proc = spawn(args, log_path=log_path, detach=detach)
    wait_started(
        proc,
        lambda: rpc_chain_id(url, timeout_s=0.5) == chain_id,
        what=f"anvil on {url}",
        log_path=log_path,
        timeout_s=ready_timeout_s,
        error=ChainError,
        pid_path=pid_path,
    )
    return proc


def stop_anvil(pid_path: Path, timeout_s: float = 5.0) -> bool:
    """Stop the anvil whose pid is in ``pid_path``; return False if none was running.

    SIGTERM, then SIGKILL after ``timeout_s``; a stale pid file is removed without signalling
    (see :func:`infra.dev.processes.stop_pidfile`).
    """
    return stop_pidfile(pid_path, marker=b"anvil", timeout_s=timeout_s)


@contextlib.contextmanager
def running_anvil(
    port: int | None = None,
    *,
    log_dir: Path,
    host: str = "127.0.0.1",
    chain_id: int = 31337,
    block_time_s: float | None = None,
) -> Iterator[AnvilProcess]:
    """Run anvil for the duration of a ``with`` block (tests); a free port by default."""
    chosen_port = free_port() if port is None else port
    log_path = log_dir / f"anvil-{chosen_port}.log"
    proc = start_anvil(
        host, chosen_port, log_path=log_path, chain_id=chain_id, block_time_s=block_time_s
    )
    try:
        yield AnvilProcess(
            host=host, port=chosen_port, pid=proc.pid, chain_id=chain_id, log_path=log_path
        )
    finally:
        terminate(proc, timeout_s=5.0)


@functools.cache
def dev_private_key(index: int) -> str:
    """Anvil's well-known private key for dev account ``index`` (0..9), as ``0x`` hex.

    **Development only.** These keys are derived from the public :data:`DEV_MNEMONIC`
    (``m/44'/60'/0'/0/{index}``) and are known to everyone: anything they control on a real
    network is stolen at once. Pass the result straight into a ``SecretStr`` setting.
    """
    if not 0 <= index < len(DEV_ACCOUNTS):
        raise ValueError(f"anvil has dev accounts 0..{len(DEV_ACCOUNTS) - 1}, not {index}")
    from eth_account import Account  # web3's dependency; imported only where keys are derived

    Account.enable_unaudited_hdwallet_features()
    account = Account.from_mnemonic(DEV_MNEMONIC, account_path=f"m/44'/60'/0'/0/{index}")
    if account.address != DEV_ACCOUNTS[index]:  # pragma: no cover - guards the table above
        raise ChainError(f"dev account {index} derived as {account.address}, not the anvil one")
    return "0x" + bytes(account.key).hex()
