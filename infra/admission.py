"""Admission facts for the services: read from the node registry contract or from a pinned
authority's signed admission list, and kept current (``schemas.admission`` says what they
mean; ``schemas.verify.admission`` how verifiers use them).

- ``ChainAdmissions`` follows the ``NodeRegistry`` contract's events (admitted, revoked,
  measurement approved/revoked) from its deployment block on, so a snapshot knows every node
  and measurement without a per-node call; ``NodeRegistryClient`` sends governance's writes.
- ``AuthorityAdmissions`` reads a ``SignedAdmissionList`` file, accepts it only when signed by
  a pinned authority key, and never goes back to a lower ``sequence`` (a replayed old list).
- ``OpenAdmissions``: every registered node counts (closed development networks only).

``AdmissionKeeper`` refreshes a snapshot on an interval (supervise its ``run``) and hands it to
whoever holds a view; a failed refresh keeps the last snapshot and marks itself unhealthy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from web3 import AsyncHTTPProvider, AsyncWeb3
from web3.types import TxParams

from infra.contracts import load_artifact
from infra.evm import (
    ChainError,
    EvmSettings,
    account_from,
    error_selectors,
    send_transaction,
    translated,
)
from schemas.admission import ADMISSION_DOMAIN, SignedAdmissionList, verify_admission_list
from schemas.canonical import domain_digest
from schemas.verify.admission import Admissions, NodeAdmission

__all__ = [
    "AdmissionKeeper",
    "AdmissionSettings",
    "AdmissionSource",
    "AuthorityAdmissions",
    "ChainAdmissions",
    "NodeRegistryClient",
    "OpenAdmissions",
    "admission_source",
]

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class AdmissionSettings(BaseModel):
    """Who admits nodes (``OG_*_ADMISSION__*``)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["chain", "authority", "open"] = Field(
        default="chain",
        description="chain: the NodeRegistry contract; authority: a signed admission list "
        "from a pinned key; open: every registered node counts (closed development networks)",
    )
    rpc_url: str = "http://127.0.0.1:8545"
    chain_id: int = 31337
    registry_address: str | None = Field(
        default=None, description="the NodeRegistry contract (source=chain)"
    )
    from_block: int = Field(default=0, ge=0, description="the registry's deployment block")
    authority_keys: list[str] = Field(
        default_factory=list, description="pinned ed25519 keys (hex) of the list's signer"
    )
    authority_list: Path | None = Field(
        default=None, description="the SignedAdmissionList JSON file (source=authority)"
    )
    refresh_interval_s: float = Field(default=5.0, gt=0, description="how often facts refresh")
    max_stale_s: float = Field(
        default=60.0,
        gt=0,
        description="facts older than this (refreshes failing meanwhile) make the service "
        "unhealthy: it stops judging (settlement stops, clients raise) instead of trusting "
        "admissions that may have been revoked since",
    )


class AdmissionSource(Protocol):
    async def snapshot(self) -> Admissions: ...

    async def close(self) -> None: ...


class OpenAdmissions:
    async def snapshot(self) -> Admissions:
        return Admissions.everyone()

    async def close(self) -> None:
        return None


class AuthorityAdmissions:
    def __init__(self, path: Path, authority_keys: list[str]) -> None:
        if not authority_keys:
            raise ValueError("source=authority needs authority_keys (pinned signer keys)")
        self._path = path
        self._keys = {k.lower() for k in authority_keys}
        self._current: Admissions | None = None
        self._sequence = -1
        self._digest = b""

    async def snapshot(self) -> Admissions:
        raw = await asyncio.to_thread(self._path.read_bytes)
        try:
            signed = SignedAdmissionList.model_validate_json(raw)
        except ValidationError as e:
            raise ValueError("the admission list is not a signed admission list") from e
        if signed.list.authority_id not in self._keys or not verify_admission_list(signed):
            raise ValueError("the admission list is not signed by a pinned authority")
        if signed.list.sequence < self._sequence:
            raise ValueError("the admission list is older than one already seen")
        digest = domain_digest(ADMISSION_DOMAIN, signed.list)
        if signed.list.sequence == self._sequence and digest != self._digest:
            raise ValueError("two different admission lists carry the same sequence")
        self._sequence, self._digest = signed.list.sequence, digest
        self._current = Admissions.from_list(signed.list, _now_ms())
        return self._current

    async def close(self) -> None:
        return None


