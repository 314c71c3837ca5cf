"""``inference-node stack up|down|status``: the local development stack.

Everything runs as detached processes tracked by pid files under the state directory (default
``var/``): the Tansu broker, an anvil chain with the Settlement and NodeRegistry contracts, one
worker and the settlement service (anchoring Merkle roots on that chain); logs go to
``var/log``. Admission is on chain, as in production: ``up`` admits the worker's node id and
chain address on the NodeRegistry (governance: anvil's dev account 1) before the worker starts,
and every service and client reads admission from that contract. The worker attests with the
development provider (no TEE here), so sealed requests work for clients that allow
development evidence (``inference-node request --sealed --allow-dev``). ``up`` is
idempotent: a component already running is left alone. The worker and settlement serve
``/metrics``, ``/healthz`` and ``/readyz`` (ports 9108 and 9109 by default, as in the deploy
manifests, so ``inference-node check`` works on the stack as it is); ``up`` waits until both
``/readyz`` answer 200, and ``status`` reports each service's readiness from it. The chain
uses anvil's well-known development key as relayer: for local use only.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from infra.admission import AdmissionSettings, NodeRegistryClient
from infra.dev.anvil import (
    DEV_ACCOUNTS,
    ChainAlreadyRunning,
    dev_private_key,
    rpc_ready,
    start_anvil,
    stop_anvil,
)
from infra.dev.broker import BrokerAlreadyRunning, kafka_api_versions_ok, start_broker, stop_broker
from infra.dev.demo_models import build_demo_hub
from infra.dev.processes import running_pid, stop_pidfile
from infra.dev.readiness import probe, wait_ready
from infra.kafka.admin import ensure_topics
from schemas.topics import standard_topics
from settlement.chain import ChainError, ChainSettings, SettlementChain

__all__ = [
    "StackConfig",
    "local_admission",
    "local_chain",
    "stack_down",
    "stack_status",
    "stack_up",
]

DEMO_MODELS = ("demo-mlp", "demo-lm")
_SERVICES = ("worker", "settlement")
_MARKER = b"nodecli"


@dataclass(frozen=True)
class StackConfig:
    state_dir: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 9092
    namespace: str = "og"
    chain_port: int = 8545
    worker_metrics_port: int = 9108
    settlement_metrics_port: int = 9109
    ready_timeout_s: float = 120.0

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.chain_port}"

    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)

    def metrics_port(self, service: str) -> int:
        return self.worker_metrics_port if service == "worker" else self.settlement_metrics_port


def _health_base(cfg: StackConfig, service: str) -> str:
    """The service's health server, as recorded when it was started (so ``status`` finds a
    service started on other ports), else as configured."""
    record = cfg.path("run", f"{service}.health")
    if record.exists():
        return record.read_text().strip()
    return f"http://{cfg.host}:{cfg.metrics_port(service)}"


def _service_env(cfg: StackConfig, service: str) -> dict[str, str]:
    prefix = "OG_WORKER_" if service == "worker" else "OG_SETTLEMENT_"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("OG_WORKER_", "OG_SETTLEMENT_"))
    }
    env |= {
        prefix + "KAFKA__BOOTSTRAP_SERVERS": cfg.bootstrap,
        prefix + "NAMESPACE": cfg.namespace,
        prefix + "METRICS_HOST": cfg.host,
        prefix + "METRICS_PORT": str(cfg.metrics_port(service)),
    }
    if service == "worker":
        env |= {
            "OG_WORKER_MODELS": json.dumps(list(DEMO_MODELS)),
            "OG_WORKER_HUB_DIR": str(cfg.path("hub")),
            "OG_WORKER_CACHE_DIR": str(cfg.path("cache")),
            "OG_WORKER_KEY_DIR": str(cfg.path("keys")),
        }
        env |= {
            "OG_WORKER_ATTESTATION__PROVIDER": "dev",
        }
    else:
        contract = json.loads(cfg.path("chain.json").read_text())["contract_address"]
        env |= {
            "OG_SETTLEMENT_LEDGER_URL": str(cfg.path("settlement", "ledger.sqlite3")),
            "OG_SETTLEMENT_ANCHOR": "true",
            "OG_SETTLEMENT_CHAIN__RPC_URL": cfg.rpc_url,
            "OG_SETTLEMENT_CHAIN__CONTRACT_ADDRESS": contract,
            "OG_SETTLEMENT_CHAIN__RELAYER_KEY": dev_private_key(0),
            "OG_SETTLEMENT_MERKLE_BATCH_MAX_AGE_S": "2",
        }
    chain = json.loads(cfg.path("chain.json").read_text())
    env |= {
        prefix + "ADMISSION__SOURCE": "chain",
        prefix + "ADMISSION__RPC_URL": cfg.rpc_url,
        prefix + "ADMISSION__REGISTRY_ADDRESS": chain["registry_address"],
        prefix + "ADMISSION__FROM_BLOCK": str(chain["registry_block"]),
        prefix + "ADMISSION__REFRESH_INTERVAL_S": "2",
    }
    return env


def _chain_up(cfg: StackConfig) -> dict[str, object]:
    """Start anvil and deploy the Settlement and NodeRegistry contracts unless the recorded
    ones are there; returns the record (``chain.json``)."""
    try:
        start_anvil(
            cfg.host,
            cfg.chain_port,
            log_path=cfg.path("log", "anvil.log"),
            pid_path=cfg.path("run", "anvil.pid"),
            detach=True,
        )
    except ChainAlreadyRunning:
        pass
    record = cfg.path("chain.json")
    settings = ChainSettings(rpc_url=cfg.rpc_url, relayer_key=SecretStr(dev_private_key(0)))
    if record.exists():
        known: dict[str, object] = json.loads(record.read_text())
        try:
            asyncio.run(_probe(settings, known))
            return known
        except (ChainError, KeyError):
            pass  # anvil keeps no state across restarts: deploy again
    address = asyncio.run(SettlementChain.deploy(settings, DEV_ACCOUNTS[0]))
    registry, block = asyncio.run(NodeRegistryClient.deploy(settings, _GOVERNANCE))
    chain = {
        "rpc_url": cfg.rpc_url,
        "contract_address": address,
        "registry_address": registry,
        "registry_block": block,
    }
    record.write_text(json.dumps(chain) + "\n")
    return chain


_GOVERNANCE = SecretStr(dev_private_key(1))
"""The NodeRegistry's governance key on the local stack (anvil's dev account 1)."""


async def _probe(settings: ChainSettings, known: dict[str, object]) -> None:
    chain = await SettlementChain.connect(
        settings.model_copy(update={"contract_address": known["contract_address"]})
    )
    await chain.close()
    registry = NodeRegistryClient(settings, str(known["registry_address"]), _GOVERNANCE)
    try:
        await registry.is_admitted("00" * 32)  # reverts or fails where nothing is deployed
    finally:
        await registry.close()


async def _admit_worker(cfg: StackConfig, chain: dict[str, object]) -> None:
    """Admit the stack's worker (its keys are made now if they do not exist yet)."""
    from worker.identity import chain_address, node_signer
    from worker.settings import WorkerSettings

    keys = WorkerSettings(key_dir=cfg.path("keys"))
    node_id = node_signer(keys).node_id
    settings = ChainSettings(rpc_url=cfg.rpc_url)
    registry = NodeRegistryClient(settings, str(chain["registry_address"]), _GOVERNANCE)
    try:
        if not await registry.is_admitted(node_id):
            await registry.admit(node_id, chain_address(keys))
    finally:
        await registry.close()


