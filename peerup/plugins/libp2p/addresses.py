"""What a node knows about its own addresses, and which of them it may tell others.

A node behind NAT has three kinds of address, and mixing them up costs either
reach or time:

* **listen addresses** (``0.0.0.0:P``, ``192.168.1.2:P``): good on the LAN only;
* **observed addresses**: what a relay (or any peer we dialed *from our listen
  port*) saw as our source, learnt from identify's ``observed_addr``. With an
  endpoint-independent NAT (most home routers) that is exactly where a hole
  punch can reach us, but an unsolicited dial there is dropped;
* **confirmed addresses**: observed (or port-mapped) addresses a relay managed
  to dial back on a fresh connection (AutoNAT's dial-back). Only these are
  advertised to everyone (identify, the DHT): a node that advertised an
  unconfirmed address would make every dialer wait out a dial timeout first.

Two things make the observed address useful. First, the node dials its relays
from its listen port (SO_REUSEPORT, which libp2p's TCP listener sets), so the
mapping the relay observes is the mapping of the port we listen and punch on,
whatever port the NAT chose: no port prediction. Second, the dial-back is a
*new* connection: py-libp2p 0.8.1's AutoNAT server answers with
``host.connect()`` (host/autonat/autonat.py:373-404), which returns the
connection the asking peer already has to it, so it confirmed every address
of every peer, reachable or not (workaround (p), :class:`DialBackService`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID

log = logging.getLogger("peerup.nat")

#: A dial-back (ours for others, and the answer we wait for) is bounded by these.
DIAL_BACK_TIMEOUT = 5.0
QUERY_TIMEOUT = DIAL_BACK_TIMEOUT + 5.0


@dataclass
class AddressBook:
    """This node's addresses by kind; the single source for identify, the DHT and hole punching."""

    #: The TCP port this node listens, dials its relays and punches from (None: not listening on TCP).
    listen_port: int | None = None
    #: Observed ``/ip4/A/tcp/P`` -> peer IDs that saw it on a connection from our listen port.
    observed: dict[str, set[str]] = field(default_factory=dict)
    #: External addresses the router mapped for us (UPnP IGD, NAT-PMP).
    mapped: set[str] = field(default_factory=set)
    #: Addresses a dial-back reached: advertised to everyone.
    confirmed: set[str] = field(default_factory=set)
    #: Addresses a dial-back failed to reach (still good hole-punch candidates).
    unreachable: set[str] = field(default_factory=set)
    #: Called whenever the sets above change.
    on_change: Callable[[], None] = lambda: None
    #: Set on every change; waiters replace it.
    changed: trio.Event = field(default_factory=trio.Event)

    @property
    def reachability(self) -> str:
        """``public`` (a confirmed address), ``nated`` (observed, none confirmed) or ``unknown``."""
        if self.confirmed:
            return "public"
        if self.unreachable:
            return "nated"
        return "unknown"

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        self.on_change()

    def observe(self, addr: str, observer: str) -> None:
        seen = self.observed.setdefault(addr, set())
        if observer not in seen:
            seen.add(observer)
            if len(seen) == 1:
                log.info("observed address %s (seen by %s)", addr, observer)
            self._changed()

    def set_mapped(self, addrs: set[str]) -> None:
        if addrs != self.mapped:
            self.mapped = set(addrs)
            self._changed()

    def verdict(self, addr: str, reachable: bool) -> None:
        before = (addr in self.confirmed, addr in self.unreachable)
        (self.confirmed if reachable else self.unreachable).add(addr)
        (self.unreachable if reachable else self.confirmed).discard(addr)
        if (addr in self.confirmed, addr in self.unreachable) != before:
            log.info("address %s is %s", addr, "reachable from outside" if reachable else "not reachable from outside")
            self._changed()

    def unconfirmed(self) -> list[str]:
        """Observed or mapped addresses that no dial-back has judged yet."""
        judged = self.confirmed | self.unreachable
        return sorted(a for a in {*self.observed, *self.mapped} if a not in judged)

    def public(self) -> list[str]:
        return sorted(self.confirmed)

    def punch_candidates(self, listen: list[str]) -> list[str]:
        """Addresses to send in a DCUtR CONNECT: confirmed, mapped, observed, then LAN ones."""
        out: list[str] = []
        for addr in [*sorted(self.confirmed), *sorted(self.mapped), *sorted(self.observed), *listen]:
            if addr not in out and _punchable(addr):
                out.append(addr)
        return out


