"""Faults on a running tunnel: relay restart, serving node restart, local service
down and up, and a peer that vanishes without closing.

In one process, with real libp2p hosts, a real relay, the built-in plugins and
real TCP sockets (tests/harness.py). Every wait is bounded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import multiaddr
import pytest
from anyio.abc import SocketStream
from harness import (
    Cable,
    client_node,
    echo_handler,
    echo_roundtrip,
    free_port,
    make_settings,
    proxy_listener,
    read_all,
    relay,
    relay_node,
    run_relay,
    serving_node,
    tcp_service,
)
from libp2p.peer.peerinfo import info_from_p2p_addr

from peerup.core.errors import ServiceError
from peerup.core.node import PeerAttribute
from peerup.core.plugins import load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import ServiceSettings

pytestmark = pytest.mark.anyio

#: Enough patience to ride out a restart of a second or two: 0.25 + 0.5 + 1 + 1 ... = 6.75 s.
PATIENT_RETRY = {"retries": 8, "initial": 0.25, "multiplier": 2.0, "max_delay": 1.0}


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "peerup.retry"]


async def test_relay_restart_relayed_tunnel_recovers_and_direct_tunnel_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
    async with tcp_service(echo_handler) as addr, anyio.create_task_group() as relays:
        first = anyio.Event()
        relay_addr = await relays.start(run_relay, tmp_path, listen, first)
        direct_settings = make_settings(
            tmp_path / "direct", services={"svc": ServiceSettings(name="svc", address=addr)}, auth={"allow_all": True}
        )  # no relay: reachable only directly
        direct_rt = Runtime(direct_settings, load_plugins())
        async with (
            serving_node(tmp_path, relay_addr, {"svc": addr}, retry=PATIENT_RETRY) as (_, server),
            direct_rt.node() as direct,
            client_node(tmp_path, relay_addr, retry=PATIENT_RETRY) as (runtime, client),
        ):
            direct_rt.expose(direct, direct_settings.services)
            # The client knows the direct peer's address (same LAN, say) and is connected to it.
            await client.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(direct.direct_addrs()[0])))
            async with (
                proxy_listener(runtime, client, server.peer_id) as relayed_port,
                proxy_listener(runtime, client, direct.peer_id) as direct_port,
            ):
                with anyio.fail_after(20):
                    for peer, path in ((server.peer_id, "relayed"), (direct.peer_id, "direct")):
                        stream = await runtime.open_service_stream(client, peer, "svc")
                        assert stream.extra(PeerAttribute.path) == path
                        await stream.aclose()
                    relayed_open = await anyio.connect_tcp("127.0.0.1", relayed_port)
                    direct_open = await anyio.connect_tcp("127.0.0.1", direct_port)
                    for stream in (relayed_open, direct_open):
                        await stream.send(b"before")
                        assert await stream.receive() == b"before"

                first.set()  # the relay dies, with a relayed tunnel open
                with anyio.fail_after(15):
                    # The relayed tunnel ends (it cannot survive its path); it does not hang.
                    with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                        await relayed_open.send(b"during")
                        await relayed_open.receive()
                    await relayed_open.aclose()
                    # The direct tunnel is untouched, and new direct connections work.
                    for n in range(20):
                        await direct_open.send(b"during %d" % n)
                        assert await direct_open.receive() == b"during %d" % n
                    assert await echo_roundtrip(direct_port, b"new direct") == b"new direct"
                    assert not retry_warnings(caplog)

                # A new relayed connection while the relay is down: retried, then through.
                async with anyio.create_task_group() as tg:
                    result: list[bytes] = []

                    async def connect() -> None:
                        result.append(await echo_roundtrip(relayed_port, b"after restart"))

                    started = anyio.current_time()
                    tg.start_soon(connect)
                    await anyio.sleep(1.0)
                    second = anyio.Event()
                    await relays.start(run_relay, tmp_path, listen, second)  # same port, same ID
                    with anyio.fail_after(20):
                        while not result:
                            await anyio.sleep(0.05)
                recovered = anyio.current_time() - started
                assert result == [b"after restart"]
                assert retry_warnings(caplog), "recovery should go through the retry policy"
                assert recovered < 15
                with anyio.fail_after(10):
                    await direct_open.send(b"after")
                    assert await direct_open.receive() == b"after"
                    await direct_open.aclose()
                    assert await echo_roundtrip(relayed_port, b"again") == b"again"
            second.set()


async def test_serving_node_restart_is_found_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        client_node(tmp_path, relay_addr, retry=PATIENT_RETRY) as (runtime, client),
    ):
        async with serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server):
            server_id = server.peer_id
            async with proxy_listener(runtime, client, server_id) as port:
                with anyio.fail_after(20):
                    assert await echo_roundtrip(port, b"first life") == b"first life"
                    tunnel = await anyio.connect_tcp("127.0.0.1", port)
                    await tunnel.send(b"x")
                    assert await tunnel.receive() == b"x"
        # The server stopped (same identity comes back below); the open tunnel ended.
        async with proxy_listener(runtime, client, server_id) as port:
            with anyio.fail_after(10):
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await tunnel.send(b"y")
                    await tunnel.receive()
                await tunnel.aclose()
            async with serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, again):
                assert again.peer_id == server_id
                with anyio.fail_after(20):
                    # The proxy's next connection finds the new instance...
                    assert await echo_roundtrip(port, b"second life") == b"second life"
                    # ... and the one after that needs no retry at all.
                    before = len(retry_warnings(caplog))
                    assert await echo_roundtrip(port, b"and again") == b"and again"
                    assert len(retry_warnings(caplog)) == before


async def test_serving_node_down_during_connect_is_reached_when_it_is_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        client_node(tmp_path, relay_addr, retry=PATIENT_RETRY) as (runtime, client),
    ):
        async with serving_node(tmp_path, relay_addr, {"svc": addr}) as (_, server):
            server_id = server.peer_id
            async with proxy_listener(runtime, client, server_id) as port:
                with anyio.fail_after(20):
                    assert await echo_roundtrip(port, b"first") == b"first"
        async with proxy_listener(runtime, client, server_id) as port, anyio.create_task_group() as tg:
            result: list[bytes] = []

            async def connect() -> None:
                result.append(await echo_roundtrip(port, b"pending"))

            tg.start_soon(connect)
            await anyio.sleep(1.0)  # attempts fail: the server is down
            async with serving_node(tmp_path, relay_addr, {"svc": addr}):
                with anyio.fail_after(20):
                    while not result:
                        await anyio.sleep(0.05)
        assert result == [b"pending"]
        assert retry_warnings(caplog)


async def test_local_service_down_then_up_then_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    service_port = free_port()
    target = f"127.0.0.1:{service_port}"
    async with (
        relay(tmp_path) as relay_addr,
        serving_node(tmp_path, relay_addr, {"svc": target}) as (_, server),
        client_node(tmp_path, relay_addr) as (runtime, client),
        proxy_listener(runtime, client, server.peer_id) as port,
    ):

        async def refused_quickly() -> None:
            started = anyio.current_time()
            with anyio.fail_after(10):
                # Through the proxy: the local app sees its connection closed, not a hang.
                assert await echo_roundtrip(port, b"anyone there?") == b""
                # The error, as the core reports it: one line, not retried.
                with pytest.raises(ServiceError) as info:
                    await runtime.open_service_stream(client, server.peer_id, "svc")
            assert info.value.code == "refused"
            assert f"local service {target} refused the connection" in str(info.value)
            assert anyio.current_time() - started < 5
            assert any(
                r.name == "peerup.runtime" and "refused the connection" in r.getMessage() for r in caplog.records
            )

        await refused_quickly()
        assert not [r for r in caplog.records if r.name == "peerup.retry"], "a refused service is not retried"

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=service_port)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, echo_handler)
            with anyio.fail_after(10):
                assert await echo_roundtrip(port, b"up now") == b"up now"
            tg.cancel_scope.cancel()
        await listener.aclose()

        caplog.clear()
        await refused_quickly()


async def test_local_service_that_never_answers_times_out_cleanly(tmp_path: Path) -> None:
    """A local service that accepts nothing (full backlog, firewall): the bounded local dial says so."""
    async with (
        relay(tmp_path) as relay_addr,
        # 192.0.2.0/24 is TEST-NET-1: nothing answers, the SYN is never acknowledged.
        serving_node(tmp_path, relay_addr, {"svc": "192.0.2.1:9"}, timeouts={"local_dial": 1.0}) as (_, server),
        client_node(tmp_path, relay_addr) as (runtime, client),
    ):
        started = anyio.current_time()
        with anyio.fail_after(10), pytest.raises(ServiceError) as info:
            await runtime.open_service_stream(client, server.peer_id, "svc")
    assert info.value.code in ("timeout", "refused")  # "refused" where the route is rejected at once
    assert anyio.current_time() - started < 5


@pytest.mark.parametrize("how", ["cut", "yank"])
async def test_vanished_client_frees_the_stream_and_the_circuit(tmp_path: Path, how: str) -> None:
    """The proxy side disappears without a goodbye: a black hole (``cut``) or a crash (``yank``).

    Bounds: the serving side closes the tunnel after ``timeouts.idle`` without
    traffic; the relay frees the circuit when the serving side closes the
    connection it carried.
    """
    idle = 2.0
    service_closed = anyio.Event()

    async def service(stream: SocketStream) -> None:
        async with stream:
            await stream.send(b"hello")
            await read_all(stream)  # until the tunnel is torn down
        service_closed.set()

    async with (
        tcp_service(service) as addr,
        relay_node(tmp_path) as (relay_addr, relay_host),
        serving_node(tmp_path, relay_addr, {"svc": addr}, timeouts={"idle": idle}) as (server_rt, server),
        anyio.create_task_group() as tg,
    ):
        relay_port = int(relay_addr.split("/tcp/")[1].split("/")[0])
        relay_id = relay_addr.rsplit("/p2p/", 1)[1]
        cable = Cable("127.0.0.1", relay_port)
        cable_port = await tg.start(cable.run)
        via_cable = f"/ip4/127.0.0.1/tcp/{cable_port}/p2p/{relay_id}"
        async with client_node(tmp_path, via_cable) as (runtime, client):
            hop = _hop_protocol(relay_host)
            with anyio.fail_after(20):
                stream = await runtime.open_service_stream(client, server.peer_id, "svc")
                assert stream.extra(PeerAttribute.path) == "relayed"
                assert await stream.receive() == b"hello"
                assert cable.connections >= 1, "the client reaches the relay through the cable"
                assert server_rt.open_tunnels == 1
                assert hop._active_relays
            # The client vanishes.
            if how == "cut":
                cable.cut()
            else:
                await cable.yank()
            gone = anyio.current_time()
            with anyio.fail_after(idle + 5):
                await service_closed.wait()
                while server_rt.open_tunnels:
                    await anyio.sleep(0.05)
            freed_stream = anyio.current_time() - gone
            if how == "cut":
                # No FIN, no RST: only the idle timeout can tell, and it does, on time.
                assert idle - 0.1 <= freed_stream <= idle + 3
            else:
                # The reset reaches the serving side through the relay at once.
                assert freed_stream < 3
            with anyio.move_on_after(CIRCUIT_BOUND):
                while hop._active_relays:
                    await anyio.sleep(0.05)
            freed_circuit = anyio.current_time() - gone
            print(f"{how}: stream freed after {freed_stream:.2f} s, circuit after {freed_circuit:.2f} s")
            await stream.aclose()
            tg.cancel_scope.cancel()
    if hop._active_relays:
        pytest.xfail(
            "known gap (docs/reliability.md): nothing detects a silent peer, so the relay keeps the "
            f"circuit (still open {CIRCUIT_BOUND:g} s after the client vanished); the relay's "
            "circuit_duration is only checked when data arrives"
        )


#: How long the relay may take to free the circuit of a vanished peer.
CIRCUIT_BOUND = 8.0


def _hop_protocol(relay_host: object) -> object:
    """The relay's CircuitV2Protocol (its ``_active_relays`` are the open circuits)."""
    return relay_host.circuit.protocol  # type: ignore[attr-defined]
