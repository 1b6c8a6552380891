"""Fixtures and markers; shared helper functions live in helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

from steerlab.hf.model import LoadedModel  # noqa: E402


@pytest.fixture(scope="session")
def llama() -> LoadedModel:
    return tiny.model("llama")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give slow tests their marker from the file name too."""
    for item in items:
        if "real_model" in item.nodeid:
            item.add_marker(pytest.mark.slow)