def _start_service(cfg: StackConfig, service: str) -> None:
    pid_path = cfg.path("run", f"{service}.pid")
    if running_pid(pid_path, _MARKER) is not None:
        return
    log_path = cfg.path("log", f"{service}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "nodecli.main", service],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=_service_env(cfg, service),
            start_new_session=True,
        )
    pid_path.write_text(f"{proc.pid}\n")
    cfg.path("run", f"{service}.health").write_text(
        f"http://{cfg.host}:{cfg.metrics_port(service)}\n"
    )


def _wait_ready(cfg: StackConfig, service: str) -> None:
    pid_path = cfg.path("run", f"{service}.pid")
    wait_ready(
        service,
        _health_base(cfg, service) + "/readyz",
        alive=lambda: running_pid(pid_path, _MARKER) is not None,
        log_path=cfg.path("log", f"{service}.log"),
        timeout_s=cfg.ready_timeout_s,
    )


def stack_up(cfg: StackConfig) -> dict[str, object]:
    """Start broker, topics, demo models, worker and settlement; return the status."""
    try:
        start_broker(
            cfg.host,
            cfg.port,
            log_path=cfg.path("log", "broker.log"),
            pid_path=cfg.path("run", "broker.pid"),
            detach=True,
        )
    except BrokerAlreadyRunning:
        pass
    chain = _chain_up(cfg)
    asyncio.run(_admit_worker(cfg, chain))
    build_demo_hub(cfg.path("hub"))
    asyncio.run(ensure_topics(cfg.bootstrap, standard_topics(cfg.namespace, DEMO_MODELS)))
    for service in _SERVICES:
        _start_service(cfg, service)
    for service in _SERVICES:
        _wait_ready(cfg, service)
    return stack_status(cfg)


