"""The NodeRegistry contract on anvil: governance admits and revokes nodes and measurements,
``infra.admission.ChainAdmissions`` rebuilds exactly that state from its events (in chain
order), and ``verifyResult`` checks a node's EIP-191 chain signature of a result on chain: a
flipped bit, another key, or a revoked node fails."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from pydantic import SecretStr

from infra.admission import AdmissionSettings, ChainAdmissions, NodeRegistryClient
from infra.dev.anvil import AnvilProcess, dev_private_key, running_anvil
from infra.evm import ChainError, EvmSettings
from schemas.signing import envelope_digest
from schemas.verify.admission import admission_problem
from tests.harness.nodes import TestNode

NODE = TestNode.seeded(1)
OTHER = TestNode.seeded(2)
GOVERNANCE = SecretStr(dev_private_key(1))
MEASUREMENT = ("tdx", "ab" * 48)


@pytest.fixture(scope="module")
def anvil(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnvilProcess]:
    with running_anvil(log_dir=tmp_path_factory.mktemp("anvil")) as running:
        yield running


@pytest.fixture
def evm(anvil: AnvilProcess) -> EvmSettings:
    return EvmSettings(rpc_url=anvil.rpc_url, chain_id=anvil.chain_id, receipt_timeout_s=10)


@pytest.fixture
async def deployed(evm: EvmSettings) -> tuple[str, int]:
    return await NodeRegistryClient.deploy(evm, GOVERNANCE)


@pytest.fixture
async def registry(
    evm: EvmSettings, deployed: tuple[str, int]
) -> AsyncIterator[NodeRegistryClient]:
    client = NodeRegistryClient(evm, deployed[0], GOVERNANCE)
    yield client
    await client.close()


async def _facts(evm: EvmSettings, deployed: tuple[str, int]) -> ChainAdmissions:
    return ChainAdmissions(
        AdmissionSettings(
            source="chain",
            rpc_url=evm.rpc_url,
            registry_address=deployed[0],
            from_block=deployed[1],
        )
    )


async def test_admission_state_is_rebuilt_from_events_in_chain_order(
    evm: EvmSettings, deployed: tuple[str, int], registry: NodeRegistryClient
) -> None:
    source = await _facts(evm, deployed)
    try:
        assert (await source.snapshot()).nodes == {}
        await registry.admit(NODE.node_id, NODE.chain_address)
        await registry.admit(OTHER.node_id, OTHER.chain_address)
        await registry.revoke(OTHER.node_id)
        await registry.revoke(NODE.node_id)
        await registry.admit(NODE.node_id, NODE.chain_address)  # admitted again, in one read
        await registry.approve_measurement(*MEASUREMENT)
        facts = await source.snapshot()
        assert admission_problem(facts, NODE.node_id, NODE.chain_address, None) is None
        assert admission_problem(facts, OTHER.node_id, OTHER.chain_address, None) == "revoked_node"
        assert facts.measurement_approved(*MEASUREMENT)
        stranger = TestNode.seeded(3)
        assert admission_problem(facts, stranger.node_id, stranger.chain_address, MEASUREMENT) is (
            None
        )
        # A node registering another chain address than governance admitted does not count.
        assert admission_problem(facts, NODE.node_id, OTHER.chain_address, None) == (
            "chain_address_mismatch"
        )
        await registry.revoke_measurement(*MEASUREMENT)
        facts = await source.snapshot()  # read incrementally from the last block on
        assert not facts.measurement_approved(*MEASUREMENT)
        assert admission_problem(facts, stranger.node_id, stranger.chain_address, MEASUREMENT) == (
            "revoked_measurement"
        )
        assert facts.source == f"chain:{deployed[0].lower()}"
    finally:
        await source.close()


async def test_only_governance_writes(evm: EvmSettings, deployed: tuple[str, int]) -> None:
    intruder = NodeRegistryClient(evm, deployed[0], SecretStr(dev_private_key(2)))
    try:
        with pytest.raises(ChainError) as refused:
            await intruder.admit(OTHER.node_id, OTHER.chain_address)
        assert refused.value.reason == "NotGovernance"
        assert not await intruder.is_admitted(OTHER.node_id)
    finally:
        await intruder.close()


async def test_a_result_s_chain_signature_verifies_on_chain_and_nothing_else_does(
    registry: NodeRegistryClient,
) -> None:
    await registry.admit(NODE.node_id, NODE.chain_address)
    record = NODE.record("req-on-chain")
    digest = envelope_digest(record.envelope)
    assert await registry.verify_result(NODE.node_id, digest, record.chain_signature)
    gas = await registry.verify_result_gas(NODE.node_id, digest, record.chain_signature)
    print(f"\nNodeRegistry.verifyResult: {gas} gas")
    assert gas < 40_000

    raw = bytearray(bytes.fromhex(record.chain_signature[2:]))
    raw[10] ^= 0x01
    assert not await registry.verify_result(NODE.node_id, digest, "0x" + raw.hex())
    other_key = OTHER.chain.sign_digest(digest)
    assert not await registry.verify_result(NODE.node_id, digest, other_key)
    assert not await registry.verify_result(NODE.node_id, b"\x00" * 32, record.chain_signature)
    assert not await registry.verify_result(OTHER.node_id, digest, record.chain_signature)
    await registry.revoke(NODE.node_id)
    assert not await registry.verify_result(NODE.node_id, digest, record.chain_signature)
