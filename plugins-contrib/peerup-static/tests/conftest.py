"""Fixtures for the static plugin's tests: trio, a clean environment, peerup's harness.

The in-process harness (real libp2p hosts, a real relay) ships with peerup as
``peerup.testing``, so these tests use exactly what peerup's own tests use.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def anyio_backend() -> str:
    # py-libp2p runs on trio only.
    return "trio"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No PEERUP_* from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("PEERUP_"):
            monkeypatch.delenv(name)