def stack_down(cfg: StackConfig) -> dict[str, bool]:
    """Stop services first (they drain and commit), then the broker."""
    stopped = {
        service: stop_pidfile(cfg.path("run", f"{service}.pid"), marker=_MARKER, timeout_s=30.0)
        for service in _SERVICES
    }
    for service in _SERVICES:
        cfg.path("run", f"{service}.health").unlink(missing_ok=True)
    stopped["broker"] = stop_broker(cfg.path("run", "broker.pid"))
    stopped["chain"] = stop_anvil(cfg.path("run", "anvil.pid"))
    return stopped


def stack_status(cfg: StackConfig) -> dict[str, object]:
    status: dict[str, object] = {
        "bootstrap": cfg.bootstrap,
        "namespace": cfg.namespace,
        "broker": {"ready": kafka_api_versions_ok(cfg.host, cfg.port)},
        "chain": {"ready": rpc_ready(cfg.rpc_url), "rpc_url": cfg.rpc_url},
    }
    for service in _SERVICES:
        pid = running_pid(cfg.path("run", f"{service}.pid"), _MARKER)
        base = _health_base(cfg, service)
        readiness = probe(base + "/readyz") if pid is not None else None
        entry: dict[str, object] = {
            "pid": pid,
            "running": pid is not None,
            "ready": readiness is not None and readiness.ready,
            "readyz": base + "/readyz",
            "metrics": base + "/metrics",
        }
        if readiness is None:
            entry["failed"] = ["not running"]
        elif not readiness.ready:
            entry["failed"] = readiness.failed
        status[service] = entry
    return status


def local_chain(chain: ChainSettings, state_dir: Path) -> ChainSettings:
    """``chain`` with the contract of the local stack in ``state_dir`` filled in, when the
    settings name none and a stack was brought up there (``chain.json``)."""
    record = state_dir / "chain.json"
    if chain.contract_address is not None or not record.exists():
        return chain
    address = json.loads(record.read_text())["contract_address"]
    return chain.model_copy(update={"contract_address": address})


def local_admission(admission: AdmissionSettings, state_dir: Path) -> AdmissionSettings:
    """``admission`` with the NodeRegistry of the local stack in ``state_dir`` filled in (its
    address, RPC URL and deployment block), when it reads a chain but names no registry and
    a stack was brought up there (``chain.json``)."""
    record = state_dir / "chain.json"
    if admission.source != "chain" or admission.registry_address is not None:
        return admission
    if not record.exists():
        return admission
    chain = json.loads(record.read_text())
    if "registry_address" not in chain:
        return admission
    return admission.model_copy(
        update={
            "registry_address": chain["registry_address"],
            "rpc_url": chain["rpc_url"],
            "from_block": chain.get("registry_block", 0),
        }
    )