_EVENTS = ("NodeAdmitted", "NodeRevoked", "MeasurementApproved", "MeasurementRevoked")


class ChainAdmissions:
    """The NodeRegistry's state, rebuilt from its events (read incrementally)."""

    def __init__(self, settings: AdmissionSettings) -> None:
        if settings.registry_address is None:
            raise ValueError("source=chain needs registry_address (deploy the NodeRegistry)")
        self._w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        self._contract = self._w3.eth.contract(
            address=self._w3.to_checksum_address(settings.registry_address),
            abi=load_artifact("NodeRegistry")["abi"],
        )
        self._next_block = settings.from_block
        self._nodes: dict[str, NodeAdmission] = {}
        self._approved: set[tuple[str, str]] = set()
        self._revoked: set[tuple[str, str]] = set()
        self._source = f"chain:{settings.registry_address.lower()}"

    async def snapshot(self) -> Admissions:
        async with translated("reading the node registry"):
            head = await self._w3.eth.block_number
            if head >= self._next_block:
                events = self._contract.events
                logs: list[tuple[int, int, str, Any]] = []
                for name in _EVENTS:
                    found = await getattr(events, name).get_logs(
                        from_block=self._next_block, to_block=head
                    )
                    logs += [(e["blockNumber"], e["logIndex"], name, e["args"]) for e in found]
                # In chain order across event types: admit, revoke, admit again = admitted.
                for _, _, name, args in sorted(logs, key=lambda e: (e[0], e[1])):
                    self._apply(name, args)
                self._next_block = head + 1
        return Admissions(
            nodes=dict(self._nodes),
            approved_measurements=frozenset(self._approved),
            revoked_measurements=frozenset(self._revoked),
            source=self._source,
            as_of_unix_ms=_now_ms(),
        )

    def _apply(self, name: str, args: Any) -> None:
        if name in ("NodeAdmitted", "NodeRevoked"):
            node_id = bytes(args["nodeId"]).hex()
            if name == "NodeAdmitted":
                address = str(args["chainAddress"]).lower()
                self._nodes[node_id] = NodeAdmission(node_id, address, True)
            elif node_id in self._nodes:
                previous = self._nodes[node_id]
                self._nodes[node_id] = NodeAdmission(node_id, previous.chain_address, False)
            return
        key = (str(args["kind"]), bytes(args["measurement"]).hex())
        if name == "MeasurementApproved":
            self._approved.add(key)
            self._revoked.discard(key)
        else:
            self._revoked.add(key)
            self._approved.discard(key)

    async def close(self) -> None:
        await self._w3.provider.disconnect()


def admission_source(settings: AdmissionSettings) -> AdmissionSource:
    """The source ``settings`` name (``ValueError`` when it lacks what it needs)."""
    if settings.source == "open":
        return OpenAdmissions()
    if settings.source == "authority":
        if settings.authority_list is None:
            raise ValueError("source=authority needs authority_list (the signed list file)")
        return AuthorityAdmissions(settings.authority_list, settings.authority_keys)
    return ChainAdmissions(settings)


