"""A running libp2p host adapted to the core's :class:`~peerup.core.node.Node`.

Two roles share one code path:

* ``relay``: a circuit relay v2 (hop) and the DHT bootstrap node (server mode).
* ``node``: reserves a slot on every configured relay, keeps it (reconnecting
  with backoff when the relay goes away), advertises only its circuit
  addresses, and finds others through the relay's DHT.

All libp2p quirks this needs are in :mod:`.workarounds`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, ProtocolNotSupportedError
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from peerup.core.errors import ConfigError, PeerNotFound, PeerUnreachable, ProtocolNotSupported
from peerup.core.node import PeerAttribute, PeerConnection, RelaySlot, Sample, StreamHandler
from peerup.core.settings import Settings
from peerup.plugins.libp2p import admission, introspect, muxer, patches, portmap, relay_limit, transports, workarounds
from peerup.plugins.libp2p.addresses import AddressBook, DialBackService, confirm, watch_observations
from peerup.plugins.libp2p.admission import AdmissionLimits, InboundGate
from peerup.plugins.libp2p.holepunch import HolePuncher, PathUpgrader, direct_connection
from peerup.plugins.libp2p.identity import load_identity
from peerup.plugins.libp2p.keepalive import close_if_silent, keep_alive
from peerup.plugins.libp2p.muxer import MuxerLimits
from peerup.plugins.libp2p.relay_policy import RelayPolicy, apply_relay_policy, parse_allow
from peerup.plugins.libp2p.stream import Libp2pByteStream, stream_path

log = logging.getLogger("peerup.libp2p")

#: transport.py:445 reports a refused circuit as "... with status 204": NO_RESERVATION,
#: the relay has no slot for that peer (circuit v2 spec status codes).
_NO_RESERVATION = "status 204"

DelaysFactory = Callable[[], Iterator[float]]

#: How often the relay keeper checks that its relay connection is still up.
_RELAY_CHECK_INTERVAL = 0.25
#: Re-reserve this long before the relay says the reservation expires.
_RESERVATION_MARGIN = 30.0
#: Bound on one direct address, so an address behind NAT cannot eat the whole
#: dial budget the core gave us before the relay is tried.
DIRECT_DIAL_TIMEOUT = 5.0
#: A node pings its relay connection this often (the relay's own keepalive is slower):
#: a NAT that changed its mapping is noticed, and the slot reserved again, within seconds.
RELAY_PROBE_INTERVAL = 5.0
RELAY_PROBE_TIMEOUT = 3.0
#: A stream not open on a direct connection after this long gets the connection probed.
DIRECT_STREAM_PROBE_AFTER = 1.5
#: The probe's bound: no yamux pong in this time and the direct connection is closed.
DIRECT_PROBE_TIMEOUT = 2.0
#: Bound on reserving a slot during startup; the keeper keeps trying after it.
_STARTUP_RESERVE_WAIT = 5.0
#: Confirmed and unreachable verdicts are forgotten and asked again this often.
_ADDRESS_RECHECK = 3600.0


def settings_delays(settings: Settings) -> DelaysFactory:
    """Endless backoff from ``settings.retry``: initial * multiplier**n, capped at max_delay."""
    retry = settings.retry

    def delays() -> Iterator[float]:
        for n in itertools.count():
            yield min(retry.initial * retry.multiplier ** min(n, 64), retry.max_delay)

    return delays


def _dialable(addr: str) -> list[str]:
    """``addr`` plus a 127.0.0.1 variant when it is the wildcard (so local demos work)."""
    if addr.startswith("/ip4/0.0.0.0/"):
        return [addr, "/ip4/127.0.0.1/" + addr.removeprefix("/ip4/0.0.0.0/")]
    return [addr]


@dataclass
class RelayState:
    """One configured relay, as seen from a node."""

    addr: str
    info: PeerInfo
    reserved: bool = False
    expires: float = 0.0

    @property
    def peer_id(self) -> ID:
        return self.info.peer_id


class Libp2pNode:
    """The core ``Node`` over a libp2p host; also what the plugin's hooks work with."""

    def __init__(self, host: IHost, role: str, dht: KadDHT, circuit: CircuitV2Transport) -> None:
        self.host = host
        self.role = role
        self.dht = dht
        #: Dials circuits with the STOP role only (pitfall 2: CLIENT would RESERVE on every dial).
        self.circuit = circuit
        self.relays: list[RelayState] = []
        #: Set each time a relay reservation is (re)made; tests and callers wait on it.
        self.reservation_changed = trio.Event()
        #: The inbound admission gate of this host's listeners (its stats count refusals).
        self.gate: InboundGate | None = None
        #: Our own addresses by kind: observed, mapped, confirmed (addresses.py).
        self.addresses = AddressBook()
        #: DCUtR and the relayed -> direct upgrade (None when nat.hole_punching is off).
        self.puncher: HolePuncher | None = None
        self.upgrader: PathUpgrader | None = None
        self.dial_back: DialBackService | None = None
        #: The circuit relay protocol; serves circuits (HOP) only on a relay.
        self.relay_protocol: CircuitV2Protocol | None = None
        #: When each connection opened, for ``peerup peers`` (introspect.py).
        self.clock = introspect.ConnectionClock()
        host.get_network().register_notifee(self.clock)

    # -- the core Node protocol ---------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def listen_addrs(self) -> list[str]:
        """Circuit addresses first (what peers learn from us), then direct ones."""
        return self.circuit_addrs() + self.direct_addrs()

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        async def on_stream(net_stream: INetStream) -> None:
            remote = net_stream.muxed_conn.peer_id.to_base58()
            stream = Libp2pByteStream(net_stream, remote)
            log.info("inbound %s from %s (%s)", protocol, remote, stream_path(net_stream))
            try:
                await handler(stream, remote)
            except Exception:
                log.exception("handler for %s failed on a stream from %s", protocol, remote)
            finally:
                await stream.aclose()

        self.host.set_stream_handler(TProtocol(protocol), on_stream)

    def parse_peer_id(self, text: str) -> str:
        return parse_peer_id(text)

    # -- core.node.Introspectable (peerup status / peers) ---------------------------

    def relay_slots(self) -> list[RelaySlot]:
        return introspect.relay_slots(self)

    def reachability(self) -> str:
        return self.addresses.reachability

    async def wait_relay_slot(self) -> None:
        await introspect.wait_relay_slot(self)

    async def connections(self, rtt_timeout: float) -> list[PeerConnection]:
        return await introspect.connections(self, self.clock, rtt_timeout)

    def samples(self) -> list[Sample]:
        return introspect.samples(self)

    # -- addresses ----------------------------------------------------------------

    def direct_addrs(self) -> list[str]:
        suffix = f"/p2p/{self.peer_id}"
        out: list[str] = []
        for addr in self.host.get_transport_addrs():
            out.extend(a + suffix for a in _dialable(str(addr)))
        return out

    def circuit_addrs(self) -> list[str]:
        """``<relay>/p2p-circuit/p2p/<self>`` for each configured relay."""
        return [relay_circuit_addr(relay.addr, self.peer_id) for relay in self.relays]

    def public_addrs(self) -> list[str]:
        """Addresses a relay reached us at on a fresh connection: safe for anyone to dial."""
        return [f"{addr}/p2p/{self.peer_id}" for addr in self.addresses.public()]

    def advertised_addrs(self) -> list[str]:
        """What identify and the DHT tell others: confirmed public addresses first, then circuits."""
        return self.public_addrs() + self.circuit_addrs()

    def punch_listen_addrs(self) -> list[str]:
        """Our listen addresses for peers on the same LAN: concrete, not loopback, without /p2p.

        A wildcard listener (0.0.0.0) stands for every interface's address, which
        is what a peer behind the same router can dial (home routers rarely
        hairpin their public address). Loopback would make a peer on another
        machine dial itself.
        """
        out: list[str] = []
        for addr in self.host.get_transport_addrs():
            text = str(addr)
            if text.startswith("/ip4/0.0.0.0/tcp/"):
                port = text.split("/")[4]
                out.extend(f"/ip4/{ip}/tcp/{port}" for ip in _interface_ipv4s())
            elif not text.startswith(("/ip4/127.", "/ip6/")):
                out.append(text)
        return out

    async def connect_relay(self, info: PeerInfo) -> None:
        """Connect to a relay from our listen port, so the mapping it observes is the one we punch on.

        Falls back to an ordinary dial (any source port) when that fails, e.g.
        while the previous connection's 4-tuple is still in TIME_WAIT: reaching
        the relay matters more than the observed address.
        """
        if patches.enabled("dial-for-real"):
            workarounds.dial_for_real(self.host, info.peer_id)
        port = self.addresses.listen_port
        network: Any = self.host.get_network()
        error: Exception | None = None
        # The configured addresses, dialed one by one: host.connect() would pick
        # from the peerstore, where identify may have put the relay's 0.0.0.0.
        for source in [("0.0.0.0", port), None] if port else [None]:
            for addr in info.addrs:
                try:
                    await network.dial_addr(addr, info.peer_id, source)
                    return
                except Exception as exc:  # noqa: BLE001 - next address, or next source
                    error = exc
                    log.debug("relay %s: dial %s from %s failed: %s", info.peer_id, addr, source or "any port", exc)
        raise PeerUnreachable(f"relay {info.peer_id}: {_why(error) if error else 'no address'}")

    # -- used by the hooks ---------------------------------------------------------

    def is_connected(self, peer: ID) -> bool:
        return any(not conn.is_closed for conn in self.host.get_network().get_connections(peer))

    async def open_stream(
        self, peer_id: str, addrs: tuple[str, ...], protocol: str, *, fallback_done: bool = False
    ) -> Libp2pByteStream:
        """Reuse a connection, else try direct addresses, then circuits; open a stream.

        A stream that a direct connection does not open promptly gets that
        connection probed; a connection that does not answer is closed and the
        stream goes through the relay at once (see :meth:`_new_stream`).

        :raises PeerUnreachable: no address gave a connection, or the stream failed.
        """
        peer = ID.from_base58(peer_id)
        tried: list[str] = []
        if not self.is_connected(peer):
            direct = [a for a in addrs if "/p2p-circuit" not in a]
            relayed = [a for a in addrs if "/p2p-circuit" in a]
            for addr in direct:
                error = await self._connect_direct(peer, addr)
                if error is None:
                    break
                tried.append(f"{addr}: {error}")
            if not self.is_connected(peer):
                for addr in relayed:
                    error = await self._connect_circuit(addr)
                    if error is None:
                        break
                    tried.append(f"{addr}: {error}")
            if not self.is_connected(peer):
                if relayed and not direct and all(_NO_RESERVATION in attempt for attempt in tried):
                    # Every relay we asked says the peer holds no slot there: it is
                    # not running (or uses another relay), which is "not found".
                    raise PeerNotFound(
                        f"peer {peer_id} not found: not in the DHT and holds no reservation on "
                        f"{len(relayed)} relay(s) asked (is it running, with the same relay?)"
                    )
                detail = "; ".join(tried) if tried else "no addresses"
                raise PeerUnreachable(f"peer {peer_id}: no address worked (tried {len(tried)}: {detail})")
        try:
            net_stream = await self._new_stream(peer, protocol)
        except _DeadDirectConnection:
            if fallback_done:
                raise PeerUnreachable(f"peer {peer_id}: its direct connection died and no other worked") from None
            return await self.open_stream(peer_id, addrs, protocol, fallback_done=True)
        except Exception as exc:
            if _protocol_refused(exc):
                raise ProtocolNotSupported(f"peer {peer_id} does not speak {protocol}") from exc
            raise PeerUnreachable(f"peer {peer_id}: cannot open {protocol}: {_why(exc)}") from exc
        stream = Libp2pByteStream(net_stream, peer_id)
        log.info("stream %s to %s is %s", protocol, peer_id, stream.extra(PeerAttribute.path))
        return stream

    async def _new_stream(self, peer: ID, protocol: str) -> INetStream:
        """``host.new_stream``, watched: a direct connection that stays silent is probed and closed.

        A direct connection can die without a sound (the NAT changed its
        mapping, a firewall forgot the flow): until keepalive notices, the swarm
        keeps choosing it, since it prefers direct over relayed, and every new
        stream waits out the negotiation timeout. If the stream is not open
        after ``DIRECT_STREAM_PROBE_AFTER`` s the connection gets a yamux ping;
        no answer within ``DIRECT_PROBE_TIMEOUT`` s closes it, and the caller
        falls back to the relay.
        """
        conn = direct_connection(self.host, peer)
        if conn is None or not self.relays:
            return await self.host.new_stream(peer, [TProtocol(protocol)])
        dead = False

        async def watch(scope: trio.CancelScope) -> None:
            nonlocal dead
            await trio.sleep(DIRECT_STREAM_PROBE_AFTER)
            why = "did not answer while a stream was opening (path lost?)"
            if await close_if_silent(self.host, conn, DIRECT_PROBE_TIMEOUT, why):
                dead = True
                scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, nursery.cancel_scope)
            try:
                net_stream = await self.host.new_stream(peer, [TProtocol(protocol)])
            except Exception:
                if dead or conn.is_closed:
                    raise _DeadDirectConnection from None
                raise
            nursery.cancel_scope.cancel()
        if dead:
            with contextlib.suppress(Exception):
                await net_stream.reset()
            raise _DeadDirectConnection
        return net_stream

    async def _connect_direct(self, peer: ID, addr: str) -> str | None:
        try:
            maddr = multiaddr.Multiaddr(addr)
            if maddr.get_peer_id() is None:
                maddr = maddr.encapsulate(multiaddr.Multiaddr(f"/p2p/{peer.to_base58()}"))
            info = info_from_p2p_addr(maddr)
            if patches.enabled("dial-for-real"):
                workarounds.dial_for_real(self.host, info.peer_id)
            with trio.fail_after(DIRECT_DIAL_TIMEOUT):
                await self.host.connect(info)
        except trio.TooSlowError:
            return f"no answer in {DIRECT_DIAL_TIMEOUT:g} s"
        except Exception as exc:  # noqa: BLE001 - libp2p raises many unrelated types; reported, not hidden
            return _why(exc)
        return None

    async def _connect_circuit(self, addr: str) -> str | None:
        try:
            maddr = multiaddr.Multiaddr(addr)
            relay_part = addr.split("/p2p-circuit", 1)[0]
            relay_info = info_from_p2p_addr(multiaddr.Multiaddr(relay_part))
            if not self.is_connected(relay_info.peer_id):
                await self.connect_relay(relay_info)
            # Pitfall 1: the swarm cannot dial /p2p-circuit; the transport can,
            # and the upgraded connection joins the swarm.
            await self.circuit.dial(maddr)
        except Exception as exc:  # noqa: BLE001 - libp2p raises many unrelated types; reported, not hidden
            return _why(exc)
        return None

    async def find_peer(self, peer: ID, timeout: float) -> list[str]:
        """DHT lookup bounded by ``timeout``; [] when not found."""
        with trio.move_on_after(timeout):
            try:
                info = await self.dht.find_peer(peer)
            except Exception as exc:  # noqa: BLE001 - libp2p raises many unrelated types; reported, not hidden
                log.debug("DHT lookup of %s failed: %s", peer, exc)
                return []
            return [str(a) for a in info.addrs] if info is not None else []
        log.debug("DHT lookup of %s gave no answer in %.1f s", peer, timeout)
        return []

    # -- relay keeping (role "node") ------------------------------------------------

    async def keep_relay(self, relay: RelayState, delays_factory: DelaysFactory) -> None:
        """Forever: connect to ``relay``, reserve, refresh, and start over if it goes away."""
        delays = delays_factory()
        while True:
            try:
                await self._reserve(relay)
            except Exception as exc:  # noqa: BLE001 - libp2p raises many unrelated types; reported, not hidden
                relay.reserved = False
                delay = next(delays)
                log.warning("relay %s: %s; retrying in %.1f s", relay.addr, _why(exc), delay)
                await trio.sleep(delay)
                continue
            delays = delays_factory()
            next_probe = trio.current_time() + RELAY_PROBE_INTERVAL
            while self.is_connected(relay.peer_id) and time.time() < relay.expires - _RESERVATION_MARGIN:
                await trio.sleep(_RELAY_CHECK_INTERVAL)
                if trio.current_time() >= next_probe:
                    await self._probe_relay(relay)
                    next_probe = trio.current_time() + RELAY_PROBE_INTERVAL
            if not self.is_connected(relay.peer_id):
                relay.reserved = False
                log.warning("relay %s: connection lost; reconnecting", relay.addr)

    async def _probe_relay(self, relay: RelayState) -> None:
        """Ping the relay connection; close it when it does not answer, so the keeper reconnects.

        The relay connection is what makes this node reachable, and a NAT that
        changed its mapping kills it without a sound: packets from the relay
        reach a port the router forgot. Our own ping leaves from the new
        mapping and the relay answers it with a reset, or nothing comes back;
        either way the node learns within seconds instead of waiting for the
        relay's keepalive, and reserves again.
        """
        why = f"(our relay) did not answer within {RELAY_PROBE_TIMEOUT:g} s"
        for conn in list(self.host.get_network().get_connections(relay.peer_id)):
            await close_if_silent(self.host, conn, RELAY_PROBE_TIMEOUT, why)

    async def _reserve(self, relay: RelayState) -> None:
        if not self.is_connected(relay.peer_id):
            await self.connect_relay(relay.info)
        stream = await self.host.new_stream(relay.peer_id, [HOP_PROTOCOL])
        try:
            ok = await self.circuit._make_reservation(stream, relay.peer_id)
        finally:
            await stream.close()
        if not ok:
            raise PeerUnreachable(f"relay {relay.peer_id} refused the reservation")
        relay.expires = float(self.circuit._reservations.get(relay.peer_id, 0)) or time.time() + 3600
        relay.reserved = True
        await self.dht.routing_table.add_peer(PeerInfo(relay.peer_id, relay.info.addrs), skip_server_mode_check=True)
        log.info("relay %s: slot reserved, reachable as %s", relay.addr, relay_circuit_addr(relay.addr, self.peer_id))
        self.reservation_changed.set()
        self.reservation_changed = trio.Event()

    # -- our own addresses (role "node") -------------------------------------------

    async def keep_addresses_confirmed(self) -> None:
        """Forever: have a relay dial back each newly observed or mapped address; re-check hourly.

        A confirmed address is advertised (identify push to connected peers, and
        through them the DHT); an unreachable one stays a hole-punch candidate only.
        """
        assert self.dial_back is not None
        last_full = trio.current_time()
        pause = 1.0
        while True:
            with trio.move_on_after(_ADDRESS_RECHECK):
                while not self.addresses.unconfirmed():
                    await self.addresses.changed.wait()
            if trio.current_time() - last_full >= _ADDRESS_RECHECK:
                self.addresses.confirmed.clear()
                self.addresses.unreachable.clear()
                last_full = trio.current_time()
            for relay in [r for r in self.relays if self.is_connected(r.peer_id)][:1]:
                await confirm(self.dial_back, relay.peer_id, self.addresses)
            # A relay that gave no verdict (busy, restarting, our path broken) is
            # asked again later, less and less often; a new address asks at once.
            pause = 1.0 if not self.addresses.unconfirmed() else min(pause * 2, 300.0)
            with trio.move_on_after(pause):
                await self.addresses.changed.wait()

    async def push_address_changes(self) -> None:
        """Forever: tell connected peers (the relay's DHT among them) when our advertised addresses change."""
        advertised = self.advertised_addrs()
        while True:
            await self.addresses.changed.wait()
            await trio.sleep(0.1)  # several changes at once make one push
            if self.advertised_addrs() != advertised:
                advertised = self.advertised_addrs()
                log.info("advertising %s", ", ".join(advertised) or "no address")
                with trio.move_on_after(10):
                    await self.host._push_identify_to_all_peers()  # type: ignore[attr-defined]


