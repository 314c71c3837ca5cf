"""The node's keys and evidence, from settings: secret settings when given, else key files in
``key_dir`` (created once, mode 0600, see ``worker.trust.keys``).

- ed25519 (``node_ed25519.key``): the node id; signs results, registrations, proofs;
- X25519 (``node_x25519.key``): sealed requests are sealed to it;
- secp256k1 (``node_secp256k1.key``): the node's chain account;
- X25519 (``dlq_x25519.key``): the operator's key dead letters are sealed to (a deployment
  sets only the public half on workers, ``dlq_public_key``).
"""

from __future__ import annotations

import asyncio
from typing import Final

from nacl.public import PrivateKey, PublicKey

from schemas.attestation import Attestation
from schemas.sealing import NodeSealer
from schemas.signing import Signer
from worker.settings import WorkerSettings
from worker.trust.keys import load_or_create_seed

__all__ = [
    "CHAIN_KEY_FILE",
    "DLQ_KEY_FILE",
    "NODE_KEY_FILE",
    "X25519_KEY_FILE",
    "AttestationFatal",
    "chain_address",
    "chain_key",
    "dlq_private_key",
    "dlq_public_key",
    "node_attestation",
    "node_sealer",
    "node_signer",
]

NODE_KEY_FILE: Final = "node_ed25519.key"
X25519_KEY_FILE: Final = "node_x25519.key"
CHAIN_KEY_FILE: Final = "node_secp256k1.key"
DLQ_KEY_FILE: Final = "dlq_x25519.key"


class AttestationFatal(Exception):
    """A configured attestation provider cannot attest: serving would silently downgrade
    every TEE promise, so the worker must not start."""


def node_signer(settings: WorkerSettings) -> Signer:
    """The node identity: the secret setting when given, else the key file (created once)."""
    if settings.node_key is not None:
        return Signer(bytes.fromhex(settings.node_key.get_secret_value()))
    return Signer(load_or_create_seed(settings.key_dir / NODE_KEY_FILE))


def node_sealer(settings: WorkerSettings) -> NodeSealer:
    """The X25519 key sealed requests are opened with (secret setting, else key file)."""
    if settings.x25519_key is not None:
        return NodeSealer(bytes.fromhex(settings.x25519_key.get_secret_value()))
    return NodeSealer(load_or_create_seed(settings.key_dir / X25519_KEY_FILE))


def chain_key(settings: WorkerSettings) -> bytes:
    """The node's secp256k1 private key (secret setting, else key file)."""
    if settings.chain_key is not None:
        return bytes.fromhex(settings.chain_key.get_secret_value().removeprefix("0x"))
    return load_or_create_seed(settings.key_dir / CHAIN_KEY_FILE)


def chain_address(settings: WorkerSettings) -> str:
    """The node's secp256k1 account address, lower-case hex."""
    from eth_account import Account

    return str(Account.from_key(chain_key(settings)).address).lower()


def dlq_public_key(settings: WorkerSettings) -> PublicKey:
    if settings.dlq_public_key:
        return PublicKey(bytes.fromhex(settings.dlq_public_key))
    return dlq_private_key(settings).public_key


def dlq_private_key(settings: WorkerSettings) -> PrivateKey:
    """The operator's DLQ key from ``key_dir`` (created on first use)."""
    return PrivateKey(load_or_create_seed(settings.key_dir / DLQ_KEY_FILE))


async def node_attestation(
    settings: WorkerSettings, node_id: str, x25519_public_key: str, address: str
) -> Attestation | None:
    """Evidence binding the node's three keys, from the configured provider (None: no TEE)."""
    from worker.trust.attestation import (
        AttestationError,
        attest_node,
        load_attestation_provider,
    )

    try:
        provider = load_attestation_provider(settings.attestation)
        if provider is None:
            return None
        return await asyncio.to_thread(
            attest_node,
            provider,
            node_id=node_id,
            x25519_public_key=x25519_public_key,
            chain_address=address,
        )
    except AttestationError as e:
        raise AttestationFatal(f"attestation: {e}") from e
