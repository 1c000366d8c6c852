"""Who may use a relay, and how much: the allowlist and the global circuit cap.

libp2p 0.8.1's relay has per-reservation limits (RelayLimits) but no notion of
"only these peers", and no cap on circuits across all peers. Both are added
around the protocol's two request handlers (relay/circuit_v2/protocol.py:504
``_handle_reserve`` and :625 ``_handle_connect``, called through ``self`` from
``_handle_hop_stream`` at :370-372), so refusals use the protocol's own status
codes and a client sees a normal "permission denied" or "resource limit".

The peer checked is the authenticated peer of the connection, never the
optional peer field of the RESERVE message (which upstream trusts, :509).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode

from peerup.core.errors import ConfigError

log = logging.getLogger("peerup.relay")

#: A refused peer is logged once per this many seconds, whatever it sends.
LOG_EVERY = 60.0

Handler = Callable[[INetStream, Any], Awaitable[None]]


@dataclass
class RelayPolicy:
    allow: frozenset[ID] | None
    max_circuits: int
    active_circuits: int = 0
    refused: int = 0
    _last_logged: dict[tuple[ID, str], float] = field(default_factory=dict)

    def note(self, peer: ID, what: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_logged.get((peer, what), -LOG_EVERY) >= LOG_EVERY:
            self._last_logged[(peer, what)] = now
            log.warning("relay refused %s: %s", peer, what)

    def allows(self, peer: ID) -> bool:
        return self.allow is None or peer in self.allow


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

    async def handle_reserve(stream: INetStream, msg: Any) -> None:
        peer = stream.muxed_conn.peer_id
        if not policy.allows(peer):
            policy.note(peer, "reservation (not in relay.allow)")
            await protocol._send_status(stream, StatusCode.PERMISSION_DENIED, "not allowed on this relay")
            return
        await reserve(stream, msg)

    async def handle_connect(stream: INetStream, msg: Any) -> None:
        source = stream.muxed_conn.peer_id
        if not policy.allows(source):
            policy.note(source, "circuit (not in relay.allow)")
            await protocol._send_status(stream, StatusCode.PERMISSION_DENIED, "not allowed on this relay")
            await stream.reset()
            return
        if policy.active_circuits >= policy.max_circuits:
            policy.note(source, f"circuit (relay full: {policy.max_circuits} circuits)")
            await protocol._send_status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED, "relay is at its circuit limit")
            await stream.reset()
            return
        policy.active_circuits += 1
        try:
            await connect(stream, msg)  # runs for the life of the circuit
        finally:
            policy.active_circuits -= 1

    protocol._handle_reserve = handle_reserve  # type: ignore[method-assign]
    protocol._handle_connect = handle_connect  # type: ignore[method-assign]
