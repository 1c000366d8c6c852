"""In-process integration tests of the libp2p plugin with real hosts, relay and DHT.

Every host listens on 127.0.0.1; a server that advertises only its circuit
address is found through the relay's DHT and reached through the relay.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream, TaskStatus

from peerup.core.node import Node, PeerAttribute
from peerup.core.settings import Settings
from peerup.plugins.libp2p import plugin
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import Libp2pNode, open_libp2p_node
from peerup.testing import RELAYED_ONLY

ECHO = "/peerup/test-echo/1.0.0"
LOCAL = "/ip4/127.0.0.1/tcp/0"
#: Fast reconnects for the tests: 0.1, 0.2, 0.4, 0.5, 0.5 ...
FAST_RETRY = {"initial": 0.1, "multiplier": 2.0, "max_delay": 0.5}


def relay_settings(home: Path, listen: str = LOCAL) -> Settings:
    if not (home / "identity.key").exists():
        create_identity(home)
    return Settings(home=home, relay={"listen": [listen]})


def node_settings(home: Path, relay_addr: str) -> Settings:
    create_identity(home)
    # Relayed paths are what these tests check (see peerup.testing.RELAYED_ONLY).
    return Settings(home=home, listen=[LOCAL], relays=[relay_addr], retry=FAST_RETRY, nat=RELAYED_ONLY)


async def echo(stream: ByteStream, remote_peer: str) -> None:
    async for chunk in stream:
        await stream.send(chunk)
    await stream.send_eof()


async def roundtrip(stream: ByteStream, payload: bytes) -> bytes:
    await stream.send(payload)
    await stream.send_eof()
    received = b""
    async for chunk in stream:
        received += chunk
    await stream.aclose()
    return received


@asynccontextmanager
async def relay_and_server(tmp_path: Path) -> AsyncIterator[tuple[Libp2pNode, Libp2pNode, str]]:
    async with open_libp2p_node(relay_settings(tmp_path / "relay"), "relay") as relay:
        relay_addr = relay.listen_addrs()[0]
        async with open_libp2p_node(node_settings(tmp_path / "server", relay_addr), "node") as server:
            server.set_stream_handler(ECHO, echo)
            yield relay, server, relay_addr


@pytest.mark.anyio
async def test_client_finds_server_in_dht_and_talks_through_relay(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with relay_and_server(tmp_path) as (_relay, server, relay_addr):
            settings = node_settings(tmp_path / "client", relay_addr)
            async with open_libp2p_node(settings, "node") as client:
                assert isinstance(client, Node)
                # The server advertises only its circuit address.
                assert all("/p2p-circuit" in str(a) for a in server.host.get_addrs())

                record = await plugin.discover_peer(client, server.peer_id, settings)
                # "peerstore" when the DHT's own startup refresh (FIND_NODE self at the relay)
                # already brought the server's circuit address home.
                assert record is not None and record.source in {"dht", "relay", "peerstore"}, record
                assert any("/p2p-circuit" in a for a in record.addrs)

                stream = await plugin.dial(client, record, ECHO, settings)
                assert stream is not None
                assert stream.extra(PeerAttribute.path) == "relayed"
                assert stream.extra(PeerAttribute.remote_peer) == server.peer_id
                assert "/p2p-circuit" in stream.extra(PeerAttribute.remote_address)
                assert await roundtrip(stream, b"hello " * 1000) == b"hello " * 1000

                # No direct connection between client and server: only the circuit.
                conns = client.host.get_network().get_connections(server.host.get_id())
                assert conns and all("/p2p-circuit" in str(c.get_transport_addresses()[0]) for c in conns)

                again = await plugin.discover_peer(client, server.peer_id, settings)
                assert again is not None and again.source == "connected" and again.connected


@pytest.mark.anyio
async def test_discover_unknown_peer_returns_none_and_dial_says_not_found(tmp_path: Path) -> None:
    from peerup.core.errors import PeerNotFound
    from peerup.core.node import PeerRecord

    with anyio.fail_after(10):
        async with relay_and_server(tmp_path) as (_relay, _server, relay_addr):
            settings = Settings(home=tmp_path / "client", listen=[LOCAL])
            create_identity(settings.home)
            async with open_libp2p_node(settings, "node") as client:
                stranger = "12D3KooWAyAYZEq16AqHpcvM8dFS7fToSQPMjdmvrZ8j5VRiokqW"
                assert await plugin.discover_peer(client, stranger, settings) is None
                # The relay answers NO_RESERVATION: the peer is not there, not "unreachable".
                with pytest.raises(PeerNotFound, match="holds no reservation on 1 relay"):
                    await plugin.dial(
                        client, PeerRecord(stranger, (f"{relay_addr}/p2p-circuit/p2p/{stranger}",)), ECHO, settings
                    )
                with pytest.raises(ValueError, match="not a peer ID"):
                    client.parse_peer_id("hello")


async def run_relay(settings: Settings, stop: anyio.Event, *, task_status: TaskStatus[Libp2pNode]) -> None:
    async with open_libp2p_node(settings, "relay") as relay:
        task_status.started(relay)
        await stop.wait()


async def wait_until_reserved(node: Libp2pNode, reserved: bool) -> None:
    while node.relays[0].reserved is not reserved:
        await anyio.sleep(0.05)


@pytest.mark.anyio
async def test_reservation_comes_back_after_relay_restart(tmp_path: Path) -> None:
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            stop_first = anyio.Event()
            relay = await tg.start(run_relay, relay_settings(tmp_path / "relay"), stop_first)
            relay_addr = relay.listen_addrs()[0]
            port = relay_addr.split("/tcp/")[1].split("/")[0]
            async with open_libp2p_node(node_settings(tmp_path / "server", relay_addr), "node") as server:
                server.set_stream_handler(ECHO, echo)
                assert server.relays[0].reserved

                stop_first.set()  # the relay goes away ...
                await wait_until_reserved(server, False)
                stop_second = anyio.Event()
                fixed = relay_settings(tmp_path / "relay", f"/ip4/127.0.0.1/tcp/{port}")
                await tg.start(run_relay, fixed, stop_second)  # ... and comes back, same port and ID
                await wait_until_reserved(server, True)

                settings = node_settings(tmp_path / "client", relay_addr)
                async with open_libp2p_node(settings, "node") as client:
                    record = await plugin.discover_peer(client, server.peer_id, settings)
                    assert record is not None
                    stream = await plugin.dial(client, record, ECHO, settings)
                    assert stream is not None and stream.extra(PeerAttribute.path) == "relayed"
                    assert await roundtrip(stream, b"back") == b"back"
            stop_second.set()


@pytest.mark.anyio
async def test_stopped_host_frees_its_port(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        async with open_libp2p_node(relay_settings(tmp_path / "relay"), "relay") as relay:
            port = int(relay.listen_addrs()[0].split("/tcp/")[1].split("/")[0])
            await (await anyio.connect_tcp("127.0.0.1", port)).aclose()
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)
        # And the port can be bound again at once.
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
