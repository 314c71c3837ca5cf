"""``inference-node admission`` as an authority runs it: deploy a NodeRegistry on anvil, admit
and revoke a node, approve a measurement, and sign admission lists without a chain; ``show``
reports what a verifier would use. Keys come from files and never reach the output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.dev.anvil import dev_private_key, running_anvil
from schemas.admission import SignedAdmissionList, verify_admission_list
from tests.harness.nodes import TestNode

pytestmark = pytest.mark.e2e

NODE = TestNode.seeded(1)


def _cli(*args: str) -> tuple[int, dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-m", "nodecli.main", "admission", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        check=False,
    )
    body = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, body, done.stderr


def test_on_chain_admission_by_governance_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "governance.key"
    key_file.write_text(dev_private_key(1))
    with running_anvil(log_dir=tmp_path) as anvil:
        chain = ["--rpc-url", anvil.rpc_url, "--governance-key-file", str(key_file)]
        code, deployed, err = _cli("deploy", *chain)
        assert code == 0, err
        registry = str(deployed["registry_address"])
        on = [*chain, "--registry-address", registry]
        show = ["show", "--rpc-url", anvil.rpc_url, "--registry-address", registry]

        assert _cli("admit", NODE.node_id, NODE.chain_address, *on)[0] == 0
        assert _cli("approve-measurement", "tdx", "ab" * 48, *on)[0] == 0
        code, facts, _ = _cli(*show)
        assert facts["nodes"] == {
            NODE.node_id: {"chain_address": NODE.chain_address, "admitted": True}
        }
        assert facts["approved_measurements"] == [["tdx", "ab" * 48]]
        assert _cli("revoke", NODE.node_id, *on)[0] == 0
        code, facts, _ = _cli(*show)
        assert facts["nodes"][NODE.node_id]["admitted"] is False  # type: ignore[index]

        # Another key is not governance: refused by the contract, by name.
        other = tmp_path / "other.key"
        other.write_text(dev_private_key(2))
        code, _, err = _cli(
            "admit", NODE.node_id, NODE.chain_address, "--rpc-url", anvil.rpc_url,
            "--governance-key-file", str(other), "--registry-address", registry,
        )  # fmt: skip
        assert code == 1 and "NotGovernance" in err
        assert dev_private_key(2)[2:] not in err and dev_private_key(1)[2:] not in err


def test_signed_lists_without_a_chain(tmp_path: Path) -> None:
    seed = "0a" * 32
    key_file = tmp_path / "authority.key"
    key_file.write_text(seed)
    facts = tmp_path / "facts.json"
    facts.write_text(
        json.dumps({"nodes": [{"node_id": NODE.node_id, "chain_address": NODE.chain_address}]})
    )
    out = tmp_path / "admission.json"
    sign = ["sign-list", str(facts), "--authority-key-file", str(key_file), "--out", str(out)]
    code, first, err = _cli(*sign)
    assert code == 0, err
    assert first["sequence"] == 1 and first["nodes"] == 1
    facts.write_text(json.dumps({"nodes": []}))  # revocation: absence from a newer list
    code, second, _ = _cli(*sign)
    assert second["sequence"] == 2
    signed = SignedAdmissionList.model_validate_json(out.read_bytes())
    assert verify_admission_list(signed) and signed.list.nodes == []
    authority = str(first["authority_id"])
    code, shown, _ = _cli(
        "show", "--source", "authority", "--authority-key", authority, "--admission-list", str(out)
    )
    assert code == 0 and shown["nodes"] == {} and shown["source"] == f"authority:{authority}#2"
    # A list signed by a key the verifier did not pin is refused.
    code, _, err = _cli(
        "show", "--source", "authority", "--authority-key", "11" * 32, "--admission-list", str(out)
    )
    assert code == 2 and "pinned" in err
    assert seed not in err
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    code, _, err = _cli(
        "sign-list", str(facts), "--authority-key-file", str(bad), "--out", str(out)
    )
    assert code == 2 and "not a key" not in err
