"""pytest fixtures for testing peerup plugins: ``pytest_plugins = ["peerup.pytest_fixtures"]``.

Kept apart from :mod:`peerup.testing` so that module imports without pytest
(the demo uses its process runner).
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """py-libp2p runs on trio only, so every async test does."""
    return "trio"


@pytest.fixture(autouse=True)
def clean_peerup_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PEERUP_*`` from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PEERUP_"):
            monkeypatch.delenv(name)
