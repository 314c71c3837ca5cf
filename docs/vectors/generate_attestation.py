"""Regenerate the attestation test vectors: ``python docs/vectors/generate_attestation.py``.

Fixed inputs (key seeds, a chain address, a timestamp) and every value derived from them:
the binding's canonical payload and report_data, and a complete development attestation.
``tests/unit/test_attestation_vectors.py`` recomputes each derived value with nothing but
hashlib, rfc8785 and pynacl, so docs/protocol/attestation.md, the vectors and the code agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eth_account import Account
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from schemas.attestation import (
    BINDING_DOMAIN,
    DEV_STATEMENT_DOMAIN,
    DevStatement,
    binding_payload,
    binding_report_data,
)
from schemas.canonical import canonical_bytes, domain_digest
from worker.trust.attestation import DevProvider, attest_node

ISSUED_UNIX_MS = 1_795_000_000_000


def _keys(ed25519_seed: bytes, x25519_seed: bytes, secp256k1_key: bytes) -> dict[str, Any]:
    return {
        "seeds": {
            "ed25519_seed_hex": ed25519_seed.hex(),
            "x25519_seed_hex": x25519_seed.hex(),
            "secp256k1_private_key_hex": secp256k1_key.hex(),
        },
        "node_id": SigningKey(ed25519_seed).verify_key.encode().hex(),
        "x25519_public_key": PrivateKey(x25519_seed).public_key.encode().hex(),
        "chain_address": Account.from_key(secp256k1_key).address.lower(),
    }


def binding_vector(name: str, keys: dict[str, Any]) -> dict[str, Any]:
    inputs = {k: keys[k] for k in ("node_id", "x25519_public_key", "chain_address")}
    payload = binding_payload(**inputs)
    return {
        "name": name,
        **keys,
        "canonical_payload": payload.decode(),
        "report_data_hex": binding_report_data(**inputs).hex(),
    }


def dev_vector(keys: dict[str, Any], dev_seed: bytes) -> dict[str, Any]:
    provider = DevProvider(dev_seed, clock_ms=lambda: ISSUED_UNIX_MS)
    inputs = {k: keys[k] for k in ("node_id", "x25519_public_key", "chain_address")}
    attestation = attest_node(provider, **inputs)
    signed = json.loads(attestation.evidence_bytes())
    statement = DevStatement.model_validate(signed["statement"])
    return {
        "name": "dev-attestation",
        "node": inputs,
        "dev_seed_hex": dev_seed.hex(),
        "dev_public_key": provider.public_key,
        "statement": signed["statement"],
        "canonical_statement": canonical_bytes(statement).decode(),
        "signing_digest_hex": domain_digest(DEV_STATEMENT_DOMAIN, statement).hex(),
        "signature": signed["signature"],
        "canonical_evidence": attestation.evidence_bytes().decode(),
        "attestation": attestation.model_dump(mode="json"),
    }


def main() -> None:
    first = _keys(bytes(range(32)), bytes(range(32, 64)), (1).to_bytes(32, "big"))
    second = _keys(b"\xff" * 32, b"\x01" * 32, (2**255).to_bytes(32, "big"))
    out = Path(__file__).parent
    (out / "attestation-binding-v1.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "domain": BINDING_DOMAIN.decode(),
                "rule": "report_data = SHA-512(domain || 0x00 || JCS({chain_address, node_id, "
                "x25519_public_key}))",
                "vectors": [binding_vector("keys-a", first), binding_vector("keys-b", second)],
            },
            indent=2,
        )
        + "\n"
    )
    (out / "attestation-dev-v1.json").write_text(
        json.dumps(
            {
                "schema_version": 1,
                "domain": DEV_STATEMENT_DOMAIN.decode(),
                "vectors": [dev_vector(first, bytes([7]) * 32)],
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
