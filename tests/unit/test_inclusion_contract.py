"""``verify --inclusion`` trusts the contract the verifier names, never the one a proof file
names: an attacker can deploy a contract holding any root and point a proof at it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from settlement.inclusion import check_inclusion

VECTORS = Path(__file__).parents[2] / "docs" / "vectors" / "results-v2.json"


def _proof() -> dict[str, Any]:
    proof: dict[str, Any] = json.loads(VECTORS.read_text())["settlement"]["inclusion_proof"]
    return proof


def _failed(rows: list[dict[str, Any]]) -> set[str]:
    return {r["name"] for r in rows if not r["ok"]}


async def test_a_proof_naming_another_contract_than_the_trusted_one_fails_before_any_call() -> None:
    proof = _proof()
    attacker = "0x" + "66" * 20
    forged = {**proof, "chain": {**proof["chain"], "contract_address": attacker}}
    trusted = proof["chain"]["contract_address"]
    # No RPC is reachable at this URL: a mismatch must be decided before any chain call.
    rows = await check_inclusion(forged, "http://127.0.0.1:9", None, trusted)
    assert _failed(rows) == {"contract"}


async def test_without_a_trusted_contract_nothing_is_proven() -> None:
    rows = await check_inclusion(_proof(), "http://127.0.0.1:9", None, None)
    assert _failed(rows) == {"contract"}
