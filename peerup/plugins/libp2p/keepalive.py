"""Close connections whose peer stopped answering: the only way to notice a silent peer.

A peer that vanishes without a FIN or a reset (a laptop lid closed, a NAT
mapping dropped, a cable cut) leaves every stream and relay circuit it had
open, and nothing in libp2p 0.8.1 notices: yamux's RTT ping
(stream_muxer/yamux/yamux.py:703-725) ignores a missing answer, and the relay
checks a circuit's duration only when data arrives (relay/circuit_v2/protocol.py:838).
Tunnels have no idle timeout by design (SSH sessions are idle for hours), so
"quiet" cannot mean "dead". A ping that goes unanswered does: every
``timeouts.keepalive`` seconds each connected peer is pinged, and a peer that
does not answer within ``timeouts.keepalive_timeout`` has its connections
closed, which resets its streams and frees its circuits.
"""

from __future__ import annotations

import logging
import os

import trio
from libp2p.abc import IHost
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID

log = logging.getLogger("peerup.libp2p")

PING_SIZE = 32


async def answers_ping(host: IHost, peer: ID, timeout: float) -> bool:
    with trio.move_on_after(timeout):
        try:
            stream = await host.new_stream(peer, [PING_PROTOCOL])
            try:
                payload = os.urandom(PING_SIZE)
                await stream.write(payload)
                echoed = b""
                while len(echoed) < PING_SIZE:
                    echoed += await stream.read(PING_SIZE - len(echoed))
                return echoed == payload
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await stream.close()
        except Exception as exc:  # noqa: BLE001 - any failure to ping is "no answer"
            log.debug("keepalive ping to %s failed: %s", peer, exc)
            return False
    return False


async def keep_alive(host: IHost, interval: float, timeout: float) -> None:
    """Forever: ping every connected peer each ``interval``; close those that do not answer."""
    network = host.get_network()

    async def check(peer: ID) -> None:
        if not await answers_ping(host, peer, timeout) and network.get_connections(peer):
            log.warning("peer %s did not answer a keepalive ping within %g s: closing its connection", peer, timeout)
            with trio.move_on_after(timeout):
                try:
                    await network.close_peer(peer)
                except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail in many ways
                    log.debug("closing %s after a failed keepalive: %s", peer, exc)

    while True:
        await trio.sleep(interval)
        async with trio.open_nursery() as nursery:
            for peer in list(network.get_connections_map()):
                nursery.start_soon(check, peer)
