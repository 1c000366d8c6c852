"""Every workaround peerup needs for py-libp2p 0.8.1, in one place.

Each entry names the upstream behaviour and where it lives in the installed
package (``site-packages/libp2p/...``), so that when the pinned version changes
someone can re-check them one by one. Each has its test named
in :mod:`.patches` and ``docs/libp2p-workarounds.md``.

What is applied, when, and how each is switched off is :mod:`.patches`, the
registry; this module only holds the pieces (per-host helpers called by
:mod:`.node`, the log filters and the DHT protocol id the registry installs).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.relay.circuit_v2.resources import RelayResourceManager

log = logging.getLogger("peerup.libp2p.workarounds")

#: The private DHT protocol: peerup nodes never talk to the public IPFS DHT.
PEERUP_KAD_PROTOCOL = "/peerup/kad/1.0.0"
UPSTREAM_KAD_PROTOCOL = "/ipfs/kad/1.0.0"

# (a) kad_dht/common.py:14 hard-codes PROTOCOL_ID = "/ipfs/kad/1.0.0" and these
# modules import it *by name*; KadDHT(protocol_prefix=...) is ignored on the wire.
# routing_table.py:533 re-imports it from .common at call time, so common itself
# is patched too.
KAD_MODULES = (
    "libp2p.kad_dht.common",
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.peer_routing",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.value_store",
)


def kad_protocol_in_use() -> str:
    """The KAD protocol id the kad_dht package will put on the wire now."""
    from libp2p.kad_dht import kad_dht

    return str(getattr(kad_dht, "PROTOCOL_ID"))  # noqa: B009 - not re-exported for mypy


# (b) network/swarm.py:934-937: host.connect() waits a fixed 250 ms
# (_HAPPY_EYEBALLS_DELAY, swarm.py:92) after dialing the last address unless
# max_connections_per_peer is reached; it used to be set to 1, which also made
# the swarm trim a second connection to a peer (swarm.py:2844 _trim_connections)
# and so ruled out a direct connection beside a relayed one (hole punching).
# Now the limit is 4 and the delay 0: addresses are dialed in parallel and a
# connect returns as soon as its dials end (5-8 ms on loopback).
# (m) network/config.py: max_connections 300 and a pruner that closes
# connections above high_watermark 200 (network/connection_pruner.py:239): a
# relay with 201 reserved peers would start cutting them. The cap is peerup's
# own (limits.max_connections, counted over open connections) and the pruner
# never fires below it; the upgrade timeout is the admission gate's deadline.
def connection_config(max_connections: int = 2048, handshake_timeout: float = 10.0) -> ConnectionConfig:
    """(b, m) Dial returns as soon as one connection is up; one cap, no pruning below it."""
    return ConnectionConfig(
        max_connections_per_peer=4,
        max_connections=max_connections,
        min_connections=0,
        low_watermark=0,
        high_watermark=max_connections,
        inbound_upgrade_timeout=handshake_timeout,
    )


# (q) network/swarm.py:980-1040 _dial_with_retry: every dial of an address is
# retried up to 3 more times with its own backoff (RetryConfig, network/config.py:37),
# inside whatever deadline and retry policy the caller has. A dial to a dead
# address then took 3 attempts, and a peerup retry policy of 1, 2, 4 s became
# 4 x 3 attempts at unpredictable times. The retry policy is peerup's: one
# attempt per dial here.
def single_dial_attempt(host: IHost) -> None:
    """(q) The swarm makes one attempt per dial; peerup's retry policy spaces the rest."""
    host.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]


