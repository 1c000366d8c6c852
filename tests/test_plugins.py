"""Plugin loading through the real entry-point group, ordering, replacement, failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from peerup.core import hookspecs
from peerup.core.errors import PluginError
from peerup.core.hookspecs import hookimpl
from peerup.core.node import PeerRecord
from peerup.core.plugins import PluginHost, describe_plugins, load_plugins
from peerup.core.settings import Settings, load_settings
from peerup.plugins.backoff import ExponentialBackoff
from peerup.pytest_fixtures import InstallPlugin

FIXED_RETRY = """
from peerup.core.hookspecs import hookimpl
from peerup.core.node import PeerRecord

class Fixed:
    def delays(self):
        yield 0.25

@hookimpl
def retry_policy(settings, service):
    return Fixed()
"""

BROKEN = """
raise RuntimeError("database of tricks missing")
"""


def test_builtins_are_registered_through_the_entry_point_group(home: Path) -> None:
    host = load_plugins()
    assert set(host.plugin_names()) == {"libp2p", "backoff", "proxy", "peers"}
    assert host.hooks_of("backoff") == ("retry_policy",)
    assert host.hooks_of("proxy") == ("proxy_stream",)
    assert {"open_node", "discover_peer", "dial"} <= set(host.hooks_of("libp2p"))


def test_selected_plugin_replaces_a_builtin(home: Path, install_plugin: InstallPlugin) -> None:
    install_plugin("fixed-retry", "fixed_retry", FIXED_RETRY)
    settings = load_settings(home)
    builtin = load_plugins().retry_policy(settings, None)
    assert isinstance(builtin, ExponentialBackoff)
    chosen = load_plugins(["fixed-retry"]).retry_policy(settings, None)
    assert chosen is not None
    assert list(chosen.delays()) == [0.25]


def test_installed_but_not_selected_is_listed_inactive(home: Path, install_plugin: InstallPlugin) -> None:
    install_plugin("fixed-retry", "fixed_retry", FIXED_RETRY)
    rows = {row.name: row for row in describe_plugins()}
    assert rows["fixed-retry"].active is False
    assert rows["fixed-retry"].distribution == "peerup-fixed-retry"
    assert rows["fixed-retry"].hooks == ("retry_policy",)
    assert rows["backoff"].active and rows["backoff"].builtin
    # Only the plugins this test knows: contrib packages may be installed beside them.
    known = {"backoff", "libp2p", "proxy", "fixed-retry"}
    assert {row.name: row.active for row in describe_plugins(["fixed-retry"], ["proxy"]) if row.name in known} == {
        "backoff": True,
        "libp2p": True,
        "proxy": False,
        "fixed-retry": True,
    }


def test_disabled_builtin_is_not_loaded(home: Path) -> None:
    host = load_plugins(disabled=["proxy"])
    assert "proxy" not in host.plugin_names()


def test_unknown_plugin_name_is_one_line(home: Path) -> None:
    with pytest.raises(PluginError, match=r"^plugin 'nope' is not installed \(installed: backoff, .*libp2p, .*proxy"):
        load_plugins(["nope"])


def test_broken_plugin_names_plugin_and_distribution(home: Path, install_plugin: InstallPlugin) -> None:
    install_plugin("tricks", "tricks", BROKEN)
    with pytest.raises(PluginError) as info:
        load_plugins(["tricks"])
    assert str(info.value) == (
        "plugin 'tricks' from peerup-tricks 1.0 failed to load: RuntimeError: database of tricks missing"
    )


def _cli(args: list[str], site: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path]), "PEERUP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "peerup", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_broken_plugin_exits_non_zero_without_traceback(home: Path, install_plugin: InstallPlugin) -> None:
    site = install_plugin("tricks", "tricks", BROKEN)
    quiet = _cli(["run", "--plugin", "tricks"], site, home)
    assert quiet.returncode == 3
    assert quiet.stderr.strip().splitlines() == [
        "peerup: error: plugin 'tricks' from peerup-tricks 1.0 failed to load: RuntimeError: database of tricks missing"
    ]
    verbose = _cli(["-v", "run", "--plugin", "tricks"], site, home)
    assert verbose.returncode == 3
    assert "Traceback" in verbose.stderr


def test_cli_plugins_lists_name_distribution_hooks_active(home: Path, install_plugin: InstallPlugin) -> None:
    site = install_plugin("fixed-retry", "fixed_retry", FIXED_RETRY)
    listing = _cli(["plugins"], site, home)
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert lines["fixed-retry"][1:4] == ["peerup-fixed-retry", "1.0", "no"]
    assert lines["fixed-retry"][4:] == ["retry_policy"]
    assert lines["backoff"][1:4] == ["peerup", lines["backoff"][2], "yes"]
    selected = _cli(["plugins", "--plugin", "fixed-retry"], site, home)
    rows = {line.split()[0]: line.split() for line in selected.stdout.splitlines()[1:]}
    assert rows["fixed-retry"][3] == "yes"


class _Recorder:
    def __init__(self, name: str, answer: str | None, log: list[str]) -> None:
        self.name, self.answer, self.log = name, answer, log

    @hookimpl
    async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> PeerRecord | None:
        self.log.append(self.name)
        return None if self.answer is None else PeerRecord(peer_id, (), source=self.answer)


async def _call(host: PluginHost) -> object:
    record = await host.discover_peer(None, "p", None)  # type: ignore[arg-type]
    return None if record is None else record.source


@pytest.mark.anyio
async def test_async_hooks_first_non_none_wins_in_pluggy_order() -> None:
    log: list[str] = []
    host = PluginHost.from_objects(
        [("builtin", _Recorder("builtin", "from-builtin", log)), ("third", _Recorder("third", None, log))]
    )
    # The later-registered (selected) plugin is asked first; its None passes the turn on.
    assert await _call(host) == "from-builtin"
    assert log == ["third", "builtin"]

    log.clear()
    host = PluginHost.from_objects(
        [("builtin", _Recorder("builtin", "from-builtin", log)), ("third", _Recorder("third", "from-third", log))]
    )
    assert await _call(host) == "from-third"
    assert log == ["third"]  # the loser's coroutine was never started


@pytest.mark.anyio
async def test_plugin_exception_in_async_hook_is_named() -> None:
    class Exploding:
        @hookimpl
        async def discover_peer(self, node: object, peer_id: str, settings: Settings) -> None:
            raise KeyError("boom")

    host = PluginHost.from_objects([("exploding", Exploding())])
    with pytest.raises(PluginError, match=r"^plugin exploding failed in discover_peer: KeyError: 'boom'$"):
        await _call(host)


def test_hook_with_misspelt_argument_is_rejected() -> None:
    class Typo:
        @hookimpl
        def retry_policy(self, settings: Settings, servise: object) -> None:
            return None

    with pytest.raises(PluginError, match=r"plugin typo: .*servise"):
        PluginHost.from_objects([("typo", Typo())])


def test_every_hook_is_documented() -> None:
    hooks = [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "peerup_spec")]
    assert sorted(hooks) == [
        "configure",
        "dial",
        "discover_peer",
        "identity",
        "open_node",
        "parse_peer_id",
        "proxy_stream",
        "resolve_name",
        "retry_policy",
    ]
    architecture = (Path(__file__).parent.parent / "docs" / "architecture.md").read_text()
    for name in hooks:
        assert getattr(hookspecs, name).__doc__
        assert f"`{name}`" in architecture


def test_configure_is_called_on_every_plugin_and_a_bad_section_stops_startup(home: Path) -> None:
    from peerup.core.errors import ConfigError
    from peerup.core.runtime import Runtime

    seen: list[str] = []

    class Checks:
        def __init__(self, name: str, ok: bool) -> None:
            self.name, self.ok = name, ok

        @hookimpl
        def configure(self, settings: Settings) -> None:
            seen.append(self.name)
            if not self.ok:
                raise ConfigError(f"[plugin.{self.name}] level: expected a number")

    settings = load_settings(home)
    Runtime(settings, PluginHost.from_objects([("a", Checks("a", True)), ("b", Checks("b", True))]))
    assert sorted(seen) == ["a", "b"]
    with pytest.raises(ConfigError, match=r"^\[plugin.bad\] level: expected a number$"):
        Runtime(settings, PluginHost.from_objects([("good", Checks("good", True)), ("bad", Checks("bad", False))]))
