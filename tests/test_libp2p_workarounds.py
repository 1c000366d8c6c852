"""Why the patches in peerup/plugins/libp2p/patches.py exist.

Each test shows the behaviour peerup relies on and is named by its registry
entry; tests/test_libp2p_patches.py checks that it fails with the patch off.
"""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import anyio
import multiaddr
import pytest
import trio
from anyio.abc import ByteStream
from libp2p import new_host
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from peerup.core.node import PeerAttribute
from peerup.core.settings import Settings
from peerup.hostile import Target, connect_once
from peerup.plugins.libp2p import patches, plugin, workarounds
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import Libp2pNode, open_libp2p_node
from peerup.testing import RELAYED_ONLY, free_port, make_settings

LOCAL = "/ip4/127.0.0.1/tcp/0"
SLOW = "/peerup/test-slow-reader/1.0.0"
#: Enough to exhaust every window and buffer on the relayed path (2 MiB is not:
#: it all fits in flight, so nothing waits; 16 MiB without the workaround fails at 5 s).
SLOW_PAYLOAD = 16 * 1024 * 1024


def _settings(home: Path, **fields: object) -> Settings:
    if not (home / "identity.key").exists():
        create_identity(home)
    fields.setdefault("relay", {"listen": [LOCAL]})
    return Settings(home=home, listen=[LOCAL], **fields)  # type: ignore[arg-type]


@asynccontextmanager
async def _relay(tmp_path: Path, **relay: object) -> AsyncIterator[Libp2pNode]:
    settings = _settings(tmp_path / "relay", relay={"listen": [LOCAL], **relay})
    async with open_libp2p_node(settings, "relay") as node:
        yield node


def _node_settings(home: Path, relay: Libp2pNode) -> Settings:
    return _settings(home, relays=[relay.listen_addrs()[0]], retry={"initial": 0.1, "max_delay": 0.5}, nat=RELAYED_ONLY)


