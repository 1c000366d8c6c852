"""The plugin tutorial in docs/plugins.md, run as written: code, commands and the error it shows.

A plugin author's first contact is that page; if its code stops working or the
error line it promises changes, this fails. The package is installed the way
``pip install -e .`` leaves it (a dist-info with the tutorial's entry point).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


@pytest.fixture
def hello(tmp_path: Path) -> dict[str, str]:
    """The tutorial's package installed on a private path; the environment to run peerup with it."""
    site = tmp_path / "site"
    (site / "peerup_hello").mkdir(parents=True)
    code = next(block for block in _blocks("python") if "class HelloPlugin" in block and "class Fixed" in block)
    (site / "peerup_hello" / "__init__.py").write_text(code)
    toml = next(block for block in _blocks("toml") if 'name = "peerup-hello"' in block)
    entry = re.search(r'^hello = "(.*)"$', toml, re.M)
    assert entry, "the tutorial's pyproject names the entry point"
    info = site / "peerup_hello-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: peerup-hello\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[peerup.plugins]\nhello = {entry.group(1)}\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERUP_")}
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), "PEERUP_HOME": str(home)}


def _peerup(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerup", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.system
def test_the_tutorial_plugin_lists_shows_its_section_and_fails_as_the_page_says(hello: dict[str, str]) -> None:
    listing = _peerup(hello, "plugins")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("hello "))
    assert row == ["hello", "peerup-hello", "0.1.0", "no", "retry_policy"]

    shown = _peerup(hello, "config", "show", "--plugin", "hello")
    assert shown.returncode == 0, shown.stderr
    assert "[plugin.hello]\ndelay = 0.5\nretries = 3\n" in shown.stdout

    promised = next(line for line in DOC.read_text().splitlines() if line.startswith("peerup: error: environment"))
    bad = _peerup({**hello, "PEERUP_PLUGIN__HELLO__DELAY": "-1"}, "run", "--plugin", "hello")
    assert bad.returncode == 2
    assert bad.stderr.strip() == promised.strip()
