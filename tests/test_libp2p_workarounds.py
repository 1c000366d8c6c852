"""Why each workaround in peerup/plugins/libp2p/workarounds.py exists.

Each test shows the behaviour peerup relies on; several fail if the matching
workaround is removed, and should be re-read when libp2p is bumped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import multiaddr
import pytest
from anyio.abc import ByteStream
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from peerup.core.node import PeerAttribute
from peerup.core.settings import Settings
from peerup.plugins.libp2p import plugin, workarounds
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import Libp2pNode, open_libp2p_node
from peerup.testing import RELAYED_ONLY

LOCAL = "/ip4/127.0.0.1/tcp/0"
SLOW = "/peerup/test-slow-reader/1.0.0"
#: Enough to exhaust every window and buffer on the relayed path (2 MiB is not:
#: it all fits in flight, so nothing waits; 16 MiB without the workaround fails at 5 s).
SLOW_PAYLOAD = 16 * 1024 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


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
            from libp2p.network import swarm

            patched = swarm._HAPPY_EYEBALLS_DELAY
            assert patched == 0.0, "apply_global_workarounds() sets the delay to 0"
            for name, config, delay in (
                ("workaround", workarounds.connection_config(), patched),
                ("upstream", None, 0.25),  # network/swarm.py:92
            ):
                swarm._HAPPY_EYEBALLS_DELAY = delay
                try:
                    host = new_host(muxer_preference="YAMUX", connection_config=config)
                    async with host.run(listen_addrs=[multiaddr.Multiaddr(LOCAL)]):
                        start = time.monotonic()
                        await host.connect(info)
                        timings[name] = time.monotonic() - start
                        await workarounds.close_host(host)
                finally:
                    swarm._HAPPY_EYEBALLS_DELAY = patched
            assert timings["upstream"] >= 0.25  # swarm.py:934-937
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
    assert workarounds.yamux_window_wait_patched()
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


def test_g_known_noise_is_demoted(caplog: pytest.LogCaptureFixture) -> None:
    workarounds.quiet_known_noise()
    with caplog.at_level(logging.INFO):
        logging.getLogger("libp2p.relay.circuit_v2.protocol").error("Error reading from hop stream from X: closed")
        logging.getLogger("libp2p.kad_dht.kad_dht").warning("Failed to read DHT message from stream: EOF")
        logging.getLogger("libp2p.relay.circuit_v2.protocol").error("something else broke")
    assert [r.getMessage() for r in caplog.records] == ["something else broke"]
