"""Ask the home router to forward our TCP listen port: NAT-PMP (RFC 6886) first, then UPnP IGD.

Why: a node behind a home router that does port mapping can be dialed
directly at ``/ip4/<router's public address>/tcp/<mapped port>``, with no
relay in the path (relays are slow and, if foreign, limited). Many home
routers offer it: UPnP IGD on most consumer boxes, NAT-PMP/PCP on Apple's and
on OpenWrt/miniupnpd. :func:`keep_port_mapped` keeps one mapping alive for
the life of the node and reports the external address whenever it changes.

Bounded throughout: one NAT-PMP request gets at most ``NATPMP_TIMEOUT`` (the
RFC's 250 ms retransmissions, doubling), each UPnP call runs in a worker
thread bounded by ``UPNP_CALL_TIMEOUT``, removal at exit by
``REMOVE_TIMEOUT``; the task runs beside the node and never delays startup.

Why not py-libp2p's ``discovery/upnp/upnp.py`` (``new_host(enable_upnp=True)``):

* UPnP only: no NAT-PMP/PCP, which many routers speak instead;
* it runs inside ``host.run()`` before the host is handed over
  (host/basic_host.py:595-601): SSDP discovery (miniupnpc's default 2 s wait)
  and unbounded SOAP calls delay every start, and a slow gateway blocks it;
* external port = internal port only (a second machine behind the same router
  listening on the same port cannot map), lease 0 = permanent: never renewed,
  and left on the router after a crash;
* no result but a log line: no external address to advertise, no notice when
  the router's public address changes;
* removal runs in ``_shutdown_background_services`` after the run block,
  unbounded; an ordinary "no gateway" is logged at ERROR with a traceback.

Its building block, the ``miniupnpc`` module (a libp2p dependency), is what
the UPnP path here uses too; NAT-PMP is a few bytes over UDP, written here.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import logging
import random
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
import multiaddr
import trio

log = logging.getLogger("peerup.libp2p.portmap")

Method = Literal["nat-pmp", "upnp"]
METHODS: tuple[Method, ...] = ("nat-pmp", "upnp")

NATPMP_PORT = 5351
#: Lease asked for (RFC 6886 section 3.3 recommends 7200 s); renewed at half of what is granted.
LIFETIME = 7200
#: One NAT-PMP request: 250 ms, then 500 ms, 1 s... until this passes.
NATPMP_TIMEOUT = 2.0
#: SSDP discovery wait (milliseconds) and the bound on each miniupnpc call in its thread.
UPNP_DISCOVER_MS = 1000
UPNP_CALL_TIMEOUT = 6.0
#: Bound on removing the mapping at exit.
REMOVE_TIMEOUT = 2.0
#: After a failed attempt, wait this long (then the next; the last repeats).
RETRY_DELAYS = (30.0, 60.0, 120.0, 300.0, 600.0)
#: A permanent UPnP mapping (lease 0) is checked this often.
PERMANENT_CHECK = 600.0
#: Other external ports tried when the router says ours is taken (by another machine).
_PORT_CHOICES = 3

_NATPMP_ERRORS = {
    1: "unsupported version",
    2: "not authorized or refused",
    3: "network failure (no public address?)",
    4: "out of resources",
    5: "unsupported opcode",
}


class PortMapError(Exception):
    """The gateway did not give a mapping; ``str()`` is one line for the log."""


@dataclass(frozen=True)
class PortMapping:
    """A forward from the router's public address to our TCP port."""

    method: Method
    gateway: str
    internal_port: int
    external_ip: str
    external_port: int
    #: Seconds granted; 0 = until removed (a permanent UPnP mapping).
    lifetime: int

    @property
    def multiaddr(self) -> str:
        """What a peer on the internet dials: ``/ip4/<public>/tcp/<port>``."""
        return f"/ip4/{self.external_ip}/tcp/{self.external_port}"

    def renew_after(self) -> float:
        """Seconds until this mapping should be renewed (half its lifetime, as RFC 6886 suggests)."""
        return PERMANENT_CHECK if self.lifetime <= 0 else max(1.0, self.lifetime / 2)


