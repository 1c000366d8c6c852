"""Reloading services on a running node, and the tunnel registry's byte counts (issue #14).

Real libp2p nodes, a real relay and real TCP services: a reload that keeps a
service must leave its open tunnel carrying bytes, one that removes a service
must cut that service's tunnels (a reset, not a clean end), and the counters
``peerup tunnels`` and the metrics show must equal the bytes that moved.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from peerup.core.errors import ServiceError
from peerup.core.settings import ProxySettings, ServiceSettings
from peerup.core.tunnels import Forward
from peerup.testing import client_node, echo_handler, echo_roundtrip, relay, serving_node, tcp_service

pytestmark = pytest.mark.anyio


class Named:
    """An echo service that records that it was used, to tell two services apart."""

    def __init__(self) -> None:
        self.connections = 0

    async def __call__(self, stream: SocketStream) -> None:
        self.connections += 1
        await echo_handler(stream)


async def test_reload_keeps_allowed_tunnels_and_cuts_those_of_a_removed_service(tmp_path: Path) -> None:
    old, new = Named(), Named()
    async with (
        tcp_service(old) as old_addr,
        tcp_service(new) as new_addr,
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"keep": old_addr, "drop": old_addr}) as (server_rt, server),
        client_node(tmp_path, relay_addr) as (client_rt, client),
    ):
        keep = await client_rt.open_service_stream(client, server.peer_id, "keep")
        drop = await client_rt.open_service_stream(client, server.peer_id, "drop")
        for stream in (keep, drop):
            await stream.send(b"before")
            assert await stream.receive_exactly(6) == b"before"
        assert len(server_rt.registry.connections) == 2

        closed = server_rt.update_services(server, {"keep": ServiceSettings(name="keep", address=new_addr)})

        assert closed == 1
        with anyio.fail_after(10), pytest.raises((anyio.BrokenResourceError, anyio.EndOfStream)):
            await drop.receive()  # the removed service's tunnel ends, and not as a clean end of data
        payload = b"after the reload" * 1000
        await keep.send(payload)
        with anyio.fail_after(10):
            assert await keep.receive_exactly(len(payload)) == payload  # still the same connection to old_addr
        assert (old.connections, new.connections) == (2, 0)
        fresh = await client_rt.open_service_stream(client, server.peer_id, "keep")
        await fresh.send(b"x")
        assert await fresh.receive_exactly(1) == b"x"
        assert new.connections == 1  # a new tunnel gets the new address
        with pytest.raises(ServiceError) as refused:
            await client_rt.open_service_stream(client, server.peer_id, "drop")
        assert refused.value.code == "unknown-service"
        for stream in (keep, fresh):
            await anyio.aclose_forcefully(stream)
        assert server_rt.registry.events.failed[("drop", "unknown-service")] == 1


async def test_forward_counts_bytes_each_way_and_disconnect_ends_it(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"echo": addr}) as (server_rt, server),
        client_node(tmp_path, relay_addr) as (client_rt, client),
        anyio.create_task_group() as tg,
    ):
        proxy = ProxySettings(peer=server.peer_id, service="echo", port=0)
        forward = client_rt.registry.add_forward(Forward("t1", server.peer_id, "echo", "127.0.0.1", 0, False))

        ended = anyio.Event()

        async def run_forward(*, task_status: anyio.abc.TaskStatus[int]) -> None:
            try:
                with forward.scope:
                    await client_rt.serve_proxy(client, proxy, tg, forward=forward, task_status=task_status)
            finally:
                ended.set()

        port = await tg.start(run_forward)
        payload = bytes(range(256)) * 4096  # 1 MiB
        echoed = await echo_roundtrip(port, payload)
        assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert (forward.bytes.up, forward.bytes.down, forward.total) == (len(payload), len(payload), 1)
        up, down = server_rt.registry.live_bytes()
        assert up[("echo", "inbound")] == down[("echo", "inbound")] == len(payload)
        assert client_rt.registry.events.dials.total() == 1

        assert client_rt.registry.close("t1")
        with anyio.fail_after(10):
            await ended.wait()
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)
        assert not client_rt.registry.close("nope")
        tg.cancel_scope.cancel()
