"""The idle plugin wrapped around the built-in proxy_stream, through a real relay.

One serving node exposes two echo services: ``batch`` (listed in
``[plugin.idle] timeouts``) and ``shell`` (not listed). Three real TCP clients
use the client node's proxy ports at once: an idle one on ``batch`` is cut,
a chatty one on ``batch`` and an idle one on ``shell`` are left alone.
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
from peerup.core.node import Node
from peerup.core.plugins import describe_plugins, load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import ProxySettings, Settings
from peerup.testing import echo_handler, make_settings, read_all, relay, tcp_service

from peerup_idle import Counters, IdlePlugin, IdleSettings

IDLE = 0.6


def open_to_all() -> dict[str, Any]:
    """Serve any peer, where this peerup has service authorization at all."""
    return {"auth": {"allow_all": True}} if "auth" in Settings.model_fields else {}


@asynccontextmanager
async def node(home: Path, relay_addr: str, **values: Any) -> AsyncIterator[tuple[Runtime, Node]]:
    """A node with the plugins its settings select, as ``peerup run`` loads them."""
    settings = make_settings(home, relays=[relay_addr], **values)
    runtime = Runtime(settings, load_plugins(settings.plugins, settings.disable_plugins))
    async with runtime.node() as started:
        runtime.expose(started, settings.services)
        yield runtime, started


def plugin_of(runtime: Runtime) -> IdlePlugin:
    plugin = runtime.plugins.pm.get_plugin("idle")
    assert isinstance(plugin, IdlePlugin)
    return plugin


@pytest.mark.anyio
async def test_idle_timeout_closes_an_idle_tunnel_and_leaves_active_ones_alone(tmp_path: Path) -> None:
    chatter = [f"{i:02d}".encode() for i in range(14)]  # one every 0.15 s: 2.1 s, over three timeouts
    results: dict[str, Any] = {}
    async with (
        tcp_service(echo_handler) as batch_addr,
        tcp_service(echo_handler) as shell_addr,
        relay(tmp_path) as relay_addr,
        node(
            tmp_path / "server",
            relay_addr,
            services={"batch": {"address": batch_addr}, "shell": {"address": shell_addr}},
            plugins=["idle"],
            plugin={"idle": {"timeouts": {"batch": IDLE}}},
            **open_to_all(),
        ) as (server_rt, server),
        node(tmp_path / "client", relay_addr, plugins=["idle"]) as (client_rt, client),
        anyio.create_task_group() as proxies,
    ):
        ports = {
            name: await proxies.start(
                client_rt.serve_proxy, client, ProxySettings(peer=server.peer_id, service=name, port=0), proxies
            )
            for name in ("batch", "shell")
        }

        async def idle_batch() -> None:
            stream = await anyio.connect_tcp("127.0.0.1", ports["batch"])
            async with stream:
                await stream.send(b"x")
                assert await stream.receive() == b"x"
                quiet_since = anyio.current_time()
                results["idle_rest"] = await read_all(stream)  # returns when the tunnel is closed
                results["idle_lived"] = anyio.current_time() - quiet_since

        async def chatty_batch() -> None:
            stream = await anyio.connect_tcp("127.0.0.1", ports["batch"])
            async with stream:
                for message in chatter:
                    await stream.send(message)
                    assert await stream.receive() == message
                    await anyio.sleep(0.15)
                await stream.send_eof()
                results["chatty_rest"] = await read_all(stream)

        async def idle_shell() -> None:
            stream = await anyio.connect_tcp("127.0.0.1", ports["shell"])
            async with stream:
                await stream.send(b"hi")
                assert await stream.receive() == b"hi"
                await anyio.sleep(3 * IDLE)  # an idle SSH session: must survive
                await stream.send(b"still here")
                await stream.send_eof()
                results["shell_rest"] = await read_all(stream)

        with anyio.fail_after(15):
            async with anyio.create_task_group() as clients:
                clients.start_soon(idle_batch)
                clients.start_soon(chatty_batch)
                clients.start_soon(idle_shell)
            # The serving side finishes its bookkeeping just after the clients see EOF.
            while plugin_of(server_rt).counters()["batch"].open or plugin_of(server_rt).counters()["shell"].open:
                await anyio.sleep(0.05)
        proxies.cancel_scope.cancel()

    assert results["idle_rest"] == b""
    assert IDLE - 0.05 <= results["idle_lived"] < IDLE + 2.0
    assert results["chatty_rest"] == b""  # it was not cut: it ended with its own EOF, after every echo
    assert results["shell_rest"] == b"still here"

    chatty_bytes = sum(len(m) for m in chatter)
    server_counts = plugin_of(server_rt).counters()
    # Serving side: "down" is peer -> service, "up" is the service's echo back.
    assert server_counts["batch"] == Counters(
        connections=2, open=0, idle_closed=1, bytes_up=1 + chatty_bytes, bytes_down=1 + chatty_bytes
    )
    assert server_counts["shell"] == Counters(connections=1, open=0, idle_closed=0, bytes_up=12, bytes_down=12)
    outbound = plugin_of(client_rt).counters()["outbound"]
    assert (outbound.connections, outbound.idle_closed) == (3, 0)  # the client side never times out
    assert outbound.bytes_up == outbound.bytes_down == 1 + chatty_bytes + 12


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEERUP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "peerup", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_section_from_environment_and_bad_values_fail_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_settings(tmp_path)
    (tmp_path / "config.toml").write_text("[plugin.idle.timeouts]\nllm = 300\n")
    monkeypatch.setenv("PEERUP_PLUGIN__IDLE__TIMEOUTS__DB", "60")
    from peerup.core.settings import load_settings

    assert load_settings(tmp_path).plugin_settings(IdleSettings).timeouts == {"llm": 300.0, "db": 60.0}

    monkeypatch.setenv("PEERUP_PLUGIN__IDLE__TIMEOUTS__DB", "0")
    result = _cli(tmp_path, "run", "--plugin", "idle")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "peerup: error: environment variable PEERUP_PLUGIN__IDLE__TIMEOUTS__DB: "
        "[plugin.idle] timeouts.db: Input should be greater than 0, got 0"
    ]


def test_listed_by_peerup_plugins(tmp_path: Path) -> None:
    rows = {row.name: row for row in describe_plugins(["idle"], ["proxy"])}
    assert (rows["idle"].distribution, rows["idle"].active, rows["proxy"].active) == ("peerup-idle", True, False)
    assert set(rows["idle"].hooks) == {"proxy_stream"}
    listing = _cli(tmp_path, "plugins", "--plugin", "idle")
    assert listing.returncode == 0, listing.stderr
    row = next(line.split() for line in listing.stdout.splitlines() if line.startswith("idle "))
    assert row[1:4] == ["peerup-idle", "0.1.0", "yes"]
