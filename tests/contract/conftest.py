"""The contract tier's environments: each scenario runs in memory and on the real thing.

``kafka`` is a ``KafkaEnv``: ``memory`` (``infra.kafka.memory.MemoryKafka``, milliseconds) or
``tansu`` (the session's real broker, marked ``kafka``). ``chain`` is a ``ChainEnv``:
``memory`` (``settlement.memory_chain.MemoryChain``) or ``anvil`` (a fresh Settlement contract
per test on the tier's anvil, marked ``chain``). The real backends are started only when a
test that needs them runs, so ``-m "not kafka and not chain"`` never starts a process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from infra.dev.anvil import AnvilProcess, running_anvil
from infra.dev.broker import BrokerProcess
from tests.harness.chain_env import AnvilChainEnv, ChainEnv, MemoryChainEnv
from tests.harness.kafka_env import KafkaEnv, MemoryEnv, TansuEnv


@pytest.fixture(params=["memory", pytest.param("tansu", marks=pytest.mark.kafka)])
def kafka(request: pytest.FixtureRequest) -> KafkaEnv:
    if request.param == "memory":
        return MemoryEnv()
    broker: BrokerProcess = request.getfixturevalue("broker")
    return TansuEnv(broker.bootstrap)


@pytest.fixture(scope="session")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as proc:
        yield proc


@pytest.fixture(params=["memory", pytest.param("anvil", marks=pytest.mark.chain)])
async def chain(request: pytest.FixtureRequest) -> AsyncIterator[ChainEnv]:
    if request.param == "memory":
        env: ChainEnv = MemoryChainEnv()
    else:
        env = await AnvilChainEnv.deploy(request.getfixturevalue("anvil"))
    try:
        yield env
    finally:
        await env.close()