def default_gateway() -> str | None:
    """The IPv4 default gateway from ``/proc/net/route`` (Linux), or None."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface Destination Gateway Flags ...: destination 0 = default; flag 0x2 = RTF_GATEWAY.
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 0x2:
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None


def _public(address: str) -> bool:
    """Is ``address`` one the internet can reach (not private, CGNAT, loopback...)?"""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return ip.is_global and not ip.is_unspecified


# -- NAT-PMP (RFC 6886) ------------------------------------------------------------------------


async def _natpmp(gateway: str, request: bytes, timeout: float = NATPMP_TIMEOUT) -> bytes:
    """Send ``request`` to ``gateway``:5351, retransmitting at 250 ms doubling; the answer, or PortMapError."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.connect((gateway, NATPMP_PORT))
        except OSError as exc:
            raise PortMapError(f"cannot reach {gateway}:{NATPMP_PORT}: {exc.strerror or exc}") from exc
        wait = 0.25
        with trio.move_on_after(timeout):
            while True:  # bounded by the scope above
                await sock.send(request)
                with trio.move_on_after(wait):
                    while True:  # ignores stray datagrams until the scope ends
                        try:
                            answer = await sock.recv(64)
                        except ConnectionRefusedError as exc:  # ICMP port unreachable
                            raise PortMapError(f"nothing answers NAT-PMP on {gateway}") from exc
                        if len(answer) >= 8 and answer[0] == 0 and answer[1] == request[1] | 0x80:
                            code = struct.unpack("!H", answer[2:4])[0]
                            if code:
                                why = _NATPMP_ERRORS.get(code, f"result {code}")
                                raise PortMapError(f"NAT-PMP gateway {gateway} refused: {why}")
                            return answer
                wait *= 2
        raise PortMapError(f"no NAT-PMP answer from {gateway} within {timeout:g} s")


async def _natpmp_map(
    gateway: str, internal_port: int, external_port: int, lifetime: int, *, timeout: float = NATPMP_TIMEOUT
) -> PortMapping:
    answer = await _natpmp(gateway, b"\x00\x00", timeout)
    if len(answer) < 12:
        raise PortMapError(f"NAT-PMP gateway {gateway} sent a short answer")
    external_ip = socket.inet_ntoa(answer[8:12])
    if not _public(external_ip):
        raise PortMapError(f"NAT-PMP gateway {gateway} has no public address (it has {external_ip}: double NAT?)")
    request = struct.pack("!BBHHHI", 0, 2, 0, internal_port, external_port, lifetime)  # opcode 2 = TCP
    answer = await _natpmp(gateway, request, timeout)
    if len(answer) < 16:
        raise PortMapError(f"NAT-PMP gateway {gateway} sent a short answer")
    _, _, _, _, internal, mapped, granted = struct.unpack("!BBHIHHI", answer[:16])
    if internal != internal_port or not mapped or not granted:
        raise PortMapError(f"NAT-PMP gateway {gateway} gave no mapping for port {internal_port}")
    return PortMapping("nat-pmp", gateway, internal_port, external_ip, mapped, granted)


async def _natpmp_unmap(mapping: PortMapping) -> None:
    # Lifetime 0 with external port 0 deletes our mapping for that internal port (RFC 6886 3.4).
    request = struct.pack("!BBHHHI", 0, 2, 0, mapping.internal_port, 0, 0)
    await _natpmp(mapping.gateway, request, REMOVE_TIMEOUT)


# -- UPnP IGD (miniupnpc, in a worker thread) -------------------------------------------------