def _interface_ipv4s() -> list[str]:
    """IPv4 addresses of this machine's non-loopback interfaces (ifaddr, a libp2p dependency)."""
    import ifaddr

    return [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ip.ip.startswith("127.")
    ]


class _DeadDirectConnection(Exception):
    """The direct connection a stream was opening on did not answer a probe and was closed."""


def relay_circuit_addr(relay_addr: str, peer_id: str) -> str:
    """``<relay addr with /p2p/RELAY>/p2p-circuit/p2p/<peer_id>``."""
    return f"{relay_addr.rstrip('/')}/p2p-circuit/p2p/{peer_id}"


@functools.lru_cache(maxsize=4096)
def parse_peer_id(text: str) -> str:
    """Validate a base58 peer ID; ``ValueError`` with a one-line reason otherwise.

    Cached: every proxied connection names its peer, and a peer ID's check is
    pure (lru_cache does not keep failures, so garbage is re-checked, cheaply).
    """
    text = text.strip()
    hint = "expected base58 like 12D3KooW..., see `peerup whoami`"
    try:
        raw = ID.from_base58(text).to_bytes()
    except Exception as exc:
        raise ValueError(f"{text!r} is not a peer ID ({hint})") from exc
    # ID.from_base58 accepts any base58 text ("abc"); a peer ID is a multihash:
    # identity (0x00, inlined public key) or sha2-256 (0x12, 32 bytes), then the
    # digest length, then exactly that many bytes.
    if len(raw) < 3 or raw[0] not in (0x00, 0x12) or raw[1] != len(raw) - 2 or (raw[0] == 0x12 and raw[1] != 32):
        raise ValueError(f"{text!r} is not a peer ID ({hint})")
    return text


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else exc.__class__.__name__