class AdmissionKeeper:
    """Keeps ``current`` fresh; ``on_change`` (e.g. a view's setter) gets each new snapshot."""

    def __init__(
        self,
        source: AdmissionSource,
        interval_s: float,
        on_change: Callable[[Admissions], None] | None = None,
        *,
        max_stale_s: float = 60.0,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self._source = source
        self._interval_s = interval_s
        self._on_change = on_change
        self._max_stale_ms = max_stale_s * 1000
        self._clock_ms = clock_ms
        self.current = Admissions()
        """Until the first refresh: nobody admitted (fail closed)."""
        self.failure: str | None = None
        """The last refresh's error type (None after a success)."""

    @classmethod
    def of(
        cls, settings: AdmissionSettings, on_change: Callable[[Admissions], None] | None = None
    ) -> AdmissionKeeper:
        """The keeper ``settings`` describe (``ValueError`` when they lack what it needs)."""
        return cls(
            admission_source(settings),
            settings.refresh_interval_s,
            on_change,
            max_stale_s=settings.max_stale_s,
        )

    @property
    def healthy(self) -> bool:
        """Facts are current: refreshed within ``max_stale_s`` (a transient failed refresh is
        tolerated; facts that stopped moving are not)."""
        if self.current.open:
            return True
        fetched = self.current.as_of_unix_ms
        return fetched > 0 and self._clock_ms() - fetched <= self._max_stale_ms

    async def refresh(self) -> Admissions:
        try:
            snapshot = await self._source.snapshot()
        except (ChainError, OSError, ValueError) as e:
            self.failure = type(e).__name__
            log.error("admission facts not refreshed", extra={"error_type": self.failure})
            return self.current
        self.failure = None
        self.current = snapshot
        if self._on_change is not None:
            self._on_change(snapshot)
        return snapshot

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()

    async def close(self) -> None:
        await self._source.close()


class NodeRegistryClient:
    """Governance's writes to the NodeRegistry (admit, revoke, approve measurements), and its
    deployment. One nonce lock: writes are serialised."""

    def __init__(self, settings: EvmSettings, address: str, governance_key: SecretStr) -> None:
        account = account_from(governance_key, "governance key")
        assert account is not None
        self._account = account
        self._settings = settings
        self._w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        self._contract = self._w3.eth.contract(
            address=self._w3.to_checksum_address(address),
            abi=load_artifact("NodeRegistry")["abi"],
        )
        self._lock = asyncio.Lock()
        self._errors = error_selectors(self._contract.abi)  # type: ignore[arg-type]

    @staticmethod
    async def deploy(settings: EvmSettings, governance_key: SecretStr) -> tuple[str, int]:
        """Deploy a NodeRegistry governed by ``governance_key``'s account: (address, block)."""
        account = account_from(governance_key, "governance key")
        assert account is not None
        artifact = load_artifact("NodeRegistry")
        w3 = AsyncWeb3(AsyncHTTPProvider(settings.rpc_url))
        try:
            async with translated("deploying NodeRegistry"):
                args = w3.codec.encode(["address"], [account.address])
                data = artifact["bytecode"] + args.hex()
                receipt = await send_transaction(w3, account, settings, {"data": data})
                address = receipt["contractAddress"]
                if address is None:
                    raise ChainError("deployment receipt carries no contract address")
                return str(address), int(receipt["blockNumber"])
        finally:
            await w3.provider.disconnect()

    async def admit(self, node_id: str, chain_address: str) -> None:
        await self._write("admitNode", bytes.fromhex(node_id), self._checksum(chain_address))

    async def revoke(self, node_id: str) -> None:
        await self._write("revokeNode", bytes.fromhex(node_id))

    async def approve_measurement(self, kind: str, measurement: str) -> None:
        await self._write("approveMeasurement", kind, bytes.fromhex(measurement))

    async def revoke_measurement(self, kind: str, measurement: str) -> None:
        await self._write("revokeMeasurement", kind, bytes.fromhex(measurement))

    async def is_admitted(self, node_id: str) -> bool:
        async with translated("isAdmitted"):
            call = self._contract.functions.isAdmitted(bytes.fromhex(node_id))
            return bool(await call.call())

    async def verify_result(self, node_id: str, digest: bytes, chain_signature: str) -> bool:
        """The on-chain check of one result (``NodeRegistry.verifyResult``), as a call."""
        signature = bytes.fromhex(chain_signature.removeprefix("0x"))
        async with translated("verifyResult"):
            call = self._contract.functions.verifyResult(bytes.fromhex(node_id), digest, signature)
            return bool(await call.call())

    async def verify_result_gas(self, node_id: str, digest: bytes, chain_signature: str) -> int:
        signature = bytes.fromhex(chain_signature.removeprefix("0x"))
        async with translated("verifyResult gas"):
            call = self._contract.functions.verifyResult(bytes.fromhex(node_id), digest, signature)
            return int(await call.estimate_gas())

    async def close(self) -> None:
        await self._w3.provider.disconnect()

    def _checksum(self, address: str) -> str:
        return str(self._w3.to_checksum_address(address))

    async def _write(self, function: str, *args: Any) -> None:
        data = self._contract.encode_abi(function, args=list(args))
        tx: TxParams = {"to": self._contract.address, "data": data}
        async with self._lock, translated(function, self._errors):
            await self._w3.eth.call({**tx, "from": self._account.address}, "pending")
            await send_transaction(self._w3, self._account, self._settings, tx)
