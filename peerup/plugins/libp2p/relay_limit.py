"""Limited relays: read the limit a relay puts on a relayed connection, record it, say when it cuts.

A stock go-libp2p or js-libp2p relay limits every relayed connection (by
default 2 minutes and 128 KiB; js counts both directions together, go each
direction) and then resets it. The circuit v2 spec has the relay say so: a
``limit`` (``duration`` seconds, ``data`` bytes; 0 or absent = none) in its
STATUS reply to CONNECT (to the dialing peer) and in the STOP CONNECT
message (to the destination). py-libp2p 0.8.1 reads neither
(relay/circuit_v2/transport.py:426-447 and :609 read the reply's status only;
protocol.py:397-418 its STOP message's type only): a tunnel through such a
relay died after about 96 KiB with no word of why.

:func:`read_delimited_msg` and :func:`write_delimited_msg` replace the two
module-level names those functions call (installed by :mod:`.patches`,
entry "relay-limits"), ``read_delimited_msg`` (and, in transport.py,
``write_delimited_msg``, to learn whom a CONNECT is for). When a
CONNECT reply or a STOP CONNECT carries a limit, the relay stream that is
about to become the relayed connection is tagged with a :class:`Limit`, and:

* one line is logged, at INFO when the limit is tight (a data cap, or under an
  hour; a peerup relay's default 24 h is not) and at DEBUG otherwise:
  "relay R limits the relayed connection with P to 128 KiB / 120 s";
* :func:`connection_limit` finds it from the connection (or its muxer, or a
  stream on it), so path logic can keep a limited connection for coordination
  (identify, DCUtR) and small traffic;
* the bytes each way are counted, and when the relay ends the connection at
  its limit one WARNING line says so; its streams are then reset by peerup's
  yamux session (ADR 0008), which the application sees as ECONNRESET.

A reservation's limit (the RESERVE reply) is kept per relay
(:func:`reservation_limit`) and logged once per relay and value.

:func:`relay_limits` builds the limits peerup's own relay enforces and
advertises, in the spec's terms: upstream puts ``Limit(duration, data)`` from
its ``RelayLimits`` into the RESERVE and CONNECT replies and the STOP CONNECT
(protocol.py:594, 690, 744), so "no data cap" must be 0, not a
huge number (2**62, which a client would announce as a 4 EiB limit), and a
duration must fit the field's uint32: with a sub-second
``relay.circuit_duration`` (``int(0.5) or 2**32``) the relay answered every
RESERVE with MALFORMED_MESSAGE ("Value out of range: 4294967296",
protocol.py:613), so no node could reserve at all.

js-libp2p's relay sends its duration in milliseconds (see
:data:`JS_MILLISECONDS_FROM`); such a value is read back as seconds.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libp2p.relay.circuit_v2 import transport as relay_transport
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, StopMessage
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits

from peerup.core.settings import Settings

log = logging.getLogger("peerup.libp2p.relay_limit")

#: The attribute a tagged relay stream carries.
_TAG = "_peerup_relay_limit"
#: A limited connection that ends this close to its duration ended at it.
_DURATION_SLACK = 2.0
#: Largest duration the wire's uint32 field holds.
_MAX_DURATION = 2**32 - 1
#: A relayed connection that may live less than this (seconds) is "tight" (see :attr:`Limit.tight`).
TIGHT_DURATION = 3600


@dataclass(frozen=True)
class Limit:
    """What a relay allows one relayed connection (circuit v2 ``Limit``); None = no limit."""

    relay: str
    #: Seconds the relay keeps the connection, from when it was made.
    duration: int | None
    #: Bytes the relay carries (go: each direction; js: both together).
    data: int | None
    #: The duration field as sent, when it was read as milliseconds (see :func:`limit_from`).
    sent_duration: int | None = None

    def describe(self) -> str:
        """``"128 KiB / 120 s"``."""
        data = "no data limit" if self.data is None else _size(self.data)
        duration = "no time limit" if self.duration is None else f"{self.duration} s"
        return f"{data} / {duration}"

    def unit_note(self) -> str:
        """`` (sent as 120000: ...)`` when the duration was read as milliseconds, else ""."""
        if self.sent_duration is None:
            return ""
        return f" (its duration field said {self.sent_duration}: milliseconds, as js-libp2p sends)"

    @property
    def limited(self) -> bool:
        return self.data is not None or self.duration is not None

    @property
    def tight(self) -> bool:
        """Good only for coordination and small traffic: a data cap, or less than ``TIGHT_DURATION``.

        A peerup relay's default 24 h cap is a limit, but not a tight one.
        """
        return self.data is not None or (self.duration is not None and self.duration < TIGHT_DURATION)


@dataclass
class _Usage:
    """A tagged relay stream: its limit, since when, the bytes each way, and how it ended."""

    limit: Limit
    peer: str
    started: float = field(default_factory=time.monotonic)
    sent: int = 0
    received: int = 0
    closed_locally: bool = False
    ended: bool = False

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def at_limit(self) -> str | None:
        """Which limit this connection reached, if any ("data" or "duration")."""
        limit = self.limit
        if limit.duration is not None and self.elapsed() >= limit.duration - _DURATION_SLACK:
            return "duration"
        # What we sent all reached the relay's count; of what the peer sent, some
        # was still in flight when the relay cut. js counts both directions together.
        if limit.data is not None and self.sent + self.received >= limit.data // 2:
            return "data"
        return None


def _size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:g} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


#: js-libp2p's relay (at least up to @libp2p/circuit-relay-v2 4.2.13, libp2p 3.3) puts
#: milliseconds in the seconds field: server/reservation-store.js:35 sends
#: ``defaultDurationLimit``, 2 * 60 * 1000 (constants.js:29), and utils.js:30 enforces it
#: with ``AbortSignal.timeout(duration)``, so its default 2 min arrives as 120000.
#: A duration of at least this many "seconds" (16 h 40 min) that is a whole multiple
#: of 1000 is read as milliseconds; go (120), rust (120) and peerup (86400 unless
#: configured) send seconds that do not look like that.
JS_MILLISECONDS_FROM = 60_000


def limit_from(message: Any, relay: str) -> Limit | None:
    """The :class:`Limit` of a HopMessage/StopMessage, or None if it carries none."""
    if not message.HasField("limit"):
        return None
    raw = message.limit
    duration = int(raw.duration) if raw.HasField("duration") and raw.duration else None
    data = int(raw.data) if raw.HasField("data") and raw.data else None
    if duration is not None and duration >= JS_MILLISECONDS_FROM and duration % 1000 == 0:
        return Limit(relay=relay, duration=duration // 1000, data=data, sent_duration=duration)
    return Limit(relay=relay, duration=duration, data=data)


# -- tagging the relay stream ------------------------------------------------------------------


def _remote(stream: Any) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except Exception:  # noqa: BLE001 - a stream without a connection: only for logs
        return "?"


def _tag(stream: Any, limit: Limit, peer: str) -> None:
    """Tag ``stream`` (about to carry a relayed connection) and count its bytes from now on."""
    usage = _Usage(limit, peer)
    setattr(stream, _TAG, usage)
    log.log(
        logging.INFO if limit.tight else logging.DEBUG,
        "relay %s limits the relayed connection with %s to %s%s",
        limit.relay,
        peer,
        limit.describe(),
        limit.unit_note(),
    )
    read: Callable[..., Awaitable[bytes]] = stream.read
    write: Callable[[bytes], Awaitable[None]] = stream.write
    close: Callable[[], Awaitable[None]] = stream.close
    reset: Callable[[], Awaitable[None]] = stream.reset

    async def counted_read(n: int | None = None) -> bytes:
        try:
            data = await read(n)
        except Exception as exc:  # a reset or an EOF from the relay (cancellation is ours: not counted)
            _ended(stream, usage, exc)
            raise
        usage.received += len(data)
        return data

    async def counted_write(data: bytes) -> None:
        try:
            await write(data)
        except Exception as exc:
            _ended(stream, usage, exc)
            raise
        usage.sent += len(data)

    async def local_close() -> None:
        usage.closed_locally = True
        await close()

    async def local_reset() -> None:
        usage.closed_locally = True
        await reset()

    stream.read, stream.write, stream.close, stream.reset = counted_read, counted_write, local_close, local_reset


def _ended(stream: Any, usage: _Usage, exc: Exception) -> None:
    """The relay stream failed to read or write: say so, once, if the relay cut it at its limit.

    Who ended it: we did (``closed_locally``: nothing to say); our connection to
    the relay died (the relay or the network went away: not a limit); the far
    peer closed (an EOF, forwarded by the relay); or the relay cut the circuit
    (a reset, or go's half-close at its data limit). The relay's count of the
    far side's bytes is not ours: js counts both directions together, and what
    was in flight when it cut never reached us. So a reset of a data-limited
    connection is taken as the data limit, and otherwise the bytes must be
    near the limit, or the time near the duration.
    """
    if usage.ended or usage.closed_locally:
        return
    usage.ended = True
    relay_conn = getattr(stream, "muxed_conn", None)
    shutting = getattr(relay_conn, "event_shutting_down", None)
    if shutting is not None and shutting.is_set():
        log.debug("relayed connection with %s ended with our connection to relay %s", usage.peer, usage.limit.relay)
        return
    reached = usage.at_limit()
    if reached is None and usage.limit.data is not None and not isinstance(exc, EOFError):
        reached = "data"
    if reached is None:
        log.debug("relayed connection with %s via %s ended before its limit", usage.peer, usage.limit.relay)
        return
    log.warning(
        "relay %s cut the relayed connection with %s at its %s limit (%s) after %.1f s, %s sent, %s received; "
        "tunnels on it are reset",
        usage.limit.relay,
        usage.peer,
        reached,
        usage.limit.describe(),
        usage.elapsed(),
        _size(usage.sent),
        _size(usage.received),
    )


_reservations: dict[str, Limit] = {}


def reservation_limit(relay: object) -> Limit | None:
    """The limit relay ``relay`` (peer ID) announced with our last reservation there, if any."""
    return _reservations.get(str(relay))


def _note_reservation(limit: Limit) -> None:
    if _reservations.get(limit.relay) != limit and limit.tight:
        log.info("relay %s limits each relayed connection to %s%s", limit.relay, limit.describe(), limit.unit_note())
    _reservations[limit.relay] = limit


def _on_message(stream: Any, message: Any) -> None:
    """Look at a relay message just read from ``stream``; tag the stream when a limit applies to it."""
    if isinstance(message, HopMessage) and message.type == HopMessage.STATUS:
        limit = limit_from(message, _remote(stream))
        if limit is None:
            return
        if message.HasField("reservation"):  # the RESERVE reply
            _note_reservation(limit)
        elif limit.limited and (not message.HasField("status") or int(message.status) == int(StatusCode.OK)):
            # The OK to our CONNECT: from here on the stream is the relayed connection.
            _tag(stream, limit, str(getattr(stream, "_peerup_circuit_peer", "?")))
    elif isinstance(message, StopMessage) and message.type == StopMessage.CONNECT:
        limit = limit_from(message, _remote(stream))
        if limit is not None and limit.limited:
            try:
                source = str(type(stream.muxed_conn.peer_id)(message.peer.id))
            except Exception:  # noqa: BLE001 - a malformed peer ID: upstream refuses it next
                source = "?"
            _tag(stream, limit, source)


# -- the process-wide wrappers (installed by patches.py) -------------------------------------------


# Module attributes set and read by name: the modules import them from .utils and
# do not re-export them (hence getattr/setattr, for mypy).
_upstream_read: Callable[[Any, Any], Awaitable[Any]] = getattr(relay_transport, "read_delimited_msg")  # noqa: B009
_upstream_write: Callable[[Any, Any], Awaitable[None]] = getattr(relay_transport, "write_delimited_msg")  # noqa: B009


async def read_delimited_msg(stream: Any, msg_cls: Any) -> Any:
    message = await _upstream_read(stream, msg_cls)
    try:
        _on_message(stream, message)
    except Exception as exc:  # noqa: BLE001 - bookkeeping must never break the relay protocol
        log.debug("could not read the relay limit: %s", exc)
    return message


async def write_delimited_msg(stream: Any, message: Any) -> None:
    if isinstance(message, HopMessage) and message.type == HopMessage.CONNECT:
        with contextlib.suppress(Exception):  # only for the log line
            stream._peerup_circuit_peer = type(stream.muxed_conn.peer_id)(message.peer.id)
    await _upstream_write(stream, message)


# -- finding a connection's limit -----------------------------------------------------------------

#: How one object of the connection stack holds the next (swarm connection -> yamux
#: session -> secure session -> Noise reader -> raw connection -> relay stream).
_LINKS = ("muxed_conn", "swarm_conn", "secured_conn", "conn", "read_writer", "read_write_closer", "_wrapped", "stream")
_MAX_DEPTH = 10


def _usage_of(thing: object) -> _Usage | None:
    seen: set[int] = set()
    level = [thing]
    for _ in range(_MAX_DEPTH):
        following: list[object] = []
        for obj in level:
            if obj is None or id(obj) in seen:
                continue
            seen.add(id(obj))
            usage = getattr(obj, _TAG, None)
            if isinstance(usage, _Usage):
                return usage
            following.extend(getattr(obj, name, None) for name in _LINKS)
        if not following:
            return None
        level = following
    return None


def connection_limit(conn: object) -> Limit | None:
    """The relay's limit on ``conn`` (a swarm connection, its muxer, or a stream on it); None if unlimited.

    A limited connection is good for coordination and small requests, not for
    tunnels: its relay cuts it at ``data`` bytes or ``duration`` seconds.
    """
    usage = _usage_of(conn)
    return usage.limit if usage is not None else None


def connection_usage(conn: object) -> tuple[int, int, float] | None:
    """(bytes sent, bytes received, seconds) on a limited relayed connection; None if not limited."""
    usage = _usage_of(conn)
    return None if usage is None else (usage.sent, usage.received, usage.elapsed())


# -- what peerup's relay enforces and advertises ---------------------------------------------------


def relay_limits(settings: Settings) -> RelayLimits:
    """``RelayLimits`` for peerup's relay whose advertised ``Limit`` follows the spec.

    ``data`` 0 means no cap (upstream's CONNECT handler gives the pump no budget
    then, protocol.py:762); ``duration`` is whole seconds, at least 1, at most
    what the uint32 field holds.
    """
    relay = settings.relay
    return RelayLimits(
        duration=min(_MAX_DURATION, max(1, math.ceil(relay.circuit_duration))),
        data=relay.circuit_data or 0,
        max_circuit_conns=relay.max_circuits_per_peer,
        max_reservations=relay.max_reservations,
        reservation_ttl=int(relay.reservation_ttl),
    )


__all__ = [
    "Limit",
    "connection_limit",
    "connection_usage",
    "limit_from",
    "read_delimited_msg",
    "relay_limits",
    "reservation_limit",
    "write_delimited_msg",
]