# (n) rcmgr/manager.py:833 new_resource_manager(): new_host() attaches a
# resource manager with limits of its own (1000 connections, 10000 streams,
# a memory cap read from the machine's total, per-peer connection limits) and a
# swarm-wide stream semaphore sized from them (network/swarm.py:369) that
# queues inbound streams without a deadline once full. Its counters are
# released on paths the swarm does not always take, and its refusals are
# silent. peerup bounds the same things itself, once, where they are tested
# (admission.py, muxer.py, relay_policy.py, auth.max_streams_per_peer), so the
# host runs without it.
def drop_resource_manager(host: IHost) -> None:
    """(n) Detach libp2p's resource manager and its stream semaphore from ``host``."""
    host.get_network().set_resource_manager(None)  # type: ignore[attr-defined]


# (o) network/swarm.py:110-140 and 752: after a dial to a peer failed on all
# addresses, every dial to it for the next 60 s is answered "recently failed
# all addresses (negative cache)" without touching the network. A relay that
# restarted, or a serving node that came back, was then unreachable for a
# minute whatever the retry policy said (1, 2, 4 s retries all hit the cache).
# peerup's dials are each scheduled by a retry policy, so each one dials.
def dial_for_real(host: IHost, peer: Any) -> None:
    """(o) Forget a previous failure to reach ``peer`` before a dial the retry policy asked for."""
    host.get_network().unblock_peer(peer)  # type: ignore[attr-defined]


# (h) network/auto_connector.py:270-330 and swarm.py:395, 2753: the swarm keeps
# dialing peers from its peerstore until it holds ~150 connections (the midpoint
# of its watermarks), on a timer and after every disconnect, logging at INFO each
# cycle. A peerup node wants exactly the connections it asked for (its relays and
# the peers it proxies to); dialing every peer the DHT mentioned would also reach
# out to NATed addresses for nothing. Zero watermarks do not help: the pruner
# reads the same numbers. So this node's auto-connector is made a no-op.
# The auto-connector also remembers every peer that ever disconnected
# (network/auto_connector.py:611-625, ``_recent_disconnects``) and prunes that
# table only inside maybe_connect (auto_connector.py:456), which is off here:
# about 460 bytes per distinct peer, never freed (measured: 99 -> 117 MiB over
# 20,000 fresh identities; benchmarks/churn.py). Its bookkeeping is for
# auto-dialing only, so it is not kept at all.
def disable_auto_dial(host: IHost) -> None:
    """(h) Stop the swarm from dialing peerstore peers on its own, and from remembering every peer for it."""

    async def no_auto_dial() -> None:
        return None

    def forget(peer_id: Any) -> None:
        return None

    connector = host.get_network().auto_connector  # type: ignore[attr-defined]
    connector.maybe_connect = no_auto_dial
    connector.record_disconnect = forget
    connector.record_failed_connection = forget


class _ReleaseReservationOnDisconnect(INotifee):
    """(c) Frees a peer's relay reservation once its last connection closes.

    Upstream: relay/circuit_v2/resources.py:260 keeps a reservation until its TTL
    (default 3600 s) even after the peer left; with ``max_reservations`` slots a
    relay then refuses new peers for an hour after churn.
    """

    def __init__(self, resources: RelayResourceManager) -> None:
        self._resources = resources

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer = conn.muxed_conn.peer_id
        remaining = [c for c in network.get_connections(peer) if c is not conn]
        if remaining:
            return
        if self._resources._reservations.pop(peer, None) is not None:
            log.debug("relay: reservation of %s released on disconnect", peer)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None


def release_reservations_on_disconnect(host: IHost, resources: RelayResourceManager) -> INotifee:
    """(c) Register the notifee above on ``host``'s network; returns it for removal."""
    notifee = _ReleaseReservationOnDisconnect(resources)
    host.get_network().register_notifee(notifee)
    return notifee


def hide_unspecified_addrs(host: IHost) -> None:
    """(r) Never tell peers a wildcard address (``/ip4/0.0.0.0``, ``/ip6/::``).

    Upstream: host/basic_host.py:505-540 advertises the listen addresses as
    bound, so a relay listening on 0.0.0.0:7777 told every peer, through
    identify, to dial 0.0.0.0:7777; their swarm kept one address per transport
    (network/swarm.py:880-892) and reconnects to the relay dialed nowhere.
    Install before :func:`advertise_addrs`, which it then also covers.
    """
    original = host.get_addrs

    def get_addrs() -> list[multiaddr.Multiaddr]:
        return [a for a in original() if not str(a).startswith(("/ip4/0.0.0.0/", "/ip6/::/"))]

    host.get_addrs = get_addrs  # type: ignore[method-assign]


