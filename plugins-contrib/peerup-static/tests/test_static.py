"""The static table swapped in for DHT discovery: a peer no relay or DHT knows is reached.

Real libp2p hosts on loopback, no relay anywhere: the serving node holds no
relay slot and is in no DHT; only the client's table knows its address.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from peerup.core.errors import ConfigError, PeerNotFound
from peerup.core.node import Node, PeerAttribute
from peerup.core.plugins import describe_plugins, load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import Settings
from peerup.testing import echo_handler, make_settings, read_all, tcp_service

from peerup_static import StaticPlugin

pytestmark = pytest.mark.anyio

NO_RETRY = {"retries": 0, "initial": 0.1, "multiplier": 2.0, "max_delay": 0.1}


def open_to_all() -> dict[str, Any]:
    """Serve any peer, where this peerup has service authorization at all."""
    return {"auth": {"allow_all": True}} if "auth" in Settings.model_fields else {}


@asynccontextmanager
async def node(home: Path, **values: Any) -> AsyncIterator[tuple[Runtime, Node]]:
    """A node with no relay, with the plugins its settings select (as ``peerup run`` loads them)."""
    settings = make_settings(home, relays=[], retry=NO_RETRY, **values)
    runtime = Runtime(settings, load_plugins(settings.plugins, settings.disable_plugins))
    async with runtime.node() as started:
        runtime.expose(started, settings.services)
        yield runtime, started


def without_peer_id(addr: str) -> str:
    return addr.split("/p2p/", 1)[0]


async def test_static_table_reaches_a_peer_that_no_relay_or_dht_knows(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as service,
        node(tmp_path / "server", services={"svc": {"address": service}}, **open_to_all()) as (_, server),
    ):
        direct = [a for a in server.listen_addrs() if "/p2p-circuit" not in a]
        table = tmp_path / "lan-peers.toml"
        table.write_text(f'[peers]\nhome = ["{without_peer_id(direct[0])}"]\n')
        section = {"static": {"file": str(table)}}
        peers = {"home": server.peer_id}

        # Without the plugin: nobody can say where that peer is.
        async with node(tmp_path / "plain", peers=peers, plugin=section) as (runtime, client):
            with anyio.fail_after(10), pytest.raises(PeerNotFound):
                await runtime.open_service_stream(client, "home", "svc")

        # With it, selected by name as `--plugin static` does: found, dialled directly, carried.
        async with node(tmp_path / "client", peers=peers, plugin=section, plugins=["static"]) as (runtime, client):
            with anyio.fail_after(10):
                record = await runtime.connect_to_peer(client, server.peer_id)
                stream = await runtime.open_service_stream(client, "home", "svc")
                async with stream:
                    await stream.send(b"over the LAN")
                    await stream.send_eof()
                    echoed = await read_all(stream)
                path = stream.extra(PeerAttribute.path)
    assert record.source == "static"
    assert record.addrs == (without_peer_id(direct[0]) + f"/p2p/{server.peer_id}",)
    assert echoed == b"over the LAN"
    assert path == "direct"


async def test_a_table_key_with_the_peer_id_in_its_address_is_a_name_for_proxy(tmp_path: Path) -> None:
    """A hosts-file style entry, no [peers] line: ``nas = ".../p2p/ID"`` makes ``nas`` a peer name."""
    async with (
        tcp_service(echo_handler) as service,
        node(tmp_path / "server", services={"svc": {"address": service}}, **open_to_all()) as (_, server),
    ):
        direct = [a for a in server.listen_addrs() if "/p2p-circuit" not in a]
        section = {"static": {"peers": {"nas": direct[0]}}}
        async with node(tmp_path / "client", plugin=section, plugins=["static"]) as (runtime, client):
            assert runtime.peer_id(client, "nas") == server.peer_id
            with anyio.fail_after(10):
                stream = await runtime.open_service_stream(client, "nas", "svc")
                async with stream:
                    await stream.send(b"by name")
                    await stream.send_eof()
                    assert await read_all(stream) == b"by name"
        # Without the plugin the name means nothing: one line, before any dial.
        async with node(tmp_path / "plain", plugin=section) as (runtime, client):
            with pytest.raises(ConfigError, match=r"^peer 'nas' is neither a name in \[peers\]"):
                runtime.peer_id(client, "nas")


async def test_table_is_reread_unknown_peers_pass_and_bad_keys_are_one_line(tmp_path: Path) -> None:
    table = tmp_path / "client" / "peers.toml"  # the default file, in the home
    async with node(tmp_path / "client", plugins=["static"]) as (runtime, client):
        plugin = runtime.plugins.pm.get_plugin("static")
        assert isinstance(plugin, StaticPlugin)
        other = client.peer_id  # any valid ID will do: lookups do no I/O
        assert plugin.lookup(runtime.settings, client, other) == []  # no file yet: nothing known
        table.write_text(f'[peers]\n"{other}" = "/ip4/10.0.0.7/tcp/4001"\n')
        assert plugin.lookup(runtime.settings, client, other) == [f"/ip4/10.0.0.7/tcp/4001/p2p/{other}"]
        table.write_text(f'[peers]\n"{other}" = ["/ip4/10.0.0.8/tcp/4001", "/ip4/10.0.0.9/tcp/4001"]\n')
        assert len(plugin.lookup(runtime.settings, client, other)) == 2  # edited: re-read, no restart
        table.write_text('[peers]\nnobody = "/ip4/10.0.0.7/tcp/4001"\n')
        with pytest.raises(
            ConfigError, match=r"^static peer table: 'nobody' is neither a name in \[peers\], nor a peer ID"
        ):
            plugin.lookup(runtime.settings, client, other)


@pytest.mark.parametrize(
    ("config", "table", "message"),
    [
        ('file = "missing.toml"', None, "[plugin.static] file: {home}/missing.toml does not exist"),
        ("", "[peers]\nhome = 5\n", "{home}/peers.toml: peers.home: Input should be a valid list"),
        ("", "[peers]\nhome = 'lan-box'\n", "{home}/peers.toml: peers.home: 'lan-box' is not a multiaddr"),
        ("", "peers = [", "{home}/peers.toml: not valid TOML"),
        ("fiel = 'x'", None, "{home}/config.toml: [plugin.static] fiel: Extra inputs are not permitted"),
    ],
)
def test_bad_table_or_section_fails_at_startup(tmp_path: Path, config: str, table: str | None, message: str) -> None:
    make_settings(tmp_path)  # the identity
    (tmp_path / "config.toml").write_text(f"[plugin.static]\n{config}\n")
    if table is not None:
        (tmp_path / "peers.toml").write_text(table)
    result = _cli(tmp_path, "run", "--plugin", "static")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("peerup: error: " + message.format(home=tmp_path))


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEERUP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "peerup", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_listed_by_peerup_plugins(tmp_path: Path) -> None:
    rows = {row.name: row for row in describe_plugins(["static"])}
    assert (rows["static"].distribution, rows["static"].active) == ("peerup-static", True)
    assert set(rows["static"].hooks) == {"configure", "discover_peer", "resolve_name"}
    listing = _cli(tmp_path, "plugins")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("static "))
    assert row[1:4] == ["peerup-static", "0.1.0", "no"]
