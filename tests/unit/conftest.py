"""Shared unit-test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.models.demo import build_demo_hub


@pytest.fixture(scope="session")
def demo_hub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hub directory holding the two demo models, built once per test session."""
    root = tmp_path_factory.mktemp("demo-hub")
    build_demo_hub(root)
    return root