def _relay_states(settings: Settings) -> list[RelayState]:
    states = []
    for addr in settings.relays:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise ConfigError(f"relays: {addr!r} is not a relay address ending in /p2p/<relay peer ID>") from exc
        states.append(RelayState(addr=addr, info=info))
    return states


def _checked_listen_addrs(
    listen: list[str], where: str, role: str, enabled: Sequence[str]
) -> list[multiaddr.Multiaddr]:
    """The listen addresses, checked before the host exists, so a bad one is one line and nothing starts.

    Only /ip4 or /ip6 + /tcp (+ /ws when enabled): anything else has no
    transport here (Swarm.listen skips it, network/swarm.py:1834, and host.run
    ignores the result, host/basic_host.py:591: the node ran listening on
    nothing), and /dns listen addresses bind every interface (tcp.py:256,
    extract_ip_from_multiaddr gives no host for them). A fixed port that
    something already listens on is refused: libp2p binds with SO_REUSEPORT
    (transport/tcp/tcp.py:44-62), so a second relay on the port would start and
    the kernel would split connections between the two. The probe binds without
    SO_REUSEPORT, which fails while any listener holds the port; SO_REUSEADDR
    lets a restart reuse a port left in TIME_WAIT.
    """
    if role == "relay" and not listen:
        raise ConfigError("relay.listen is empty: a relay needs an address, e.g. /ip4/0.0.0.0/tcp/7777")
    checked = []
    for text in listen:
        try:
            maddr = multiaddr.Multiaddr(text)
            kinds = [proto.name for proto in maddr.protocols()]
        except Exception as exc:
            raise ConfigError(f"{where}: {text!r} is not a multiaddr (expected /ip4/ADDR/tcp/PORT)") from exc
        transports.check_listen_addr(where, text, kinds, enabled)  # TCP, or /ws when enabled
        port = int(maddr.value_for_protocol("tcp"))
        with socket.socket(socket.AF_INET6 if kinds[0] == "ip6" else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((maddr.value_for_protocol(kinds[0]), port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    who = "relay" if role == "relay" else "node"
                    raise ConfigError(f"{where}: port {port} is already in use (another peerup {who}?)") from exc
                raise ConfigError(f"{where}: cannot listen on {text}: {exc.strerror or exc}") from exc
        checked.append(maddr)
    return checked


@asynccontextmanager
async def open_libp2p_node(
    settings: Settings, role: str, delays_factory: DelaysFactory | None = None
) -> AsyncIterator[Libp2pNode]:
    """Run a host for ``role`` (``"relay"`` or ``"node"``); on exit stop it and free its ports.

    :param delays_factory: spacing of relay reconnect attempts; defaults to
        ``settings.retry`` repeated forever.
    """
    if role not in ("relay", "node"):
        raise ValueError(f"role must be 'relay' or 'node', not {role!r}")
    patches.apply_all()  # the process-wide ones, once per process
    key_pair = load_identity(settings.home)
    relays = _relay_states(settings) if role == "node" else []
    listen = settings.relay.listen if role == "relay" else settings.listen
    where = "relay.listen" if role == "relay" else "listen"
    listen_addrs = _checked_listen_addrs(listen, where, role, settings.transports)
    limits = settings.limits
    host = new_host(
        key_pair=key_pair,
        muxer_preference="YAMUX",  # pitfall 10: mplex fails over a circuit
        connection_config=(
            workarounds.connection_config(limits.max_connections, limits.handshake_timeout)
            if patches.enabled("connection-config")
            else None
        ),
    )
    # issue #12.5: tcp / ws
    transports.install(host, settings.transports, limits.handshake_timeout, patches.enabled("websocket-uncount"))
    # The per-host patches (patches.py says why each), each skipped when switched off.
    if patches.enabled("no-auto-dial"):
        workarounds.disable_auto_dial(host)
    if patches.enabled("hide-wildcard-addrs"):
        workarounds.hide_unspecified_addrs(host)
    if patches.enabled("drop-resource-manager"):
        workarounds.drop_resource_manager(host)
    if patches.enabled("single-dial-attempt"):
        workarounds.single_dial_attempt(host)
    if patches.enabled("peerup-session"):
        muxer.install(
            host,
            MuxerLimits(
                max_inbound_streams=limits.max_streams_per_connection,
                max_window=limits.max_stream_window,
                window_growth=limits.window_growth_per_connection,
                max_buffered=limits.max_buffered,
                group_commit=patches.enabled("yamux-group-commit"),
            ),
        )
    gate: InboundGate | None = None
    if patches.enabled("admission-gate"):
        gate = admission.install(
            host,
            AdmissionLimits(
                max_connections=limits.max_connections,
                max_pending=limits.max_pending,
                max_pending_per_ip=limits.max_pending_per_ip,
                handshake_timeout=limits.handshake_timeout,
            ),
        )
    if role == "relay":
        protocol = CircuitV2Protocol(host, limits=relay_limit.relay_limits(settings), allow_hop=True)  # #12.6
        apply_relay_policy(protocol, RelayPolicy(parse_allow(settings.relay.allow), settings.relay.max_circuits))
        dht = KadDHT(host, DHTMode.SERVER)
        if patches.enabled("release-reservations"):
            workarounds.release_reservations_on_disconnect(host, protocol.resource_manager)
    else:
        protocol = CircuitV2Protocol(host, allow_hop=False)
        dht = KadDHT(host, DHTMode.CLIENT)
    circuit = CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))
    node = Libp2pNode(host, role, dht, circuit)
    node.relays = relays
    node.gate = gate
    node.relay_protocol = protocol
    if relays and patches.enabled("advertise-addrs"):
        # Pitfall 6/7: advertise circuit addresses and confirmed public ones only,
        # so peers (and the DHT) never try an unreachable address from behind NAT.
        workarounds.advertise_addrs(host, node.advertised_addrs)
    node.dial_back = DialBackService(host)  # type: ignore[arg-type]  # answers others' dial-back requests; asks ours
    async with host.run(listen_addrs=listen_addrs):
        try:
            if listen_addrs and not host.get_transport_addrs():
                # Every bind failed after the probe passed (a race, or a refusal the
                # probe cannot see); libp2p logged why. Not a node listening on nothing.
                raise ConfigError(f"{where}: could not listen on {', '.join(listen)}")
            async with (
                background_trio_service(protocol),
                background_trio_service(dht),
                trio.open_nursery() as nursery,
            ):
                _start_nat(node, settings, nursery, delays_factory or settings_delays(settings))
                for relay in relays:
                    nursery.start_soon(node.keep_relay, relay, delays_factory or settings_delays(settings))
                if settings.timeouts.keepalive is not None:
                    nursery.start_soon(
                        keep_alive, host, settings.timeouts.keepalive, settings.timeouts.keepalive_timeout
                    )
                if relays:
                    with trio.move_on_after(_STARTUP_RESERVE_WAIT):
                        while not any(r.reserved for r in relays):
                            await node.reservation_changed.wait()
                log.info("%s %s listening on %s", role, node.peer_id, ", ".join(node.listen_addrs()))
                try:
                    yield node
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            if patches.enabled("close-host"):
                await workarounds.close_host(host)


def _start_nat(node: Libp2pNode, settings: Settings, nursery: trio.Nursery, delays: DelaysFactory) -> None:
    """Address discovery, dial-back confirmation and hole punching for a node (docs/nat.md)."""
    ports = [addr.value_for_protocol("tcp") for addr in node.host.get_transport_addrs() if "/tcp/" in str(addr)]
    node.addresses.listen_port = int(ports[0]) if ports else None
    if node.role != "node":
        return
    if settings.nat.port_mapping:  # also without relays: a mapped port is how such a node is reached
        nursery.start_soon(portmap.map_listen_ports, node.host.get_transport_addrs(), node.addresses.set_mapped)
    if not node.relays:
        return
    if settings.nat.address_discovery:
        watch_observations(node.host, node.addresses)
        nursery.start_soon(node.keep_addresses_confirmed)
        nursery.start_soon(node.push_address_changes)
    if settings.nat.hole_punching:
        node.puncher = HolePuncher(node.host, node.addresses, node.punch_listen_addrs)
        node.upgrader = PathUpgrader(node.puncher, delays, nursery)
        nursery.start_soon(node.upgrader.release_relayed)


def _protocol_refused(exc: BaseException) -> bool:
    """Did the peer answer "na" to our protocol, rather than fail to answer?

    multiselect_client.py:98 raises a plain MultiselectClientError whose message
    starts "protocols not supported" (the ProtocolNotSupportedError of each try is
    folded into that text), and basic_host.py:1059 wraps it in StreamFailure; so
    the cause chain is walked and the message read.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ProtocolNotSupportedError) or (
            isinstance(seen, MultiselectClientError) and str(seen).startswith("protocols not supported")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