@pytest.mark.anyio
async def test_a_dht_speaks_the_private_protocol(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with _relay(tmp_path) as relay, open_libp2p_node(_node_settings(tmp_path / "n", relay), "node") as node:
            assert workarounds.kad_protocol_in_use() == workarounds.PEERUP_KAD_PROTOCOL
            relay_id = relay.host.get_id()
            # The relay's DHT answers the private protocol on the wire ...
            stream = await node.host.new_stream(relay_id, [TProtocol(workarounds.PEERUP_KAD_PROTOCOL)])
            assert stream.get_protocol() == workarounds.PEERUP_KAD_PROTOCOL
            await stream.reset()
            # ... and not the public IPFS one, so it never joins the public DHT.
            with pytest.raises(Exception):  # noqa: B017 - libp2p raises several kinds here
                await node.host.new_stream(relay_id, [TProtocol(workarounds.UPSTREAM_KAD_PROTOCOL)])


@pytest.mark.anyio
async def test_b_connect_skips_the_250ms_happy_eyeballs_wait(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with _relay(tmp_path) as relay:
            info = info_from_p2p_addr(multiaddr.Multiaddr(relay.listen_addrs()[0]))
            timings = {}

            async def connect(name: str) -> None:
                host = new_host(muxer_preference="YAMUX", connection_config=workarounds.connection_config())
                async with host.run(listen_addrs=[multiaddr.Multiaddr(LOCAL)]):
                    start = time.monotonic()
                    await host.connect(info)
                    timings[name] = time.monotonic() - start
                    await workarounds.close_host(host)

            await connect("workaround")
            with patches.reverted("happy-eyeballs"):
                await connect("upstream")
            assert timings["upstream"] >= 0.25  # swarm.py:92, 936
            assert timings["workaround"] < 0.2, timings


@pytest.mark.anyio
async def test_c_relay_frees_a_reservation_when_its_peer_leaves(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with _relay(tmp_path, max_reservations=1) as relay:
            async with open_libp2p_node(_node_settings(tmp_path / "a", relay), "node") as first:
                assert first.relays[0].reserved
            # Upstream would keep the single slot for the TTL (an hour by default).
            async with open_libp2p_node(_node_settings(tmp_path / "b", relay), "node") as second:
                assert second.relays[0].reserved


@pytest.mark.anyio
async def test_d_circuit_address_is_what_the_relay_learns(tmp_path: Path) -> None:
    with anyio.fail_after(10):
        async with _relay(tmp_path) as relay, open_libp2p_node(_node_settings(tmp_path / "n", relay), "node") as node:
            circuit = f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{node.peer_id}"
            assert [str(a) for a in node.host.get_addrs()] == [circuit]
            # Identify carried it to the relay, intact (no relay-port + own ID mix-up).
            with anyio.fail_after(3):
                while True:
                    known = [str(a) for a in relay.host.get_peerstore().addrs(node.host.get_id())]
                    if any("/p2p-circuit" in a for a in known):
                        break
                    await anyio.sleep(0.05)
            assert all(a.startswith(relay.listen_addrs()[0]) for a in known if "/p2p-circuit" in a)


@pytest.mark.slow
@pytest.mark.anyio
async def test_e_relayed_stream_survives_a_reader_paused_7s(tmp_path: Path) -> None:
    """Fast-path patch "yamux-write": no 5 s cap on a writer's wait for a window update."""
    payload = b"x" * SLOW_PAYLOAD
    received = bytearray()

    async def slow_reader(stream: ByteStream, remote: str) -> None:
        await anyio.sleep(7)  # upstream resets the circuit after 5 s (yamux.py:288)
        async for chunk in stream:
            received.extend(chunk)
        await stream.send(b"ok")

    with anyio.fail_after(25):
        async with _relay(tmp_path) as relay:
            client_settings = _node_settings(tmp_path / "client", relay)
            async with (
                open_libp2p_node(_node_settings(tmp_path / "server", relay), "node") as server,
                open_libp2p_node(client_settings, "node") as client,
            ):
                server.set_stream_handler(SLOW, slow_reader)
                record = await plugin.discover_peer(client, server.peer_id, client_settings)
                assert record is not None
                stream = await plugin.dial(client, record, SLOW, client_settings)
                assert stream is not None and stream.extra(PeerAttribute.path) == "relayed"
                await stream.send(payload)
                await stream.send_eof()
                assert await stream.receive() == b"ok"
                await stream.aclose()
    assert bytes(received) == payload


@pytest.mark.anyio
async def test_f_stopped_host_refuses_connections(tmp_path: Path) -> None:
    with anyio.fail_after(5):
        async with _relay(tmp_path) as relay:
            port = int(relay.listen_addrs()[0].split("/tcp/")[1].split("/")[0])
        with pytest.raises(OSError):
            await anyio.connect_tcp("127.0.0.1", port)


@pytest.mark.anyio
async def test_q_one_dial_is_one_attempt(tmp_path: Path) -> None:
    """The swarm does not retry a dial on its own: peerup's retry policy spaces the attempts."""
    accepted = 0

    async def hang_up(conn: trio.SocketStream) -> None:
        nonlocal accepted
        accepted += 1
        await conn.aclose()

    with anyio.fail_after(10):
        async with _relay(tmp_path) as relay, trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            stranger = ID.from_pubkey(create_new_key_pair().public_key)
            with pytest.raises(SwarmException):
                await relay.host.connect(PeerInfo(stranger, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
            nursery.cancel_scope.cancel()
    assert accepted == 1  # upstream: 4 (network/swarm.py:980, RetryConfig.max_retries 3)


@pytest.mark.anyio
async def test_v_closed_inbound_connections_free_their_slot(tmp_path: Path) -> None:
    """Upstream keeps an inbound slot per connection for the swarm's life (network/swarm.py:1982, 2056).

    The swarm has max_connections - min_connections slots (limits.max_connections here): with 8,
    the ninth connection in a row, each closed before the next, would be refused.
    """
    settings = _settings(tmp_path / "relay", limits={"max_connections": 8})
    with anyio.fail_after(30):
        async with open_libp2p_node(settings, "relay") as relay:
            target = Target.parse(relay.listen_addrs()[0])
            outcomes = [await connect_once(target, timeout=5) for _ in range(12)]
    assert [str(o) for o in outcomes if o is not None] == []


@pytest.mark.anyio
async def test_o_a_peer_back_within_a_minute_is_dialed(tmp_path: Path) -> None:
    """Upstream answers every dial to a peer whose addresses all failed in the last 60 s from a
    negative cache (network/swarm.py:110, 752), whatever peerup's retry policy asked for."""
    port = free_port()
    b_settings = make_settings(tmp_path / "b", listen=[f"/ip4/127.0.0.1/tcp/{port}"])
    with anyio.fail_after(20):
        async with open_libp2p_node(make_settings(tmp_path / "a"), "node") as a:
            async with open_libp2p_node(b_settings, "node") as b:
                b_id = b.host.get_id()
            addr = f"/ip4/127.0.0.1/tcp/{port}"
            assert await a._connect_direct(b_id, addr) is not None  # b is down
            async with open_libp2p_node(b_settings, "node"):  # b is back, same address and identity
                assert await a._connect_direct(b_id, addr) is None


@pytest.mark.anyio
async def test_r_a_wildcard_listener_is_not_advertised(tmp_path: Path) -> None:
    """Identify sends ``host.get_addrs()``; upstream's lists a 0.0.0.0 listener as bound
    (host/basic_host.py:492), so peers were told to dial 0.0.0.0."""
    settings = make_settings(tmp_path / "relay", relay={"listen": ["/ip4/0.0.0.0/tcp/0"]})
    with anyio.fail_after(10):
        async with open_libp2p_node(settings, "relay") as relay:
            advertised = [str(a) for a in relay.host.get_addrs()]
    assert [a for a in advertised if a.startswith("/ip4/0.0.0.0/")] == []


@pytest.mark.anyio
async def test_x_a_cancelled_punch_dial_closes_its_socket(tmp_path: Path) -> None:
    """A hole-punch dial (bound to the listen port) cancelled before it connected leaves no socket open."""
    patches.apply_all()
    from libp2p.transport.tcp import tcp

    dial = tcp._open_tcp_stream_from  # what TCP.dial calls with a source (tcp.py:480)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with trio.CancelScope() as scope:
            scope.cancel()  # as a punch round does to its other dials once one got through
            await dial("127.0.0.1", free_port(), ("0.0.0.0", 0))
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_g_known_noise_is_demoted(caplog: pytest.LogCaptureFixture) -> None:
    patches.apply_all()  # what opening a node does first
    with caplog.at_level(logging.INFO):
        logging.getLogger("libp2p.relay.circuit_v2.protocol").error("Error reading from hop stream from X: closed")
        logging.getLogger("libp2p.kad_dht.kad_dht").warning("Failed to read DHT message from stream: EOF")
        logging.getLogger("libp2p.relay.circuit_v2.protocol").error("something else broke")
    assert [r.getMessage() for r in caplog.records] == ["something else broke"]