def advertise_addrs(host: IHost, addrs: Callable[[], Sequence[str]]) -> None:
    """(d) Make ``host.get_addrs()`` return exactly ``addrs()`` (full addrs with /p2p/<self>).

    Upstream: host/basic_host.py:534-538 strips the last ``/p2p/`` of every
    announced address and appends our own, so a circuit address given through
    ``new_host(addrs_factory=...)`` or ``announce_addrs`` turns into
    relay-address + our ID. Identify and signed peer records are built from
    ``get_addrs()``, so overriding it on the instance is what reaches peers.
    An empty ``addrs()`` falls back to the upstream behaviour.
    """
    original = host.get_addrs

    def get_addrs() -> list[multiaddr.Multiaddr]:
        ours = [multiaddr.Multiaddr(text) for text in addrs()]
        return ours or original()

    host.get_addrs = get_addrs  # type: ignore[method-assign]


# (f) Shutdown: leaving host.run() does not close the TCP listener (the cleanup
# in network/swarm.py:420-466 runs in a cancelled scope; the listener is a system
# task, transport/tcp/tcp.py:303), so the port keeps accepting. Calling
# host.close() inside the run() block closes it. Used by node.open_libp2p_node.
# But host.close() -> Swarm.close() (network/swarm.py:2301-2325) closes the
# connections one at a time, each about 0.2 s (fixed sleeps at
# stream_muxer/yamux/yamux.py:823 and network/connection/swarm_connection.py:218),
# and the listeners only after them; and by then the swarm's service has
# stopped (the caller's cancel scope covers host.run()). Every peer that
# reconnects in that window is accepted, upgraded, and fails in add_conn
# (swarm.py:2617, manager.run_task) with a LifecycleError whose traceback is
# logged as a WARNING (swarm.py:2705-2714). Measured on a relay with 10 peers
# (5 serving nodes, 5 proxies) stopped by SIGTERM: 2.1 s and 23 tracebacks.
# So the listeners close first and the connections all at once.
async def close_host(host: IHost) -> None:
    """(f) Close ``host`` so its listening ports are released; call inside ``host.run()``.

    Listeners first, so no peer gets in while the rest shuts down; then every
    connection at once; then ``host.close()`` for the rest (services, transports).
    """
    network = host.get_network()

    async def quietly(close: Callable[[], Any]) -> None:
        try:
            await close()
        except Exception as exc:  # noqa: BLE001 - shutting down: a failure to close is not the user's problem
            log.debug("while closing %s: %s", close, exc)

    with trio.CancelScope(shield=True), trio.move_on_after(5):
        for listener in list(getattr(network, "listeners", {}).values()):
            await quietly(listener.close)
        async with trio.open_nursery() as nursery:
            for conn in network.get_connections():
                nursery.start_soon(quietly, conn.close)
        await host.close()


