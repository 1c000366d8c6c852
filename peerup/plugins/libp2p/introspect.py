"""What a running libp2p node tells ``peerup status`` and ``peerup peers`` (core.node.Introspectable).

Kept apart from node.py so the data path stays readable; the node's methods
delegate here. "Since when" needs a clock started when a connection opens:
libp2p keeps none, so a swarm notifee (:class:`ConnectionClock`) stamps each
connection as the swarm adds it.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from multiaddr import Multiaddr

from peerup.core.node import PeerConnection, RelaySlot, Sample
from peerup.plugins.libp2p.relay_policy import policy_of
from peerup.plugins.libp2p.stream import stream_path, stream_remote_address

if TYPE_CHECKING:
    from peerup.plugins.libp2p.node import Libp2pNode


class ConnectionClock(INotifee):
    """Unix time each connection opened, forgotten with the connection."""

    def __init__(self) -> None:
        self.opened: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self.opened.setdefault(conn, time.time())

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self.opened.pop(conn, None)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


def relay_slots(node: Libp2pNode) -> list[RelaySlot]:
    return [
        RelaySlot(relay.addr, relay.reserved, relay.expires if relay.reserved and relay.expires else None)
        for relay in node.relays
    ]


async def wait_relay_slot(node: Libp2pNode) -> None:
    while node.relays and not any(relay.reserved for relay in node.relays):
        await node.reservation_changed.wait()


class _ConnView:
    """Enough of a stream for stream_path/stream_remote_address, which take the stream's connection."""

    def __init__(self, conn: INetConn) -> None:
        self.swarm_conn = conn
        self.muxed_conn = conn.muxed_conn


async def connections(node: Libp2pNode, clock: ConnectionClock, rtt_timeout: float) -> list[PeerConnection]:
    """Every open connection, pinged on the connection itself (yamux ping) all at once, bounded."""
    conns = [
        conn for conns in node.host.get_network().get_connections_map().values() for conn in conns if not conn.is_closed
    ]
    rtts: dict[int, float | None] = {}

    async def measure(index: int, conn: INetConn) -> None:
        probe: Any = getattr(conn.muxed_conn, "probe", None)
        rtts[index] = None
        if probe is None:
            return
        started = trio.current_time()
        if await probe(rtt_timeout):
            rtts[index] = trio.current_time() - started

    async with trio.open_nursery() as nursery:
        for index, conn in enumerate(conns):
            nursery.start_soon(measure, index, conn)
    out = []
    for index, conn in enumerate(conns):
        view: Any = _ConnView(conn)
        out.append(
            PeerConnection(
                peer_id=conn.muxed_conn.peer_id.to_base58(),
                path=stream_path(view),
                address=stream_remote_address(view),
                since=clock.opened.get(conn),
                rtt=rtts.get(index),
            )
        )
    return out


def samples(node: Libp2pNode) -> list[Sample]:
    """Relay reservations and circuits (on a relay), hole-punch attempts (on a node)."""
    out: list[Sample] = []
    protocol = node.relay_protocol
    if node.role == "relay" and protocol is not None:
        reservations: Any = getattr(protocol.resource_manager, "_reservations", {})
        out.append(
            Sample("peerup_relay_reservations", "Reservations held on this relay", "gauge", {}, len(reservations))
        )
        policy = policy_of(protocol)
        if policy is not None:
            out.append(
                Sample("peerup_relay_circuits", "Circuits open through this relay", "gauge", {}, policy.active_circuits)
            )
            for reason, count in sorted(policy.refusals.items()):
                out.append(
                    Sample(
                        "peerup_relay_refusals",
                        "Reservations and circuits refused",
                        "counter",
                        {"reason": reason},
                        count,
                    )
                )
    if node.puncher is not None:
        for (how, ok), count in sorted(node.puncher.counts.items()):
            labels = {"how": how, "result": "ok" if ok else "failed"}
            out.append(Sample("peerup_holepunch_attempts", "Direct-path attempts (DCUtR)", "counter", labels, count))
    return out
