"""Fixtures shared by every tier: the demo model hub and the real Kafka-API broker.

The broker is a real Tansu process started by the test session itself on a free port; each
test that needs topics gets its own namespace, so tests never see each other's messages.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.dev.broker import BrokerProcess, running_broker
from infra.dev.demo_models import build_demo_hub


@pytest.fixture(scope="session")
def demo_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub directory holding the two demo models, built once per test session."""
    root = tmp_path_factory.mktemp("demo-hub")
    build_demo_hub(root)
    return root


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    with running_broker(log_dir=tmp_path_factory.mktemp("broker")) as proc:
        yield proc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests unless CUDA is usable here (torch is only imported when such
    a test was collected). Every other marker runs, or fails, wherever it is collected."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = bool(torch.cuda.is_available())
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is false)")
        for item in gpu_items:
            item.add_marker(skip)
