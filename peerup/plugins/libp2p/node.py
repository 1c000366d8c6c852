"""A running libp2p host adapted to the core's :class:`~peerup.core.node.Node`.

Two roles share one code path:

* ``relay``: a circuit relay v2 (hop) and the DHT bootstrap node (server mode).
* ``node``: reserves a slot on every configured relay, keeps it (reconnecting
  with backoff when the relay goes away), advertises only its circuit
  addresses, and finds others through the relay's DHT.

All libp2p quirks this needs are in :mod:`.workarounds`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from peerup.core.errors import ConfigError, PeerNotFound, PeerUnreachable, ProtocolNotSupported
from peerup.core.node import PeerAttribute, StreamHandler
from peerup.core.settings import Settings
from peerup.plugins.libp2p import workarounds
from peerup.plugins.libp2p.identity import load_identity
from peerup.plugins.libp2p.keepalive import keep_alive
from peerup.plugins.libp2p.relay_policy import RelayPolicy, apply_relay_policy, parse_allow
from peerup.plugins.libp2p.stream import Libp2pByteStream, stream_path

log = logging.getLogger("peerup.libp2p")

#: transport.py:445 reports a refused circuit as "... with status 204": NO_RESERVATION,
#: the relay has no slot for that peer (circuit v2 spec status codes).
_NO_RESERVATION = "status 204"

DelaysFactory = Callable[[], Iterator[float]]

#: "Unlimited" for RelayLimits fields that must be ints (about 146 years, 4 EiB).
_UNLIMITED_SECONDS = 2**32
_UNLIMITED_BYTES = 2**62
#: How often the relay keeper checks that its relay connection is still up.
_RELAY_CHECK_INTERVAL = 0.25
#: Re-reserve this long before the relay says the reservation expires.
_RESERVATION_MARGIN = 30.0
#: Bound on one direct address, so an address behind NAT cannot eat the whole
#: dial budget the core gave us before the relay is tried.
DIRECT_DIAL_TIMEOUT = 5.0
#: Bound on reserving a slot during startup; the keeper keeps trying after it.
_STARTUP_RESERVE_WAIT = 5.0


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

    # -- used by the hooks ---------------------------------------------------------

    def is_connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def open_stream(self, peer_id: str, addrs: tuple[str, ...], protocol: str) -> Libp2pByteStream:
        """Reuse a connection, else try direct addresses, then circuits; open a stream.

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
            net_stream = await self.host.new_stream(peer, [TProtocol(protocol)])
        except Exception as exc:
            if _protocol_refused(exc):
                raise ProtocolNotSupported(f"peer {peer_id} does not speak {protocol}") from exc
            raise PeerUnreachable(f"peer {peer_id}: cannot open {protocol}: {_why(exc)}") from exc
        stream = Libp2pByteStream(net_stream, peer_id)
        log.info("stream %s to %s is %s", protocol, peer_id, stream.extra(PeerAttribute.path))
        return stream

    async def _connect_direct(self, peer: ID, addr: str) -> str | None:
        try:
            maddr = multiaddr.Multiaddr(addr)
            if maddr.get_peer_id() is None:
                maddr = maddr.encapsulate(multiaddr.Multiaddr(f"/p2p/{peer.to_base58()}"))
            info = info_from_p2p_addr(maddr)
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
                await self.host.connect(relay_info)
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
            while self.is_connected(relay.peer_id) and time.time() < relay.expires - _RESERVATION_MARGIN:
                await trio.sleep(_RELAY_CHECK_INTERVAL)
            if not self.is_connected(relay.peer_id):
                relay.reserved = False
                log.warning("relay %s: connection lost; reconnecting", relay.addr)

    async def _reserve(self, relay: RelayState) -> None:
        if not self.is_connected(relay.peer_id):
            await self.host.connect(relay.info)
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


def relay_circuit_addr(relay_addr: str, peer_id: str) -> str:
    """``<relay addr with /p2p/RELAY>/p2p-circuit/p2p/<peer_id>``."""
    return f"{relay_addr.rstrip('/')}/p2p-circuit/p2p/{peer_id}"


def parse_peer_id(text: str) -> str:
    """Validate a base58 peer ID; ``ValueError`` with a one-line reason otherwise."""
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


def _relay_limits(settings: Settings) -> RelayLimits:
    relay = settings.relay
    return RelayLimits(
        duration=int(relay.circuit_duration) or _UNLIMITED_SECONDS,
        data=relay.circuit_data if relay.circuit_data is not None else _UNLIMITED_BYTES,
        max_circuit_conns=relay.max_circuits_per_peer,
        max_reservations=relay.max_reservations,
        reservation_ttl=int(relay.reservation_ttl),
    )


def _relay_states(settings: Settings) -> list[RelayState]:
    states = []
    for addr in settings.relays:
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise ConfigError(f"relays: {addr!r} is not a relay address ending in /p2p/<relay peer ID>") from exc
        states.append(RelayState(addr=addr, info=info))
    return states


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
    workarounds.apply_global_workarounds()
    key_pair = load_identity(settings.home)
    relays = _relay_states(settings) if role == "node" else []
    listen = settings.relay.listen if role == "relay" else settings.listen
    try:
        listen_addrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:
        raise ConfigError(f"listen: {listen!r} holds an address that is not a multiaddr") from exc
    host = new_host(
        key_pair=key_pair,
        muxer_preference="YAMUX",  # pitfall 10: mplex fails over a circuit
        connection_config=workarounds.connection_config(),
    )
    workarounds.disable_auto_dial(host)
    if role == "relay":
        protocol = CircuitV2Protocol(host, limits=_relay_limits(settings), allow_hop=True)
        apply_relay_policy(protocol, RelayPolicy(parse_allow(settings.relay.allow), settings.relay.max_circuits))
        dht = KadDHT(host, DHTMode.SERVER)
        workarounds.release_reservations_on_disconnect(host, protocol.resource_manager)
    else:
        protocol = CircuitV2Protocol(host, allow_hop=False)
        dht = KadDHT(host, DHTMode.CLIENT)
    circuit = CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))
    node = Libp2pNode(host, role, dht, circuit)
    node.relays = relays
    if relays:
        # Pitfall 6/7: advertise only circuit addresses, so peers (and the DHT)
        # never try our direct addresses from behind NAT.
        workarounds.advertise_addrs(host, node.circuit_addrs)
    async with host.run(listen_addrs=listen_addrs):
        try:
            async with (
                background_trio_service(protocol),
                background_trio_service(dht),
                trio.open_nursery() as nursery,
            ):
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
            await workarounds.close_host(host)


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
