"""The patch registry (peerup/plugins/libp2p/patches.py) is applied when a node opens, reverts, and is honest.

The meta-test switches one patch off in a fresh process (``PEERUP_PATCHES_OFF``)
and runs the test its entry names, which must then fail. CI runs it for every
entry: each named test is one test, run with -x and a timeout (about 70 s for
all of them on a quiet 2-core machine).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

from peerup.plugins.libp2p import patches
from peerup.plugins.libp2p.node import open_libp2p_node
from peerup.testing import make_settings

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "libp2p-workarounds.md"
#: Seconds one named test may take with its patch off (a hang then counts as a failure).
NAMED_TEST_TIMEOUT = 240

pytestmark = pytest.mark.anyio


def _run(code: str, **env: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env={**os.environ, **env}, check=True
    )
    return done.stdout.strip()


def test_importing_the_plugin_patches_nothing() -> None:
    code = (
        "import peerup.plugins.libp2p.plugin\n"
        "from peerup.plugins.libp2p import patches\n"
        "print(sorted(p.name for p in patches.REGISTRY if p.scope == 'process' and patches.installed(p.name)))"
    )
    assert _run(code) == "[]"


async def test_opening_a_node_installs_every_process_patch_once(tmp_path: Path) -> None:
    async with open_libp2p_node(make_settings(tmp_path / "relay", relay={"listen": ["/ip4/127.0.0.1/tcp/0"]}), "relay"):
        pass
    process = [p.name for p in patches.REGISTRY if p.scope == "process"]
    assert [name for name in process if not patches.installed(name)] == []
    patches.apply_all()  # idempotent: nothing is wrapped twice
    assert [name for name in process if not patches.installed(name)] == []


def test_each_process_patch_reverts_to_upstream_and_back() -> None:
    patches.apply_all()
    for patch in patches.REGISTRY:
        if patch.scope != "process":
            continue
        with patches.reverted(patch.name):
            assert not patches.installed(patch.name), patch.name
            for change in patch.changes:
                if isinstance(change, patches.Swap):
                    assert getattr(change.owner, change.attribute) is change.original
        assert patches.installed(patch.name), patch.name


def test_a_patch_switched_off_by_environment_stays_off() -> None:
    code = (
        "import trio\n"
        "from peerup.plugins.libp2p import patches\n"
        "patches.apply_all()\n"
        "print(patches.installed('log-noise'), patches.enabled('close-host'), patches.installed('relay-pump'))"
    )
    assert _run(code, PEERUP_PATCHES_OFF="log-noise,close-host") == "False False True"


def test_an_unknown_patch_name_is_refused_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import peerup.plugins.libp2p.patches"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PEERUP_PATCHES_OFF": "no-such-patch"},
        check=False,
    )
    assert done.returncode != 0
    assert "PEERUP_PATCHES_OFF: unknown patch no-such-patch (known: dht-protocol," in done.stderr


def test_every_upstream_reference_is_a_line_of_the_installed_package() -> None:
    site = REPO / patches.SITE_PACKAGES
    wrong = []
    for patch in patches.REGISTRY:
        for ref in patch.upstream:
            path, line = ref.split(":")
            source = site / path
            if not source.is_file() or int(line) > len(source.read_text().splitlines()):
                wrong.append(f"{patch.name}: {ref}")
    assert wrong == []


def test_every_entry_names_a_test_that_exists_or_says_why_not() -> None:
    for patch in patches.REGISTRY:
        if patch.test is None:
            assert patch.evidence, f"{patch.name}: no test and no evidence"
            continue
        path, _, name = patch.test.partition("::")
        assert re.search(rf"^(async )?def {re.escape(name)}\(", (REPO / path).read_text(), re.M), patch.test


def _doc_rows() -> dict[str, str]:
    """The registry table of docs/libp2p-workarounds.md: patch name (second column) -> row."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and re.fullmatch(r"`[a-z0-9-]+`", cells[1]):
            rows[cells[1].strip("`")] = line
    return rows


def test_the_docs_list_exactly_the_registry() -> None:
    rows = _doc_rows()
    assert sorted(rows) == sorted(patches.BY_NAME)
    for patch in patches.REGISTRY:
        row = rows[patch.name]
        assert row.startswith(f"| {patch.label} |"), patch.name
        assert f"| {patch.scope} |" in row, patch.name
        assert patch.test is None or f"`{patch.test}`" in row, patch.name
        assert patch.test is not None or "no test" in row, patch.name
        for ref in patch.upstream:
            assert f"`{ref.removeprefix('libp2p/')}`" in row, (patch.name, ref)


@pytest.mark.slow
@pytest.mark.parametrize("patch", [p for p in patches.REGISTRY if p.test is not None], ids=lambda p: p.name)
def test_the_named_test_fails_with_its_patch_off(patch: patches.Patch, tmp_path: Path) -> None:
    assert patch.test is not None
    report = tmp_path / "report.xml"
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", patch.test, "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts="),
            *("-o", f"timeout={NAMED_TEST_TIMEOUT}", f"--junitxml={report}"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=NAMED_TEST_TIMEOUT + 60,
        env={**os.environ, patches.OFF_ENV: patch.name},
        check=False,
    )
    tail = done.stdout[-3000:]
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert suite is not None, tail
    counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
    if counts["skipped"] == counts["tests"]:
        pytest.skip(f"{patch.test} was skipped here: {tail.strip().splitlines()[-1]}")
    # A failure, not an error: a fixture that breaks says nothing about the patch.
    assert counts["failures"] >= 1, f"{patch.test} did not fail with {patch.name} off ({counts}):\n{tail}"
