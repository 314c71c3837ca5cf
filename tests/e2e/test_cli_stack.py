"""The README's demo path through the real CLI: stack up, request, verify, settlement, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.dev.broker import free_port, kafka_api_versions_ok

pytestmark = [pytest.mark.e2e, pytest.mark.kafka]


def _cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nodecli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_stack_request_verify_and_down(tmp_path: Path) -> None:
    port, chain_port = free_port(), free_port()
    state = tmp_path / "var"
    stack = ["--state-dir", str(state), "--port", str(port), "--chain-port", str(chain_port)]
    # Free ports for the services' health servers too (the defaults may be taken here).
    stack += ["--worker-metrics-port", str(free_port())]
    stack += ["--settlement-metrics-port", str(free_port())]
    up = _cli("stack", "up", *stack)
    try:
        assert up.returncode == 0, up.stderr
        status = json.loads(up.stdout)
        assert (
            status["broker"]["ready"]
            and status["worker"]["ready"]
            and status["settlement"]["ready"]
        )

        request_ids = []
        originals: dict[str, dict[str, object]] = {}
        for model in ("demo-mlp", "demo-lm"):
            req_file, reply_file = tmp_path / f"{model}.req.json", tmp_path / f"{model}.reply.json"
            sent = _cli(
                "request",
                "--model",
                model,
                "--example",
                "--hub-dir",
                str(state / "hub"),
                "--bootstrap",
                f"127.0.0.1:{port}",
                "--state-dir",
                str(state),
                "--save-request",
                str(req_file),
            )
            assert sent.returncode == 0, sent.stderr
            reply = json.loads(sent.stdout)
            assert reply["type"] == "result" and reply["envelope"]["model_id"] == model
            request_ids.append(reply["request_id"])
            originals[model] = reply
            reply_file.write_text(sent.stdout)

            checked = _cli(
                "verify", str(reply_file), "--request", str(req_file), "--state-dir", str(state)
            )
            assert checked.returncode == 0, checked.stdout
            assert checked.stdout.strip().endswith("verified")

            # A tampered output no longer verifies.
            tampered = json.loads(sent.stdout)
            if model == "demo-lm":
                tampered["output"]["text"] += "!"
            else:
                tampered["output"]["tensors"]["probabilities"]["data"][0] += 0.5
            reply_file.write_text(json.dumps(tampered))
            rejected = _cli(
                "verify", str(reply_file), "--request", str(req_file), "--state-dir", str(state)
            )
            assert rejected.returncode == 1
            assert rejected.stdout.strip().endswith("NOT VERIFIED")

        bad = _cli(
            "request",
            "--model",
            "demo-mlp",
            "--input",
            '{"kind": "ml", "tensors": {"x": '
            '{"dtype": "float32", "shape": [1, 2], "data": [1, 2]}}}',
            "--bootstrap",
            f"127.0.0.1:{port}",
            "--state-dir",
            str(state),
        )
        assert bad.returncode == 1
        assert json.loads(bad.stdout)["code"] == "bad_request"

        contract = json.loads((state / "chain.json").read_text())["contract_address"]
        ledger_env = {
            "OG_SETTLEMENT_LEDGER_URL": str(state / "settlement" / "ledger.sqlite3"),
            "OG_SETTLEMENT_CHAIN__CONTRACT_ADDRESS": contract,
        }
        for request_id, model in zip(request_ids, ("demo-mlp", "demo-lm"), strict=True):
            shown = _cli("settlement", "show", request_id, env=ledger_env)
            assert shown.returncode == 0, shown.stderr
            assert json.loads(shown.stdout)[0]["request_id"] == request_id
            # Anchored within the batch age (2 s in the stack): the proof checks on chain.
            proof = _cli("settlement", "proof", request_id, env=ledger_env)
            for _ in range(40):
                if proof.returncode == 0:
                    break
                time.sleep(0.25)
                proof = _cli("settlement", "proof", request_id, env=ledger_env)
            assert proof.returncode == 0, proof.stderr
            proof_file = tmp_path / f"{model}.proof.json"
            proof_file.write_text(proof.stdout)
            rpc = f"http://127.0.0.1:{chain_port}"
            reply_file = tmp_path / f"{model}.reply.json"
            reply_file.write_text(json.dumps(originals[model]))
            included = _cli(
                "verify",
                str(reply_file),
                "--inclusion",
                str(proof_file),
                "--rpc-url",
                rpc,
                "--state-dir",
                str(state),
            )
            assert included.returncode == 0, included.stdout
            assert included.stdout.strip().endswith("verified")
            forged = json.loads(proof.stdout)
            forged["leaf"]["values"][3] = "0x" + "00" * 32  # claim another output
            proof_file.write_text(json.dumps(forged))
            refused = _cli("verify", "--inclusion", str(proof_file), "--rpc-url", rpc)
            assert refused.returncode == 1
            assert refused.stdout.strip().endswith("NOT VERIFIED")
    finally:
        down = _cli("stack", "down", *stack)
    assert down.returncode == 0, down.stderr
    assert json.loads(down.stdout) == {
        "broker": True,
        "chain": True,
        "settlement": True,
        "worker": True,
    }
    assert not kafka_api_versions_ok("127.0.0.1", port)
    status = _cli("stack", "status", *stack)
    assert status.returncode == 1