class _Upnp:
    """One IGD found by SSDP; every call blocks, so each runs in a thread (:meth:`call`)."""

    def __init__(self) -> None:
        # A libp2p dependency without type hints; imported here so NAT-PMP-only use never loads it.
        self.client: Any = importlib.import_module("miniupnpc").UPnP()
        self.client.discoverdelay = UPNP_DISCOVER_MS
        self.gateway = ""

    def discover(self) -> None:
        try:
            found = self.client.discover()
        except Exception as exc:  # miniupnpc raises bare Exception
            if str(exc) != "Success":  # a known miniupnpc quirk: success reported as an exception
                raise PortMapError(f"UPnP discovery failed: {exc}") from exc
            found = 1
        if not found:
            raise PortMapError("no UPnP gateway answered")
        try:
            control_url = str(self.client.selectigd())  # e.g. http://192.168.1.1:45497/ctl/IPConn
        except Exception as exc:  # miniupnpc raises bare Exception
            if "No UPnP device" in str(exc):  # after the "Success" quirk above: nothing answered
                raise PortMapError("no UPnP gateway answered") from exc
            raise PortMapError(f"no UPnP internet gateway among {found} device(s): {exc}") from exc
        self.gateway = urlsplit(control_url).hostname or control_url

    def add(self, internal_port: int, external_port: int, lifetime: int, description: str) -> PortMapping:
        """Map ``external_port`` (or, when another machine holds it, one of a few random ones)."""
        external_ip = str(self.client.externalipaddress() or "")
        if not _public(external_ip):
            raise PortMapError(f"UPnP gateway has no public address (it has {external_ip or 'none'}: double NAT?)")
        lan = self.client.lanaddr
        candidates = [external_port] + [random.randint(20000, 60000) for _ in range(_PORT_CHOICES)]
        last = ""
        for port in candidates:
            for lease in (lifetime, 0) if lifetime else (0,):  # some IGDs take only permanent leases (error 725)
                try:
                    self.client.addportmapping(port, "TCP", lan, internal_port, description, "", lease)
                except Exception as exc:  # noqa: BLE001 - miniupnpc raises bare Exception("<UPnP error text>")
                    last = str(exc)
                    if "OnlyPermanentLeasesSupported" in last and lease:
                        continue
                    break
                return PortMapping("upnp", self.gateway, internal_port, external_ip, port, lease)
            if "Conflict" not in last:
                break
        raise PortMapError(f"UPnP gateway refused to map port {internal_port}: {last}")

    def remove(self, mapping: PortMapping) -> None:
        self.client.deleteportmapping(mapping.external_port, "TCP")

    @staticmethod
    async def call(fn: Callable[..., Any], *args: Any, timeout: float = UPNP_CALL_TIMEOUT) -> Any:
        """Run a blocking miniupnpc call in a thread, abandoned (not waited for) after ``timeout``."""
        with trio.move_on_after(timeout):
            # anyio's, not trio's: trio-typing's stubs still name the argument "cancellable".
            return await anyio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)
        raise PortMapError(f"UPnP gateway did not answer within {timeout:g} s")


# -- keeping one mapping ----------------------------------------------------------------------


class _Mapper:
    """Makes and renews one mapping, by whichever method worked last, else each in order."""

    def __init__(self, internal_port: int, methods: Sequence[Method], gateway: str | None, lifetime: int) -> None:
        self.internal_port = internal_port
        self.methods = tuple(methods)
        self.gateway = gateway
        self.lifetime = lifetime
        self.upnp: _Upnp | None = None

    async def map(self, previous: PortMapping | None) -> PortMapping:
        wanted = previous.external_port if previous is not None else self.internal_port
        order = list(self.methods)
        if previous is not None:  # renew where it worked
            order.remove(previous.method)
            order.insert(0, previous.method)
        reasons = []
        for method in order:
            try:
                if method == "nat-pmp":
                    return await self._natpmp(wanted)
                return await self._upnp(wanted, renew=previous is not None and previous.method == "upnp")
            except PortMapError as exc:
                reasons.append(f"{method}: {exc}")
        raise PortMapError("; ".join(reasons) or "no method enabled")

    async def _natpmp(self, wanted: int) -> PortMapping:
        gateway = self.gateway or default_gateway()
        if gateway is None:
            raise PortMapError("no default gateway")
        return await _natpmp_map(gateway, self.internal_port, wanted, self.lifetime)

    async def _upnp(self, wanted: int, renew: bool) -> PortMapping:
        if self.upnp is None or not renew:
            upnp = _Upnp()
            await _Upnp.call(upnp.discover, timeout=UPNP_CALL_TIMEOUT + UPNP_DISCOVER_MS / 1000)
            self.upnp = upnp
        mapping: PortMapping = await _Upnp.call(self.upnp.add, self.internal_port, wanted, self.lifetime, "peerup")
        return mapping

    async def unmap(self, mapping: PortMapping) -> None:
        if mapping.method == "nat-pmp":
            await _natpmp_unmap(mapping)
        elif self.upnp is not None:
            await _Upnp.call(self.upnp.remove, mapping, timeout=REMOVE_TIMEOUT)


OnChange = Callable[[str | None], None]


