"""A relay restricted to chosen peers, and its global circuit cap."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from peerup.core.errors import PeerupError
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import Libp2pNode
from peerup.testing import client_node, echo_handler, exchange, read_all, relay, serving_node, tcp_service

pytestmark = pytest.mark.anyio


async def test_relay_allowlist_refuses_reservations_and_circuits_of_others(tmp_path: Path) -> None:
    server_id = create_identity(tmp_path / "server")
    client_id = create_identity(tmp_path / "client")
    create_identity(tmp_path / "intruder")
    allowed = [server_id, client_id]
    async with tcp_service(echo_handler) as addr, relay(tmp_path, allow=allowed) as relay_addr:  # noqa: SIM117
        async with (
            serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
            serving_node(tmp_path, relay_addr, {"svc": addr}, name="intruder") as (_, intruder),
        ):
            assert isinstance(server, Libp2pNode) and isinstance(intruder, Libp2pNode)
            assert server.relays[0].reserved
            assert not intruder.relays[0].reserved  # refused: not in relay.allow
            async with client_node(tmp_path, relay_addr) as (rt, client):
                with anyio.fail_after(20):
                    stream = await rt.open_service_stream(client, server.peer_id, "svc")
                    assert await exchange(stream, b"allowed") == b"allowed"
            async with client_node(tmp_path, relay_addr, "stranger") as (rt, stranger):
                with anyio.fail_after(20), pytest.raises(PeerupError):
                    await rt.open_service_stream(stranger, server.peer_id, "svc")


async def test_relay_circuit_cap_refuses_beyond_the_limit(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path, max_circuits=1) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr, "one") as (rt1, one),
        client_node(tmp_path, relay_addr, "two") as (rt2, two),
    ):
        with anyio.fail_after(30):
            first = await rt1.open_service_stream(one, server.peer_id, "svc")  # holds the only circuit
            with pytest.raises(PeerupError):
                await rt2.open_service_stream(two, server.peer_id, "svc")
            assert await exchange(first, b"first") == b"first"


async def test_an_idle_circuit_ends_at_its_duration(tmp_path: Path) -> None:
    """relay.circuit_duration holds for a quiet circuit too (upstream checked it per byte)."""
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path, circuit_duration=1) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server),
        client_node(tmp_path, relay_addr) as (rt, client),
    ):
        with anyio.fail_after(20):
            stream = await rt.open_service_stream(client, server.peer_id, "svc")
            await stream.send(b"hi")
            assert await stream.receive() == b"hi"
            started = anyio.current_time()
            assert await read_all(stream) == b""  # nothing more is sent: the relay ends the circuit
            ended = anyio.current_time() - started
            await stream.aclose()
    assert ended < 3
