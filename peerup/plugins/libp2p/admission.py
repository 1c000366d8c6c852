"""Who gets into a node's listener, and for how long before they prove who they are.

py-libp2p 0.8.1 admits inbound TCP connections through one limiter
(network/swarm.py:1982, ``_inbound_limiter``, 250 slots = max_connections 300
- min_connections 50) and two faults made it the way to lock a relay or a
serving node (issue #11, reproduced from outside):

1. **Slots were held for the life of the swarm, not of the connection.** The
   handler (swarm.py:2056-2058) awaits ``self.manager.wait_finished()`` after
   the upgrade, so the slot it borrowed was returned only when the node
   stopped: after 250 connect-and-close cycles from anyone, a relay refused
   everyone, forever, with no connection open.
2. **The pre-handshake phase was unbounded per source.** The same 250 slots
   were also held by sockets still in the Noise handshake, for up to the
   10 s upgrade timeout: 300 sockets sending a byte a second kept every new
   peer out (slowloris).

:class:`InboundGate` replaces that handler on the host's swarm (an instance
attribute; nothing process-wide):

* a connection counts against ``max_connections`` only while it is open (the
  swarm's own count of live connections, ``ConnectionConfig.max_connections``,
  which upstream also checks; the handler waits for *this* connection to close);
* a connection still in its handshake holds a *pending* slot, at most
  ``max_pending_per_ip`` per source address and ``max_pending`` in all; when all
  pending slots are taken the oldest handshake is cancelled to make room, so
  slow or silent sockets cannot keep a fast new peer out, they can only
  shorten each other's time;
* the whole handshake (Noise + yamux negotiation) must finish within
  ``handshake_timeout``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.network.connection.raw_connection import RawConnection

from peerup.core.logs import OncePer

log = logging.getLogger("peerup.libp2p.admission")


@dataclass(frozen=True)
class AdmissionLimits:
    max_connections: int = 2048
    max_pending: int = 256
    max_pending_per_ip: int = 16
    handshake_timeout: float = 5.0


@dataclass
class _Pending:
    ip: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    evicted: bool = False


@dataclass
class GateStats:
    """What the gate did, for logs, tests and the churn benchmark."""

    admitted: int = 0
    refused_per_ip: int = 0
    refused_full: int = 0
    evicted: int = 0
    handshake_failed: int = 0


class InboundGate:
    """The inbound handler of one swarm: pending caps, eviction, handshake deadline, open-connection wait."""

    def __init__(self, swarm: Any, limits: AdmissionLimits) -> None:
        self._swarm = swarm
        self.limits = limits
        self.stats = GateStats()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()
        self._pending_by_ip: Counter[str] = Counter()
        self._ids = itertools.count()
        self._logs = OncePer(log)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _note(self, ip: str, reason: str, message: str, *args: Any) -> None:
        self._logs.warning((ip, reason), message, *args)

    async def handle(self, read_write_closer: Any, maddr: Any) -> None:
        """Admit, upgrade within the deadline, then hold the task until this connection closes."""
        ip = _remote_ip(read_write_closer)
        swarm = self._swarm
        if self._pending_by_ip[ip] >= self.limits.max_pending_per_ip:
            self.stats.refused_per_ip += 1
            self._note(
                ip,
                "per-ip",
                "refusing a connection from %s: %d handshakes from that address already in progress",
                ip,
                self.limits.max_pending_per_ip,
            )
            await _close(read_write_closer)
            return
        if len(swarm.get_connections()) >= self.limits.max_connections:
            self.stats.refused_full += 1
            limit = self.limits.max_connections
            self._note(ip, "full", "refusing a connection from %s: %d connections open", ip, limit)
            await _close(read_write_closer)
            return
        while len(self._pending) >= self.limits.max_pending:
            _, oldest = self._pending.popitem(last=False)
            self._release(oldest)
            oldest.evicted = True
            oldest.scope.cancel()
            self.stats.evicted += 1
            self._note(
                oldest.ip,
                "evicted",
                "%d handshakes in progress: dropping the oldest, from %s, for a new one",
                self.limits.max_pending,
                oldest.ip,
            )
        ticket = _Pending(ip)
        key = next(self._ids)
        self._pending[key] = ticket
        self._pending_by_ip[ip] += 1
        muxed = None
        try:
            with ticket.scope, trio.move_on_after(self.limits.handshake_timeout):
                muxed = await swarm.upgrade_inbound_raw_conn(RawConnection(read_write_closer, False), maddr)
        except Exception as exc:  # noqa: BLE001 - a failed handshake is the peer's problem; logged at debug
            log.debug("inbound handshake from %s failed: %s", ip, exc)
        finally:
            if self._pending.pop(key, None) is not None:
                self._release(ticket)
        if muxed is None:
            self.stats.handshake_failed += 1
            if not ticket.evicted:
                log.debug("inbound handshake from %s did not finish in %g s", ip, self.limits.handshake_timeout)
            await _close(read_write_closer)
            return
        self.stats.admitted += 1
        closed = getattr(muxed, "event_closed", None)
        if closed is not None:
            await closed.wait()

    def _release(self, ticket: _Pending) -> None:
        self._pending_by_ip[ticket.ip] -= 1
        if self._pending_by_ip[ticket.ip] <= 0:
            del self._pending_by_ip[ticket.ip]


def _remote_ip(read_write_closer: Any) -> str:
    try:
        remote = read_write_closer.get_remote_address()
    except Exception:  # noqa: BLE001 - a socket that died before we looked
        remote = None
    return str(remote[0]) if remote else "?"


async def _close(read_write_closer: Any) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
        await read_write_closer.close()


def install(host: IHost, limits: AdmissionLimits) -> InboundGate:
    """Put an :class:`InboundGate` in front of ``host``'s listeners; returns it (for stats)."""
    swarm = host.get_network()
    gate = InboundGate(swarm, limits)
    swarm._handle_inbound_connection = gate.handle  # type: ignore[attr-defined]
    return gate


__all__ = ["AdmissionLimits", "GateStats", "InboundGate", "install"]
