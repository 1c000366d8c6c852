"""The job users come for: a local port leading to a service on another node.

Real libp2p hosts, a real relay, the built-in plugins and real TCP sockets at
both ends; the client reaches the server only through the relay.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from peerup.core.errors import ConfigError, RetriesExhausted, ServiceError
from peerup.core.node import Node, PeerAttribute
from peerup.core.runtime import Runtime
from peerup.core.settings import ProxySettings
from peerup.pytest_fixtures import log_event
from peerup.testing import (
    RELAYED_ONLY,
    client_node,
    echo_handler,
    free_port,
    read_all,
    relay,
    serving_node,
    tcp_service,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


def retry_delays(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The delays the core announced ("retrying in 0.4 s"), in order."""
    return [
        record.getMessage().rsplit("retrying in ", 1)[1] for record in caplog.records if record.name == "peerup.retry"
    ]


@asynccontextmanager
async def tunnel(tmp_path: Path, service_addr: str) -> AsyncIterator[tuple[int, Runtime, Node]]:
    """relay + server exposing ``svc`` at service_addr + client proxy; yields the local port."""
    async with (
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": service_addr}) as (
            _,
            server,
        ),
        client_node(tmp_path, relay_addr) as (runtime, client),
        anyio.create_task_group() as tg,
    ):
        proxy = ProxySettings(peer=server.peer_id, service="svc", port=0)
        port = await tg.start(runtime.serve_proxy, client, proxy, tg)
        yield port, runtime, client
        tg.cancel_scope.cancel()


