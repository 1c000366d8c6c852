"""Direct connections across NAT: DCUtR hole punching, the upgrade of a relayed peer, and the way back.

The protocol is libp2p's DCUtR (``/libp2p/dcutr``, specs/relay/DCUtR.md), so a
go, js or rust peer can punch with us: the peer that *received* a relayed
connection (B) opens a DCUtR stream over it, sends CONNECT with the addresses
it can be reached at, times the round trip to the other side's CONNECT, sends
SYNC and dials after half that round trip; the other side (A) dials at once on
SYNC. Both dial *from their listen port*, the port their relay connection
already left from (addresses.py), so each NAT already holds the mapping the
other side dials and the two SYNs meet in a TCP simultaneous open. A is the
client of the resulting connection, B the server (the spec's fixed roles).

Why not py-libp2p 0.8.1's ``relay/circuit_v2/dcutr.py`` (evaluated, not used):

* it reads its candidate addresses and its source port from ``host.get_addrs()``
  (dcutr.py:129-147, 1093-1170), which on a peerup node holds only circuit and
  confirmed addresses (workaround (d)), so it sent no address and bound no port;
* it "upgrades" every relayed connection of the host every 2 s, DHT and relay
  peers included (dcutr.py:297-343), and first dials every address the peerstore
  has for the peer (dcutr.py:488-512), which makes a NATed dialer wait out
  timeouts;
* it closes the relayed connection 60 s after an upgrade (dcutr.py:943-986)
  whether tunnels still run on it or not: open transfers were cut;
* its dials go through the swarm's own retry loop (network/swarm.py:980-1040).

What peerup keeps of it: the wire format (its protobuf), and the swarm's
source-bound dials (``dial_addr_as_responder``, ``_dial_addr_single_attempt``
with ``source``), which do what the spec needs.

:class:`PathUpgrader` decides *when*: on every inbound relayed connection it
tries a unilateral dial (the peer advertises a confirmed public address) or a
punch; failures are retried under the active retry policy, as long as the
relayed connection lives; once a direct connection exists, new streams use it
(the swarm prefers direct) and the relayed connection is released when its
last stream has ended, so no tunnel is cut by the upgrade. When the direct
connection dies, the next stream finds no connection and dials the relay again
at once; that new relayed connection starts the cycle again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import read_dcutr_msg
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg

from peerup.plugins.libp2p.addresses import AddressBook, thin_waist

log = logging.getLogger("peerup.nat")

PROTOCOL = TProtocol("/libp2p/dcutr")
#: Spec: encoded messages above 4 KiB are refused; at most this many addresses are sent.
MAX_ADDRS = 16
#: Bound on the CONNECT/SYNC exchange over the relay.
EXCHANGE_TIMEOUT = 10.0
#: One round of simultaneous dials; a SYN lost to a not-yet-open mapping is resent after 1 s
#: and again after 3 s, both within the round.
ROUND_TIMEOUT = 3.5
ROUNDS = 2
#: How long a punch waits for the relay's observation of our address right after start-up.
OBSERVATION_WAIT = 2.0
#: The initiator waits at most this long after SYNC (half the measured RTT, capped).
MAX_SYNC_DELAY = 2.0
#: Bound on dialing a peer's confirmed public address before punching instead.
UNILATERAL_TIMEOUT = 3.0
#: A relayed connection is released once a direct one exists and it has carried no stream this long.
RELEASE_GRACE = 2.0
#: How often the releaser looks.
RELEASE_CHECK = 0.5

DelaysFactory = Callable[[], Iterator[float]]


def is_relayed(conn: INetConn) -> bool:
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:  # noqa: BLE001 - some connections lack the type; fall back to the address
        pass
    muxed: Any = getattr(conn, "muxed_conn", None)
    try:
        if muxed is not None and muxed.get_connection_type() == ConnectionType.RELAYED:
            return True
    except Exception:  # noqa: BLE001 - as above
        pass
    try:
        return any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
    except Exception:  # noqa: BLE001 - as above
        return False


def direct_connection(host: IHost, peer: ID) -> INetConn | None:
    """An open, non-relayed connection to ``peer``, if there is one."""
    for conn in host.get_network().get_connections(peer):
        if not conn.is_closed and not is_relayed(conn):
            return conn
    return None


def is_inbound(conn: INetConn) -> bool:
    direction = getattr(conn, "direction", None)
    return str(getattr(direction, "name", direction)).lower() == "inbound"


@dataclass
class PunchResult:
    peer: str
    ok: bool
    seconds: float
    how: str  # "punch", "public address", "already direct"
    detail: str = ""


class HolePuncher:
    """Both roles of DCUtR on one host."""

    def __init__(self, host: IHost, book: AddressBook, listen_addrs: Callable[[], list[str]]) -> None:
        self.host = host
        self.book = book
        self._listen_addrs = listen_addrs
        self.results: list[PunchResult] = []
        #: Every attempt since start by (how, ok), for the metrics endpoint (results keeps the last 100).
        self.counts: Counter[tuple[str, bool]] = Counter()
        host.set_stream_handler(PROTOCOL, self._respond)

    # -- addresses ------------------------------------------------------------------

    async def _ours(self) -> list[bytes]:
        """Our candidates; right after start-up, first wait (bounded) for the relay's observation of us.

        A punch that starts before identify told us our public mapping would
        offer only LAN addresses and fail for 8 s; the observation arrives
        within a round trip of the relay connection.
        """
        book = self.book
        with trio.move_on_after(OBSERVATION_WAIT):
            while book.listen_port and not (book.observed or book.mapped or book.confirmed):
                await book.changed.wait()
        out = []
        for addr in self.book.punch_candidates(self._listen_addrs())[:MAX_ADDRS]:
            with contextlib.suppress(Exception):
                out.append(multiaddr.Multiaddr(addr).to_bytes())
        return out

    @staticmethod
    def _theirs(raw: list[bytes]) -> list[multiaddr.Multiaddr]:
        out = []
        for item in raw[:MAX_ADDRS]:
            try:
                addr = multiaddr.Multiaddr(item)
            except Exception:  # noqa: BLE001 - a peer's garbage address is skipped, not fatal
                continue
            waist = thin_waist(addr)
            if waist is not None and "/p2p-circuit" not in str(addr):
                out.append(multiaddr.Multiaddr(waist))
        return out

    def _source(self) -> tuple[str, int] | None:
        port = self.book.listen_port
        return ("0.0.0.0", port) if port else None

    # -- connection state -----------------------------------------------------------

    def direct_conn(self, peer: ID) -> INetConn | None:
        return direct_connection(self.host, peer)

    # -- A: the peer that dialed through the relay ----------------------------------

    async def _respond(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        started = trio.current_time()
        ok = False
        detail = ""
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                connect = await read_dcutr_msg(stream, HolePunch)
                if connect.type != HolePunch.CONNECT:
                    raise ValueError(f"expected CONNECT, got message type {connect.type}")
                theirs = self._theirs(list(connect.ObsAddrs))
                reply = HolePunch(type=HolePunch.CONNECT)
                reply.ObsAddrs.extend(await self._ours())
                await write_delimited_msg(stream, reply)
                sync = await read_dcutr_msg(stream, HolePunch)
                if sync.type != HolePunch.SYNC:
                    raise ValueError(f"expected SYNC, got message type {sync.type}")
            ok = await self._dial_rounds(peer, theirs, as_responder=False)
            detail = f"{len(theirs)} address(es)"
        except Exception as exc:  # noqa: BLE001 - a failed punch is logged and reported, never fatal
            detail = f"{type(exc).__name__}: {exc}"
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()
        self._report(PunchResult(peer.to_base58(), ok, trio.current_time() - started, "punch (answered)", detail))

    # -- B: the peer that received the relayed connection ---------------------------

    async def punch(self, peer: ID) -> PunchResult:
        """Run DCUtR as initiator over the relayed connection to ``peer``."""
        started = trio.current_time()
        if self.direct_conn(peer) is not None:
            return PunchResult(peer.to_base58(), True, 0.0, "already direct")
        ok = False
        detail = ""
        stream: INetStream | None = None
        try:
            with trio.fail_after(EXCHANGE_TIMEOUT):
                stream = await self.host.new_stream(peer, [PROTOCOL])
                connect = HolePunch(type=HolePunch.CONNECT)
                connect.ObsAddrs.extend(await self._ours())
                sent = time.monotonic()
                await write_delimited_msg(stream, connect)
                reply = await read_dcutr_msg(stream, HolePunch)
                rtt = time.monotonic() - sent
                if reply.type != HolePunch.CONNECT:
                    raise ValueError(f"expected CONNECT, got message type {reply.type}")
                theirs = self._theirs(list(reply.ObsAddrs))
                await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))
            await trio.sleep(min(rtt / 2, MAX_SYNC_DELAY))
            ok = await self._dial_rounds(peer, theirs, as_responder=True)
            detail = f"{len(theirs)} address(es), relay rtt {rtt * 1000:.1f} ms"
        except Exception as exc:  # noqa: BLE001 - as in _respond
            detail = f"{type(exc).__name__}: {exc}"
        finally:
            if stream is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()
        result = PunchResult(peer.to_base58(), ok, trio.current_time() - started, "punch", detail)
        self._report(result)
        return result

    async def _dial_rounds(self, peer: ID, addrs: list[multiaddr.Multiaddr], *, as_responder: bool) -> bool:
        if not addrs:
            return False
        network: Any = self.host.get_network()
        source = self._source()

        async def dial(addr: multiaddr.Multiaddr) -> None:
            try:
                if as_responder:
                    await network.dial_addr_as_responder(addr, peer, source)
                else:
                    await network._dial_addr_single_attempt(addr, peer, source)
            except Exception as exc:  # noqa: BLE001 - most punch dials fail; the round decides
                log.debug("punch dial to %s at %s: %s", peer, addr, exc)

        for _ in range(ROUNDS):
            with trio.move_on_after(ROUND_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for addr in addrs:
                        nursery.start_soon(dial, addr)
                    while self.direct_conn(peer) is None:
                        await trio.sleep(0.02)
                    nursery.cancel_scope.cancel()
            if self.direct_conn(peer) is not None:
                return True
        return False

    def _report(self, result: PunchResult) -> None:
        self.results.append(result)
        del self.results[:-100]
        self.counts[(result.how, result.ok)] += 1
        verdict = "succeeded in" if result.ok else "failed after"
        seconds = result.seconds
        log.info("direct path to %s: %s %s %.2f s (%s)", result.peer, result.how, verdict, seconds, result.detail)


class PathUpgrader(INotifee):
    """When to punch, when to retry, and when a relayed connection may go."""

    def __init__(self, puncher: HolePuncher, delays_factory: DelaysFactory, nursery: trio.Nursery) -> None:
        self.puncher = puncher
        self.host = puncher.host
        self._delays_factory = delays_factory
        self._nursery = nursery
        self._upgrading: set[ID] = set()
        self.upgrades = 0
        self.host.get_network().register_notifee(self)

    # -- notifee ----------------------------------------------------------------------

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        if is_relayed(conn) and is_inbound(conn):
            peer = conn.muxed_conn.peer_id
            if peer not in self._upgrading:
                self._upgrading.add(peer)
                self._nursery.start_soon(self._upgrade, peer)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        return None

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        return None

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        return None

    # -- the upgrade ------------------------------------------------------------------

    def _relayed(self, peer: ID) -> list[INetConn]:
        return [c for c in self.host.get_network().get_connections(peer) if is_relayed(c) and not c.is_closed]

    async def _upgrade(self, peer: ID) -> None:
        """Try for a direct path while a relayed connection to ``peer`` lives; spaced by the retry policy."""
        try:
            delays = self._delays_factory()
            await trio.sleep(0.05)  # let identify tell us the peer's public addresses first
            while self._relayed(peer) and self.puncher.direct_conn(peer) is None:
                if await self.try_direct(peer):
                    self.upgrades += 1
                    break
                delay = next(delays, None)
                if delay is None:
                    break
                log.info("direct path to %s: next attempt in %.1f s", peer, delay)
                with trio.move_on_after(delay):
                    while self._relayed(peer) and self.puncher.direct_conn(peer) is None:
                        await trio.sleep(0.25)
        finally:
            self._upgrading.discard(peer)

    async def try_direct(self, peer: ID) -> bool:
        public = self._public_addrs(peer)
        if public:
            started = trio.current_time()
            network: Any = self.host.get_network()
            for addr in public:
                try:
                    with trio.fail_after(UNILATERAL_TIMEOUT):
                        await network._dial_addr_single_attempt(addr, peer, None)
                except Exception as exc:  # noqa: BLE001 - fall through to punching
                    log.debug("direct dial to %s at %s: %s", peer, addr, exc)
                if self.puncher.direct_conn(peer) is not None:
                    self.puncher._report(
                        PunchResult(peer.to_base58(), True, trio.current_time() - started, "public address", str(addr))
                    )
                    return True
        return (await self.puncher.punch(peer)).ok

    def _public_addrs(self, peer: ID) -> list[multiaddr.Multiaddr]:
        try:
            addrs = self.host.get_peerstore().addrs(peer)
        except Exception:  # noqa: BLE001 - unknown peer: nothing public
            return []
        out = []
        for addr in addrs:
            waist = thin_waist(addr)
            if waist is not None and "/p2p-circuit" not in str(addr) and not waist.startswith("/ip4/0.0.0.0/"):
                out.append(multiaddr.Multiaddr(waist))
        return out

    # -- releasing relayed connections -------------------------------------------------

    async def release_relayed(self) -> None:
        """Forever: close a peer's relayed connection once a direct one exists and it carries no stream."""
        idle_since: dict[int, float] = {}
        while True:
            await trio.sleep(RELEASE_CHECK)
            now = trio.current_time()
            alive: set[int] = set()
            for peer, conns in list(self.host.get_network().get_connections_map().items()):
                if self.puncher.direct_conn(peer) is None:
                    continue
                for conn in conns:
                    if not is_relayed(conn) or conn.is_closed:
                        continue
                    key = id(conn)
                    alive.add(key)
                    if conn.get_streams():
                        idle_since.pop(key, None)
                        continue
                    since = idle_since.setdefault(key, now)
                    if now - since >= RELEASE_GRACE:
                        log.info("relayed connection to %s released: the direct path carries new streams", peer)
                        with trio.move_on_after(2), contextlib.suppress(Exception):
                            await conn.close()
            for key in list(idle_since):
                if key not in alive:
                    del idle_since[key]


__all__ = ["PROTOCOL", "HolePuncher", "PathUpgrader", "PunchResult", "direct_connection", "is_relayed"]
