"""pytest fixtures for peerup and its plugins, loaded through the ``pytest11`` entry point.

Installing ``peerup[test]`` is enough: pytest loads this module in every
project (peerup's own tests, a plugin author's). Listing it in
``pytest_plugins`` as well is harmless (the entry point carries the module's
name, so pytest sees one plugin). Kept apart from :mod:`peerup.testing` so
that module imports without pytest (the demo uses its process runner).
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest

from peerup.netlab import NetLab, NetLabUnavailable, unavailable_reason


class _TrioBackend:
    """``anyio_backend``, registered by :func:`pytest_configure`.

    anyio's own pytest plugin defines ``anyio_backend`` (asyncio) too, and of two
    entry-point plugins the one registered last wins, in an order nobody
    controls; registered at configure time, after every entry point, this one does.
    """

    @pytest.fixture
    def anyio_backend(self) -> str:
        """py-libp2p runs on trio only; the core is anyio, so every async test runs on trio."""
        return "trio"


#: Kept: tests/test_libp2p_patches.py runs a test with one libp2p patch off through it,
#: and it must reach the peerup processes that test starts (peerup/plugins/libp2p/patches.py).
PATCHES_OFF = "PEERUP_PATCHES_OFF"


@pytest.fixture(autouse=True)
def clean_peerup_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PEERUP_*`` from the developer's shell leaks into a test (but ``PEERUP_PATCHES_OFF``)."""
    for name in list(os.environ):
        if name.startswith("PEERUP_") and name != PATCHES_OFF:
            monkeypatch.delenv(name)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty peerup home."""
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
    """A NetLab for one test (needs root and the tools .ci/run installs; skipped otherwise)."""
    with netlab_or_skip() as lab:
        yield lab


class _EventHandler(logging.Handler):
    def __init__(self, event: anyio.Event, contains: str) -> None:
        super().__init__()
        self.event, self.contains = event, contains

    def emit(self, record: logging.LogRecord) -> None:
        if self.contains in record.getMessage():
            self.event.set()


@contextmanager
def log_event(logger: str, contains: str = "", level: int = logging.WARNING) -> Iterator[anyio.Event]:
    """An event set by the first record of ``logger`` at ``level`` or above that contains ``contains``.

    For a test that must wait until something was tried (a retry was logged)
    instead of sleeping and hoping it was. Use it inside the test's event loop.
    """
    event = anyio.Event()
    handler = _EventHandler(event, contains)
    handler.setLevel(level)
    target = logging.getLogger(logger)
    previous = target.level
    if not target.isEnabledFor(level):
        target.setLevel(level)
    target.addHandler(handler)
    try:
        yield event
    finally:
        target.removeHandler(handler)
        target.setLevel(previous)


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("peerup-trio-backend"):
        config.pluginmanager.register(_TrioBackend(), "peerup-trio-backend")


__all__ = ["InstallPlugin", "log_event", "netlab_or_skip"]
