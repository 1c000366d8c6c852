"""Shared fixtures: the trio backend, peerup homes, and an installed test plugin."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from peerup.netlab import NetLab, NetLabUnavailable, unavailable_reason


@pytest.fixture
def anyio_backend() -> str:
    # py-libp2p runs on trio only; the core is anyio, so every async test runs on trio.
    return "trio"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty peerup home, and no PEERUP_* from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith("PEERUP_"):
            monkeypatch.delenv(name)
    path = tmp_path / "home"
    path.mkdir()
    return path


InstallPlugin = Callable[[str, str, str], Path]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InstallPlugin:
    """Install a one-module distribution with a ``peerup.plugins`` entry point.

    It is a real installed distribution as importlib.metadata and stevedore see
    one (a ``*.dist-info`` with METADATA and entry_points.txt on ``sys.path``),
    which is what ``pip install`` leaves behind, without touching the venv.
    Returns the site directory, for subprocesses' ``PYTHONPATH``.
    """
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))

    def install(entry_name: str, module: str, source: str) -> Path:
        dist = f"peerup-{module.replace('_', '-')}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[peerup.plugins]\n{entry_name} = {module}\n")
        return site

    return install


@pytest.fixture
def quiet_attacker(caplog: pytest.LogCaptureFixture) -> None:
    """The attacker's own libp2p logs every refused dial at ERROR; the target's logs are what matter."""
    caplog.set_level(logging.CRITICAL, logger="libp2p")


@contextmanager
def netlab_or_skip() -> Iterator[NetLab]:
    """A started NetLab (peerup/netlab.py), or the test skipped with the reason it cannot be made."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = NetLab()
    try:
        lab.start()
    except NetLabUnavailable as exc:
        lab.close()
        pytest.skip(str(exc))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def netlab() -> Iterator[NetLab]:
    with netlab_or_skip() as lab:
        yield lab
