"""Fixtures for the static plugin's tests: trio, a clean environment, peerup's harness.

The in-process harness (real libp2p hosts, a real relay) lives in peerup's own
``tests/harness.py``; it is imported from the repository checkout rather than
copied, so these tests exercise exactly what peerup's tests do.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests"))


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
