"""The compiled contracts (ABI and bytecode) the services talk to, built reproducibly from the
Solidity sources beside this file by ``node infra/contracts/build.mjs`` (solcjs, pinned in
``infra/node``)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["load_artifact"]


def load_artifact(name: str = "Settlement") -> dict[str, Any]:
    """The compiled contract ``name`` (``infra/contracts/<name>.json``): abi, bytecode, ..."""
    text = resources.files("infra.contracts").joinpath(f"{name}.json").read_text()
    artifact: dict[str, Any] = json.loads(text)
    return artifact