# (x) transport/tcp/tcp.py:122-168 _open_tcp_stream_from (a dial bound to the
# listen port, for hole punching) closes its socket when bind() or connect()
# raises OSError, not when the dial is cancelled there: every punch round
# cancels its other dials once one got through (holepunch.py), and each left
# an unclosed socket to the garbage collector (a ResourceWarning per socket).
# Same steps, same fallback, and the socket closed on any exit.
async def open_tcp_stream_from(host: str, port: int, source: tuple[str, int]) -> trio.SocketStream:
    """(x) Upstream's source-bound TCP dial, closing its socket also when cancelled."""
    from libp2p.transport.exceptions import OpenConnectionError
    from libp2p.transport.tcp import tcp

    src_ip, src_port = source
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    if (":" in src_ip) != (":" in host):
        raise OpenConnectionError(f"Source/destination IP family mismatch: {src_ip} vs {host}")
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise OpenConnectionError(f"Failed to create TCP socket: {e}") from e
    try:
        tcp._set_reuse_flags(sock)
        try:
            await sock.bind((src_ip, src_port))
        except OSError as e:
            log.debug("hole-punch source bind %s:%d failed (%s); using an ephemeral source", src_ip, src_port, e)
            sock.close()
            try:
                return await trio.open_tcp_stream(host, port)
            except OSError as conn_e:
                raise OpenConnectionError(f"Failed to connect {host}:{port}: {conn_e}") from conn_e
        try:
            await sock.connect((host, port))
        except OSError as e:
            raise OpenConnectionError(f"Failed to connect {host}:{port} from {src_ip}:{src_port}: {e}") from e
        return trio.SocketStream(sock)
    except BaseException:
        sock.close()
        raise


class DemoteNoise(logging.Filter):
    """(g) Demote known-harmless upstream log records to DEBUG.

    Upstream: relay/circuit_v2/protocol.py:351 logs an ERROR "Error reading from
    hop stream" after every RESERVE (the client closes the stream, as the spec
    says), and protocol.py:291/385/959 log ERRORs when a circuit ends by reset;
    kad_dht/kad_dht.py:661 logs a WARNING "Failed to read DHT message" on every
    DHT stream the peer closes; kad_dht/peer_routing.py:380 warns on every lookup
    of a peer that has only circuit addresses.
    """

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self._prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and isinstance(record.msg, str) and record.msg.startswith(self._prefixes):
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


NOISE = {
    # protocol.py:351 after every RESERVE; 291, 385, 959 when a circuit ends by reset.
    "libp2p.relay.circuit_v2.protocol": (
        "Error reading from hop stream",
        "Unexpected error reading from stream",
        "Unexpected error handling hop stream",
        "Error sending status message",
    ),
    "libp2p.kad_dht.kad_dht": ("Failed to read DHT message",),
    # transport/tcp/tcp.py:483, 488: every failed dial is an ERROR, also the ones a
    # hole punch or a dial-back expects to fail; peerup reports failed dials itself.
    "libp2p.transport.tcp.tcp": ("Failed to open TCP stream", "Unexpected error opening TCP stream"),
    # autonat.py:236: a client that gave up waiting for its dial-back resets the
    # stream; the server's late answer then fails, at ERROR, once per request.
    "libp2p.host.autonat.autonat": ("Error handling AutoNAT stream",),
    # peer_routing.py:380: find_peer also queries the target, whose only
    # addresses are circuits the swarm cannot dial (pitfalls 1 and 7).
    "libp2p.kad_dht.peer_routing": ("Failed to open stream to",),
    # host/basic_host.py:1048 logs an 8-line ERROR for every refused protocol; the
    # plugin raises it as one line (ProtocolNotSupported / PeerUnreachable) instead.
    "libp2p.host.basic_host": ("Failed to open stream to peer",),
    # network/swarm.py:2710 logs a WARNING with a traceback when a connection ends
    # while it starts: a peer that sent garbage right after the handshake, or hung
    # up. The muxer already logged why, once a minute per peer (muxer.py).
    "libp2p.network.swarm": ("[ADDCONN_FAIL]",),
}


__all__ = [
    "KAD_MODULES",
    "NOISE",
    "PEERUP_KAD_PROTOCOL",
    "DemoteNoise",
    "advertise_addrs",
    "close_host",
    "connection_config",
    "dial_for_real",
    "disable_auto_dial",
    "drop_resource_manager",
    "hide_unspecified_addrs",
    "kad_protocol_in_use",
    "open_tcp_stream_from",
    "release_reservations_on_disconnect",
    "single_dial_attempt",
]