async def test_bulk_both_directions_is_byte_exact_through_the_relay(tmp_path: Path) -> None:
    """64 MiB each way at once, checked by SHA-256 at both ends."""
    size = 64 * MiB
    block = os.urandom(MiB)
    expected = hashlib.sha256(block * 64).hexdigest()
    received_by_service = hashlib.sha256()
    service_got = anyio.Event()

    async def service(stream: SocketStream) -> None:
        async def upload() -> None:  # service -> client
            for _ in range(size // MiB):
                await stream.send(block)
            await stream.send_eof()

        async with stream, anyio.create_task_group() as tg:
            tg.start_soon(upload)
            async for chunk in stream:
                received_by_service.update(chunk)
            service_got.set()

    async with tcp_service(service) as addr, tunnel(tmp_path, addr) as (port, _, _):
        received_by_client = hashlib.sha256()
        with anyio.fail_after(120):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream, anyio.create_task_group() as tg:

                async def download() -> None:
                    async for chunk in stream:
                        received_by_client.update(chunk)

                tg.start_soon(download)
                for _ in range(size // MiB):
                    await stream.send(block)
                await stream.send_eof()
            await service_got.wait()
    assert received_by_service.hexdigest() == expected
    assert received_by_client.hexdigest() == expected


async def test_half_close_client_still_gets_the_reply(tmp_path: Path) -> None:
    async def service(stream: SocketStream) -> None:
        async with stream:
            request = await read_all(stream)  # until the client's FIN
            # Think for a while: upstream's relay closed a half-closed circuit after 0.6 s.
            await anyio.sleep(1.5)
            await stream.send(b"got " + str(len(request)).encode() + b" bytes: " + hashlib.sha256(request).digest())
            await stream.send_eof()

    request = os.urandom(300_000)
    async with tcp_service(service) as addr, tunnel(tmp_path, addr) as (port, _, _):
        with anyio.fail_after(20):
            stream = await anyio.connect_tcp("127.0.0.1", port)
            await stream.send(request)
            await stream.send_eof()
            reply = await read_all(stream)
            await stream.aclose()
    assert reply == b"got 300000 bytes: " + hashlib.sha256(request).digest()


async def test_fifty_concurrent_connections_on_one_tunnel(tmp_path: Path) -> None:
    async with tcp_service(echo_handler) as addr, tunnel(tmp_path, addr) as (port, _, _):
        results: dict[int, bool] = {}

        async def one(index: int) -> None:
            payload = os.urandom(20_000) + index.to_bytes(2, "big")
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(payload)
                await stream.send_eof()
                results[index] = await read_all(stream) == payload

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(50):
                    tg.start_soon(one, index)
    assert results == {index: True for index in range(50)}


@pytest.mark.parametrize("path", ["relayed", "direct"])
async def test_a_peers_stream_slots_are_free_again_as_soon_as_its_tunnels_end(tmp_path: Path, path: str) -> None:
    """With room for two streams per peer, sixty tunnels one after another, ended cleanly,
    by a reset from the app, and by a reset from the service, all get through: each
    ended tunnel gives its slot back at once (the issue saw slots held up to 30 s)."""
    import socket
    import struct

    async def service(stream: SocketStream) -> None:
        async with stream:
            data = await stream.receive()
            await stream.send(data)
            if data.startswith(b"service-reset"):
                raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            await read_all(stream)

    nat: dict[str, bool] = {} if path == "direct" else RELAYED_ONLY
    async with (
        tcp_service(service) as addr,
        relay(tmp_path) as relay_addr,
        serving_node(
            tmp_path, relay_addr, {"svc": addr}, auth={"allow_all": True, "max_streams_per_peer": 2}, nat=nat
        ) as (server_rt, server),
        client_node(tmp_path, relay_addr) as (runtime, client),
        anyio.create_task_group() as tg,
    ):
        proxy = ProxySettings(peer=server.peer_id, service="svc", port=0)
        port = await tg.start(runtime.serve_proxy, client, proxy, tg)
        with anyio.fail_after(60):
            for n in range(60):
                how = ("clean", "app-reset", "service-reset")[n % 3]
                stream = await anyio.connect_tcp("127.0.0.1", port)
                await stream.send(f"{how} {n}".encode())
                assert await stream.receive() == f"{how} {n}".encode(), f"tunnel {n} ({how}) refused"
                if how == "app-reset":
                    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
                    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await stream.aclose()
                else:
                    await stream.send_eof()
                    await read_all(stream)
                    await stream.aclose()
            assert await server_rt.drain(20)
        tg.cancel_scope.cancel()


async def test_paused_reader_for_ten_seconds_does_not_kill_a_relayed_tunnel(tmp_path: Path) -> None:
    """A paused terminal: the app stops reading while the service keeps sending."""
    total = 4 * MiB
    data = os.urandom(total)

    async def service(stream: SocketStream) -> None:
        async with stream:
            await stream.send(data)
            await stream.send_eof()

    async with tcp_service(service) as addr, tunnel(tmp_path, addr) as (port, _, _):
        stream = await anyio.connect_tcp("127.0.0.1", port)
        async with stream:
            first = await stream.receive()
            await anyio.sleep(10)  # the reader is paused; windows fill up everywhere
            with anyio.fail_after(30):
                rest = await read_all(stream)
    assert first + rest == data


async def test_service_down_gives_the_client_a_clear_error(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with (
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": dead}) as (
            _,
            server,
        ),
        client_node(tmp_path, relay_addr) as (runtime, client),
    ):
        with anyio.fail_after(20), pytest.raises(ServiceError) as info:
            await runtime.open_service_stream(client, server.peer_id, "svc")
    assert info.value.code == "refused"
    assert str(info.value) == f"service 'svc': local service {dead} refused the connection (Connection refused)"


async def test_unknown_service_is_named(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr) as (runtime, client),
    ):
        with anyio.fail_after(20), pytest.raises(ServiceError) as info:
            await runtime.open_service_stream(client, server.peer_id, "nope")
    assert info.value.code == "unknown-service"
    assert "does not expose a service named 'nope'" in str(info.value)


async def test_local_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    busy = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = busy.extra(anyio.abc.SocketAttribute.local_port)
    expected = pytest.RaisesExc(ConfigError, match=rf"^cannot listen on 127.0.0.1:{port}: .*in use")
    async with busy:
        # Task groups wrap errors; the CLI unwraps them the same way (cli._user_error).
        with pytest.RaisesGroup(expected, flatten_subgroups=True):
            async with relay(tmp_path) as relay_addr, client_node(tmp_path, relay_addr) as (runtime, client):
                proxy = ProxySettings(peer=client.peer_id, service="svc", port=port)
                async with anyio.create_task_group() as tg:
                    await tg.start(runtime.serve_proxy, client, proxy, tg)


async def test_retries_follow_the_policy_and_reach_a_peer_that_comes_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server starts during the backoff; the pending connection reaches it."""
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    async with tcp_service(echo_handler) as addr, relay(tmp_path) as relay_addr:
        # Learn the server's identity first, then stop it: it is "not yet up".
        async with serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server):
            server_id = server.peer_id
        async with client_node(tmp_path, relay_addr) as (runtime, client), anyio.create_task_group() as tg:
            opened: list[object] = []
            done = anyio.Event()

            async def connect() -> None:
                opened.append(await runtime.open_service_stream(client, server_id, "svc"))
                done.set()

            started = anyio.current_time()
            with log_event("peerup.retry", "retrying in") as retried:
                tg.start_soon(connect)
                with anyio.fail_after(20):
                    await retried.wait()  # the first attempt failed: nobody holds that ID now
            async with serving_node(tmp_path, relay_addr, {"svc": addr}, nat=RELAYED_ONLY) as _:
                with anyio.fail_after(20):
                    await done.wait()
                stream = opened[0]
                assert stream.extra(PeerAttribute.path) == "relayed"  # type: ignore[attr-defined]
                await stream.aclose()  # type: ignore[attr-defined]
            elapsed = anyio.current_time() - started
    delays = retry_delays(caplog)
    assert delays[:2] == ["0.2 s", "0.4 s"][: len(delays[:2])]
    assert 1 <= len(delays) <= 3
    assert elapsed >= 0.2


async def test_peer_never_up_gives_up_after_the_policy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    async with relay(tmp_path) as relay_addr:
        async with serving_node(tmp_path, relay_addr, {}) as (_, gone):
            gone_id = gone.peer_id
        async with client_node(tmp_path, relay_addr) as (runtime, client):
            with anyio.fail_after(60), pytest.raises(RetriesExhausted, match="gave up after 4 attempts"):
                await runtime.open_service_stream(client, gone_id, "svc")
    delays = retry_delays(caplog)
    assert delays == ["0.2 s", "0.4 s", "0.8 s"]


async def test_a_burst_on_a_cold_tunnel_makes_one_lookup_and_one_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """100 local connections at once to a peer not yet connected: one discovery, one dial."""
    caplog.set_level(logging.INFO, logger="peerup.libp2p")
    async with tcp_service(echo_handler) as addr, tunnel(tmp_path, addr) as (port, _, _):
        results: list[bool] = []

        async def one(index: int) -> None:
            payload = index.to_bytes(4, "big") * 100
            stream = await anyio.connect_tcp("127.0.0.1", port)
            async with stream:
                await stream.send(payload)
                await stream.send_eof()
                results.append(await read_all(stream) == payload)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for index in range(100):
                    tg.start_soon(one, index)
    lookups = [r for r in caplog.records if "address(es) from" in r.getMessage()]
    assert results == [True] * 100
    assert len(lookups) == 1, [r.getMessage() for r in lookups]