def _punchable(addr: str) -> bool:
    """A TCP address with a concrete IP (not 0.0.0.0, not a circuit)."""
    try:
        maddr = multiaddr.Multiaddr(addr)
        ip = maddr.value_for_protocol("ip4") if "/ip4/" in addr else maddr.value_for_protocol("ip6")
        maddr.value_for_protocol("tcp")
    except Exception:  # noqa: BLE001 - anything unparsable is not a candidate
        return False
    return "/p2p-circuit" not in addr and ip is not None and not ipaddress.ip_address(ip).is_unspecified


def thin_waist(addr: Any) -> str | None:
    """``/ip4/A/tcp/P`` (or ip6) from any multiaddr, without /p2p or anything after the port."""
    text = str(addr)
    parts = text.split("/")
    if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        return None
    return "/".join(parts[:5])


def local_port(conn: INetConn) -> int | None:
    """The local TCP port under a (direct) swarm connection, found by walking its layers."""
    obj: Any = getattr(conn, "muxed_conn", conn)
    for _ in range(12):
        sock = getattr(obj, "socket", None)
        if sock is not None and hasattr(sock, "getsockname"):
            with contextlib.suppress(OSError):
                return int(sock.getsockname()[1])
            return None
        for name in ("secured_conn", "conn", "read_writer", "read_write_closer", "stream"):
            inner = getattr(obj, name, None)
            if inner is not None and inner is not obj:
                obj = inner
                break
        else:
            return None
    return None


def watch_observations(host: IHost, book: AddressBook) -> None:
    """Feed identify's ``observed_addr`` into ``book`` when it describes our listen port's mapping.

    Upstream records observations in its ObservedAddrManager (host/basic_host.py:1318)
    and advertises them only after 4 distinct observers; a node usually has one
    relay. Observations on relayed connections are already dropped upstream.
    """
    manager = getattr(host, "_observed_addr_manager", None)
    if manager is None:
        log.debug("identify address discovery is off in this libp2p host")
        return
    original = manager.record_observation

    def record(conn: INetConn, observed: Any, listen_addrs: Any) -> Any:
        addr = thin_waist(observed)
        if addr is not None and book.listen_port is not None and local_port(conn) == book.listen_port:
            with contextlib.suppress(Exception):
                book.observe(addr, conn.muxed_conn.peer_id.to_base58())
        return original(conn, observed, listen_addrs)

    manager.record_observation = record


class DialBackService(AutoNATService):
    """AutoNAT v1 (``/libp2p/autonat/1.0.0``) with a dial-back that really dials.

    Workaround (p): upstream's ``_try_dial`` calls ``host.connect()``, which
    returns the connection the asking peer already has to us, so every address
    was "reachable". Here each candidate (already filtered upstream to the
    asker's observed IP, as the spec requires against amplification) is dialed
    on a new connection, bounded, and that connection is closed again.
    """

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        network: Any = self.host.get_network()
        for raw in addrs:
            try:
                addr = multiaddr.Multiaddr(raw)
            except Exception:  # noqa: BLE001 - a peer's garbage is its problem
                continue
            conn: Any = None
            try:
                with trio.fail_after(DIAL_BACK_TIMEOUT):
                    conn = await network.dial_addr(addr, peer_id)
                return bytes(raw)
            except Exception as exc:  # noqa: BLE001 - unreachable is the answer, not an error
                log.debug("dial-back to %s at %s failed: %s", peer_id, addr, exc)
            finally:
                if conn is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(Exception):
                        await conn.close()
        return None


async def confirm(service: DialBackService, relay: ID, book: AddressBook) -> None:
    """Ask ``relay`` to dial back each unjudged address in ``book``; record the verdicts."""
    for addr in book.unconfirmed():
        try:
            raw = multiaddr.Multiaddr(addr).to_bytes()
            status, _ = await service.query_server(relay, [raw], timeout=QUERY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a relay that cannot answer tells us nothing
            log.debug("dial-back request to %s for %s failed: %s", relay, addr, exc)
            continue
        if status == int(Message.OK):
            book.verdict(addr, True)
        elif status in (int(Message.E_DIAL_ERROR),):
            book.verdict(addr, False)
        else:
            log.debug("relay %s would not dial back %s (status %d)", relay, addr, status)


__all__ = [
    "AddressBook",
    "DialBackService",
    "confirm",
    "local_port",
    "thin_waist",
    "watch_observations",
]
