"""Who may reach what: authorized_keys, per-service allowlists, hostile input.

Real nodes, a real relay and a real TCP service that counts its connections, so
"refused before any byte reaches the local service" is observed, not assumed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from peerup.core import auth
from peerup.core.errors import ServiceError
from peerup.core.node import Node
from peerup.core.runtime import Runtime
from peerup.core.settings import ServiceSettings
from peerup.plugins.libp2p.node import Libp2pNode, parse_peer_id
from peerup.plugins.libp2p.stream import Libp2pByteStream
from peerup.testing import client_node, echo_handler, exchange, read_all, relay, serving_node, tcp_service

pytestmark = pytest.mark.anyio


class CountingEcho:
    """A local service that records every connection it is given."""

    def __init__(self) -> None:
        self.connections = 0

    async def __call__(self, stream: SocketStream) -> None:
        self.connections += 1
        await echo_handler(stream)


@asynccontextmanager
async def two_clients(tmp_path: Path, relay_addr: str) -> AsyncIterator[tuple[Runtime, Node, Runtime, Node]]:
    async with (
        client_node(tmp_path, relay_addr, "alice") as (alice_rt, alice),
        client_node(tmp_path, relay_addr, "mallory") as (mallory_rt, mallory),
    ):
        yield alice_rt, alice, mallory_rt, mallory


async def test_only_authorized_peers_reach_the_service(tmp_path: Path) -> None:
    service = CountingEcho()
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        two_clients(tmp_path, relay_addr) as (
            alice_rt,
            alice,
            mallory_rt,
            mallory,
        ),
        serving_node(tmp_path, relay_addr, {"ssh": addr}, authorized=[alice.peer_id]) as (_, server),
    ):
        with anyio.fail_after(20):
            stream = await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            assert await exchange(stream, b"hello") == b"hello"
            assert service.connections == 1
            with pytest.raises(ServiceError) as info:
                await mallory_rt.open_service_stream(mallory, server.peer_id, "ssh")
    assert info.value.code == "unauthorized"
    assert str(info.value) == f"service 'ssh': peer {mallory.peer_id} is not authorized for service 'ssh'"
    assert service.connections == 1  # mallory's stream never reached the local service


async def test_authorized_keys_changes_apply_without_restart(tmp_path: Path) -> None:
    service = CountingEcho()
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        client_node(tmp_path, relay_addr, "alice") as (alice_rt, alice),
        serving_node(tmp_path, relay_addr, {"ssh": addr}, authorized=[]) as (
            server_rt,
            server,
        ),
    ):
        keys = server_rt.settings.authorized_keys_file
        with anyio.fail_after(30):
            with pytest.raises(ServiceError, match="not authorized"):
                await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            auth.add(keys, alice.peer_id, "alice's laptop", parse_peer_id)
            stream = await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            assert await exchange(stream, b"in") == b"in"
            assert auth.remove(keys, alice.peer_id, parse_peer_id)
            with pytest.raises(ServiceError, match="not authorized"):
                await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
    assert service.connections == 1


async def test_service_allowlist_narrows_authorized_keys(tmp_path: Path) -> None:
    service = CountingEcho()
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        two_clients(tmp_path, relay_addr) as (
            alice_rt,
            alice,
            mallory_rt,
            mallory,
        ),
        serving_node(tmp_path, relay_addr, {}, authorized=[alice.peer_id, mallory.peer_id]) as (
            server_rt,
            server,
        ),
    ):
        narrowed = {
            "ssh": ServiceSettings(name="ssh", address=addr, allow=[alice.peer_id]),
            "web": ServiceSettings(name="web", address=addr),
        }
        server_rt.expose(server, narrowed)
        with anyio.fail_after(30):
            stream = await mallory_rt.open_service_stream(mallory, server.peer_id, "web")
            assert await exchange(stream, b"web") == b"web"
            with pytest.raises(ServiceError, match="not authorized for service 'ssh'"):
                await mallory_rt.open_service_stream(mallory, server.peer_id, "ssh")
            stream = await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            assert await exchange(stream, b"ssh") == b"ssh"
    assert service.connections == 2


async def test_revoking_a_peer_closes_its_open_tunnels(tmp_path: Path) -> None:
    service = CountingEcho()
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        client_node(tmp_path, relay_addr, "alice") as (alice_rt, alice),
        serving_node(tmp_path, relay_addr, {"ssh": addr}, authorized=[alice.peer_id]) as (server_rt, server),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(server_rt.watch_authorized_keys, 0.1)
        with anyio.fail_after(20):
            stream = await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            await stream.send(b"still here")
            assert await stream.receive() == b"still here"
            auth.remove(server_rt.settings.authorized_keys_file, alice.peer_id, parse_peer_id)
            # The open tunnel is closed by the serving side: alice reads the end of it.
            assert await read_all(stream) == b""
            await stream.aclose()
            assert await server_rt.drain(20)
        tg.cancel_scope.cancel()


def test_malformed_lines_are_reported_with_line_numbers_and_skipped(tmp_path: Path) -> None:
    good = "12D3KooWLT51cyYefJ7fu8GvJ2PMLVU2fGede1P9tfM4FPqjj6To"
    text = f"# laptops\n\n{good} my laptop\n12D3KooWabc typo\n   \nrm -rf /\n"
    entries, problems = auth.parse(text, parse_peer_id)
    assert [(e.peer_id, e.comment, e.line) for e in entries] == [(good, "my laptop", 3)]
    assert [p.line for p in problems] == [4, 6]
    keys = tmp_path / "authorized_keys"
    keys.write_text(text)
    loaded = auth.AuthorizedKeys(keys, parse_peer_id)
    assert loaded.allows(good)
    assert not loaded.allows("12D3KooWabc")
    assert len(loaded) == 1


async def test_garbage_and_floods_do_not_take_the_node_down(tmp_path: Path) -> None:
    """Hostile input from every layer, then a good client is still served."""
    service = CountingEcho()
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        two_clients(tmp_path, relay_addr) as (
            alice_rt,
            alice,
            mallory_rt,
            mallory,
        ),
        serving_node(
            tmp_path, relay_addr, {"ssh": addr}, authorized=[alice.peer_id], listen=["/ip4/127.0.0.1/tcp/0"]
        ) as (_, server),
    ):
        assert isinstance(server, Libp2pNode) and isinstance(mallory, Libp2pNode)
        with anyio.fail_after(60):
            # 1. Raw garbage at the node's TCP port, instead of a libp2p handshake.
            host_port = next(a for a in server.listen_addrs() if "/p2p-circuit" not in a and "/tcp/" in a)
            port = int(host_port.split("/tcp/")[1].split("/")[0])
            for junk in (os.urandom(70_000), b"\x13/multistream/1.0.0\n" + b"\xff" * 5000, b""):
                sock = await anyio.connect_tcp("127.0.0.1", port)
                async with sock:
                    if junk:
                        await sock.send(junk)
                    await sock.send_eof()
                    await read_all(sock)
            # 2. An unknown service name.
            with pytest.raises(ServiceError, match=r"does not expose a service named .nope."):
                await alice_rt.open_service_stream(alice, server.peer_id, "nope")
            # 3. A flood of streams from an unauthorized peer, sending garbage.
            record = await mallory_rt.connect_to_peer(mallory, server.peer_id)
            refused = 0

            async def hostile() -> None:
                nonlocal refused
                stream = await mallory.open_stream(record.peer_id, record.addrs, "/peerup/service/ssh/1.0.0")
                assert isinstance(stream, Libp2pByteStream)
                try:
                    await stream.send(os.urandom(4096))
                    reply = await read_all(stream)
                    if reply.startswith(b"ERR unauthorized"):
                        refused += 1
                finally:
                    await stream.aclose()

            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(hostile)
            assert refused == 100
            # 4. The node still serves the next good client.
            stream = await alice_rt.open_service_stream(alice, server.peer_id, "ssh")
            assert await exchange(stream, b"still here") == b"still here"
    assert service.connections == 1


async def test_streams_per_peer_are_bounded(tmp_path: Path) -> None:
    async def slow(stream: SocketStream) -> None:
        """Answers nothing until the client is done: each connection stays open meanwhile."""
        async with stream:
            await read_all(stream)

    async with (
        tcp_service(slow) as addr,
        relay(tmp_path) as relay_addr,
        client_node(tmp_path, relay_addr, "a") as (
            rt,
            client,
        ),
        serving_node(
            tmp_path, relay_addr, {"svc": addr}, authorized=[client.peer_id], auth={"max_streams_per_peer": 3}
        ) as (server_rt, server),
    ):
        with anyio.fail_after(30):
            held = [await rt.open_service_stream(client, server.peer_id, "svc") for _ in range(3)]
            with pytest.raises(ServiceError) as info:
                await rt.open_service_stream(client, server.peer_id, "svc")
            assert info.value.code == "busy"
            await held.pop().aclose()  # its tunnel ends, freeing one of the three slots
            while server_rt.open_tunnels > 2:  # the serving side has seen it end (bounded by fail_after)
                await anyio.sleep(0.01)
            held.append(await rt.open_service_stream(client, server.peer_id, "svc"))
            for stream in held:
                await stream.aclose()