async def keep_port_mapped(
    internal_port: int,
    on_change: OnChange,
    *,
    methods: Sequence[Method] = METHODS,
    gateway: str | None = None,
    lifetime: int = LIFETIME,
    retry_delays: Sequence[float] = RETRY_DELAYS,
) -> None:
    """Keep TCP ``internal_port`` forwarded by the router until cancelled; then remove the forward.

    Calls ``on_change(multiaddr)`` with ``/ip4/<public>/tcp/<port>`` when a mapping
    is made or its address changes, and ``on_change(None)`` when it is lost and
    at exit. Logs one line when mapped and one when mapping fails (later failures
    of the same kind at DEBUG). Never raises but for cancellation.

    :param gateway: the NAT-PMP gateway; default: the default route's gateway.
    """
    if not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods: some of {METHODS}")
    mapper = _Mapper(internal_port, methods, gateway, lifetime)
    current: PortMapping | None = None
    failures = 0
    try:
        while True:  # ends by cancellation; every pass sleeps (renewal or retry delay)
            try:
                mapping = await mapper.map(current)
            except PortMapError as exc:
                delay = retry_delays[min(failures, len(retry_delays) - 1)]
                if current is not None:
                    log.warning("port mapping of TCP %d lost (%s); retrying in %g s", internal_port, exc, delay)
                    current = None
                    on_change(None)
                elif failures == 0:
                    log.info("port mapping of TCP %d: not mapped (%s); retrying in %g s", internal_port, exc, delay)
                else:
                    log.debug("port mapping of TCP %d: still not mapped (%s)", internal_port, exc)
                failures += 1
                await trio.sleep(delay)
                continue
            if current is None or mapping.multiaddr != current.multiaddr:
                lease = f"{mapping.lifetime} s lease" if mapping.lifetime else "permanent"
                log.info(
                    "port mapping: TCP %d is reachable at %s (%s, gateway %s, %s)",
                    internal_port,
                    mapping.multiaddr,
                    mapping.method,
                    mapping.gateway,
                    lease,
                )
                on_change(mapping.multiaddr)
            else:
                log.debug("port mapping of TCP %d renewed (%s)", internal_port, mapping.multiaddr)
            current = mapping
            failures = 0
            await trio.sleep(mapping.renew_after())
    finally:
        if current is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(REMOVE_TIMEOUT):
                try:
                    await mapper.unmap(current)
                    log.debug("port mapping of TCP %d removed", internal_port)
                except Exception as exc:  # noqa: BLE001 - best effort; the lease expires anyway
                    log.debug("port mapping of TCP %d: removal failed: %s", internal_port, exc)
            on_change(None)


def mappable_ports(addrs: Sequence[object]) -> list[int]:
    """TCP ports worth mapping among a host's listen addresses: IPv4, not loopback, not WebSocket."""
    ports: list[int] = []
    for addr in addrs:
        try:
            maddr = multiaddr.Multiaddr(str(addr))
            kinds = [p.name for p in maddr.protocols()]
            if kinds[:2] != ["ip4", "tcp"] or len(kinds) != 2:
                continue
            if ipaddress.IPv4Address(maddr.value_for_protocol("ip4")).is_loopback:
                continue
            port = int(maddr.value_for_protocol("tcp"))
        except Exception:  # noqa: BLE001 - not an address we can map
            continue
        if port and port not in ports:
            ports.append(port)
    return ports


async def map_listen_ports(addrs: Sequence[object], on_change: Callable[[set[str]], None], **options: Any) -> None:
    """Keep every mappable TCP port of ``addrs`` mapped; ``on_change`` gets the set of external addresses.

    The libp2p node passes ``host.get_transport_addrs()`` and its address book's
    ``set_mapped`` (addresses.py), which confirms a mapped address before advertising it.
    """
    ports = mappable_ports(addrs)
    if not ports:
        log.debug("port mapping: no IPv4 TCP listen address to map")
        return
    current: dict[int, str] = {}

    def tracker(port: int) -> OnChange:
        def changed(addr: str | None) -> None:
            if addr is None:
                current.pop(port, None)
            else:
                current[port] = addr
            on_change(set(current.values()))

        return changed

    async with trio.open_nursery() as nursery:
        for port in ports:
            nursery.start_soon(functools.partial(keep_port_mapped, port, tracker(port), **options))


__all__ = [
    "METHODS",
    "PortMapError",
    "PortMapping",
    "default_gateway",
    "keep_port_mapped",
    "map_listen_ports",
    "mappable_ports",
]
