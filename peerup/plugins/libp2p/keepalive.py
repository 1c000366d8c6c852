"""Close connections that stopped answering: the only way to notice a silent peer or a dead path.

A peer that vanishes without a FIN or a reset (a laptop lid closed, a NAT
mapping dropped, a cable cut) leaves every stream and relay circuit it had
open, and nothing in libp2p 0.8.1 notices: yamux's RTT ping
(stream_muxer/yamux/yamux.py:703-725) ignores a missing answer, and the relay
checks a circuit's duration only when data arrives (relay/circuit_v2/protocol.py:838).
Tunnels have no idle timeout by design (SSH sessions are idle for hours), so
"quiet" cannot mean "dead". A ping that goes unanswered does: every
``timeouts.keepalive`` seconds each open connection is probed with a yamux ping
on that connection, and one that does not answer within
``timeouts.keepalive_timeout`` is closed, which resets its streams and frees its
circuits.

Per connection, not per peer: a peer may have a direct connection (hole
punched) and a relayed one at once, and a NAT that changes its mapping kills
only the first. Closing the peer would cut the tunnels still running through
the relay; closing the dead connection sends new streams to the live one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.peer.id import ID

log = logging.getLogger("peerup.libp2p")

PING_SIZE = 32


async def answers_ping(host: IHost, peer: ID, timeout: float) -> bool:
    """A libp2p ping (``/ipfs/ping/1.0.0``) to ``peer`` over whichever connection the swarm picks."""
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


async def connection_answers(host: IHost, conn: INetConn, timeout: float) -> bool:
    """Does ``conn`` itself carry an answer within ``timeout``? (yamux ping; libp2p ping as a fallback)."""
    probe: Any = getattr(conn.muxed_conn, "probe", None)
    if probe is not None:
        return bool(await probe(timeout))
    return await answers_ping(host, conn.muxed_conn.peer_id, timeout)


async def close_dead(conn: INetConn, why: str, timeout: float) -> None:
    """Close ``conn``, shielded: a close cancelled half way leaves the swarm holding a closed connection.

    SwarmConn.close (network/connection/swarm_connection.py:140-170) marks the
    connection closed first and removes it from the swarm last; cancelled in
    between, the swarm keeps offering it and every new stream to that peer
    fails with "No valid connections". Our yamux session bounds its own close.
    """
    log.warning("connection to %s %s: closing it", conn.muxed_conn.peer_id, why)
    with trio.CancelScope(shield=True), trio.move_on_after(max(timeout, 10.0)), contextlib.suppress(Exception):
        await conn.close()


async def close_if_silent(host: IHost, conn: INetConn, timeout: float, why: str) -> bool:
    """Probe ``conn``; close it (see :func:`close_dead`) if it does not answer within ``timeout``.

    The one liveness rule shared by keepalive, the relay keeper and stream
    opening (node.py). Returns True when this call closed the connection.
    """
    if conn.is_closed or await connection_answers(host, conn, timeout) or conn.is_closed:
        return False
    await close_dead(conn, why, timeout)
    return True


async def keep_alive(host: IHost, interval: float, timeout: float) -> None:
    """Forever: probe every open connection each ``interval``; close those that do not answer."""
    network = host.get_network()

    async def check(conn: INetConn) -> None:
        await close_if_silent(host, conn, timeout, f"did not answer a keepalive ping within {timeout:g} s")

    while True:
        await trio.sleep(interval)
        async with trio.open_nursery() as nursery:
            for conns in list(network.get_connections_map().values()):
                for conn in list(conns):
                    if not conn.is_closed:
                        nursery.start_soon(check, conn)
