"""Who may use a relay, and how much: the allowlist, the limits, and whom a reservation is for.

libp2p 0.8.1's relay has per-reservation limits (RelayLimits) but no notion of
"only these peers", and no cap on circuits across all peers. Both are added
around the protocol's two request handlers (relay/circuit_v2/protocol.py:504
``_handle_reserve`` and :625 ``_handle_connect``, called through ``self`` from
``_handle_hop_stream`` at :370-372), so refusals use the protocol's own status
codes and a client sees a normal "permission denied" or "resource limit".

The same wrappers fix and report what upstream does on its own:

* **Reservations are for the authenticated peer.** Upstream reserves for the
  RESERVE message's optional ``peer`` field when there is one (:509-513), so
  one client naming made-up IDs filled ``max_reservations`` for the
  reservation TTL (an hour by default), and releasing reservations on
  disconnect (workarounds.py, keyed by the connection's peer) never freed
  them (issue #11, item 6). The field is dropped before upstream sees the
  message, so it falls back to the connection's peer, as go-libp2p does.
* **Refusals for limits are logged and counted.** Upstream refuses a RESERVE
  when the relay is full (:523-530) and a CONNECT when a peer is at its
  circuit limit (:646-668) with a debug line at most; an operator saw nothing.
  Each refusal here is one WARNING per peer and reason a minute (:class:`peerup.core.logs.OncePer`),
  and counted in :class:`RelayPolicy`. A destination at its circuit limit is
  answered RESOURCE_LIMIT_EXCEEDED; upstream said NO_RESERVATION, which a
  client reads as "that peer is not on this relay".

The peer checked is always the authenticated peer of the connection.
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from peerup.core.errors import ConfigError
from peerup.core.logs import OncePer

log = logging.getLogger("peerup.relay")


Handler = Callable[[INetStream, Any], Awaitable[None]]


@dataclass
class RelayPolicy:
    allow: frozenset[ID] | None
    max_circuits: int
    active_circuits: int = 0
    #: Every refusal, whatever the reason.
    refused: int = 0
    #: Refusals by reason: "allow", "reservations", "circuits", "peer-circuits".
    refusals: Counter[str] = field(default_factory=Counter)
    _logs: OncePer = field(default_factory=lambda: OncePer(log))

    def note(self, peer: ID, what: str, reason: str = "allow") -> None:
        """Count a refusal of ``peer`` and log it (once per peer and refusal a minute)."""
        self.refused += 1
        self.refusals[reason] += 1
        self.warn_once(peer, what, "relay refused %s: %s", peer, what)

    def warn_once(self, peer: ID, key: str, message: str, *args: object) -> None:
        """A WARNING, unless one with the same peer and key went out in the last minute (then DEBUG)."""
        self._logs.warning((peer, key), message, *args)

    def allows(self, peer: ID) -> bool:
        return self.allow is None or peer in self.allow


#: The policy applied to each relay protocol, for its counters (tests, diagnostics).
_POLICIES: weakref.WeakKeyDictionary[CircuitV2Protocol, RelayPolicy] = weakref.WeakKeyDictionary()


def policy_of(protocol: CircuitV2Protocol) -> RelayPolicy | None:
    """The :class:`RelayPolicy` :func:`apply_relay_policy` put on ``protocol``, if any."""
    return _POLICIES.get(protocol)


def parse_allow(entries: list[str]) -> frozenset[ID] | None:
    if not entries:
        return None
    peers = set()
    for entry in entries:
        try:
            peers.add(ID.from_base58(entry))
        except Exception as exc:
            raise ConfigError(f"relay.allow: {entry!r} is not a peer ID ({exc})") from exc
    return frozenset(peers)


def apply_relay_policy(protocol: CircuitV2Protocol, policy: RelayPolicy) -> None:
    """Wrap the relay's RESERVE and CONNECT handlers with ``policy``."""
    reserve: Handler = protocol._handle_reserve
    connect: Handler = protocol._handle_connect
    resources = protocol.resource_manager
    _POLICIES[protocol] = policy

    async def handle_reserve(stream: INetStream, msg: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if not policy.allows(peer):
            policy.note(peer, "reservation (not in relay.allow)")
            await protocol._send_status(stream, StatusCode.PERMISSION_DENIED, "not allowed on this relay")
            return
        if msg.HasField("peer"):
            # Upstream would reserve for whatever ID this names (issue #11, item 6).
            if msg.peer.id and msg.peer.id != peer.to_bytes():
                what = "relay: %s sent a RESERVE for another peer ID; reserved for itself instead"
                policy.warn_once(peer, "reserve-for-other", what, peer)
            msg.ClearField("peer")
        # Upstream's own test (protocol.py:517-530), made first so the refusal is seen.
        if not resources.has_reservation(peer) and not resources.can_accept_reservation(peer):
            limit = resources.limits.max_reservations
            policy.note(peer, f"reservation (relay full: {limit} reservations, relay.max_reservations)", "reservations")
            await protocol._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "relay is at its reservation limit")
            return
        await reserve(stream, msg)

    async def refuse_circuit(stream: INetStream, source: ID, what: str, reason: str, status: StatusCode) -> None:
        policy.note(source, what, reason)
        await protocol._send_status(stream, status, what)
        await stream.reset()

    async def handle_connect(stream: INetStream, msg: Any) -> None:
        source = stream.muxed_conn.peer_id
        if not policy.allows(source):
            await refuse_circuit(stream, source, "circuit (not in relay.allow)", "allow", StatusCode.PERMISSION_DENIED)
            return
        if policy.active_circuits >= policy.max_circuits:
            what = f"circuit (relay full: {policy.max_circuits} circuits, relay.max_circuits)"
            await refuse_circuit(stream, source, what, "circuits", StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        # Upstream's per-peer tests (protocol.py:646-668), made first so the refusal is seen.
        per_peer = resources.limits.max_circuit_conns
        target = resources.get_reservation(ID(msg.peer.id)) if msg.HasField("peer") else None
        if target is not None and not target.can_accept_connection():
            what = f"circuit to {ID(msg.peer.id)} (it has {per_peer} circuits, relay.max_circuits_per_peer)"
            await refuse_circuit(stream, source, what, "peer-circuits", StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        own = resources.get_reservation(source)
        if own is not None and not own.can_accept_connection():
            what = f"circuit (it has {per_peer} circuits, relay.max_circuits_per_peer)"
            await refuse_circuit(stream, source, what, "peer-circuits", StatusCode.RESOURCE_LIMIT_EXCEEDED)
            return
        policy.active_circuits += 1
        try:
            await connect(stream, msg)  # runs for the life of the circuit
        finally:
            policy.active_circuits -= 1

    protocol._handle_reserve = handle_reserve  # type: ignore[method-assign]
    protocol._handle_connect = handle_connect  # type: ignore[method-assign]
