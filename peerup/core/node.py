"""What the core needs from a transport: a node that can open and accept streams.

The core only speaks anyio byte streams. A transport plugin (the built-in one is
libp2p) adapts its own streams to :class:`anyio.abc.ByteStream`, including
``send_eof`` for half-close, and exposes the facts below through anyio's typed
attributes so logs and ``peerup ping`` can say which path a stream took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from anyio import TypedAttributeSet, typed_attribute
from anyio.abc import ByteStream

#: Called for every inbound stream; ``remote_peer`` is the authenticated peer ID.
StreamHandler = Callable[[ByteStream, str], Awaitable[None]]


class PeerAttribute(TypedAttributeSet):
    """Typed attributes a transport stream offers via ``stream.extra(...)``."""

    #: Peer ID at the other end, authenticated by the transport's handshake.
    remote_peer: str = typed_attribute()
    #: ``"direct"`` or ``"relayed"``.
    path: str = typed_attribute()
    #: The address the underlying connection uses, in the transport's notation.
    remote_address: str = typed_attribute()
    #: Ends the stream as a failure the far end sees as one (a reset), never as a
    #: clean end; :func:`peerup.core.streams.abort` uses it when present.
    abort: Callable[[], Awaitable[None]] = typed_attribute()


@dataclass(frozen=True)
class PeerRecord:
    """What discovery learned about a peer: enough for ``dial`` to reach it.

    ``source`` says where the answer came from (``connected``, ``peerstore``,
    ``dht``, ``relay``, ``static`` ...) so logs can explain a slow first connect.
    """

    peer_id: str
    addrs: tuple[str, ...] = ()
    source: str = "unknown"
    connected: bool = False
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@runtime_checkable
class Node(Protocol):
    """A running transport endpoint, created by the ``open_node`` hook."""

    @property
    def peer_id(self) -> str:
        """This node's own peer ID."""

    def listen_addrs(self) -> list[str]:
        """Addresses others can dial, in the order this node advertises them."""

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Route inbound streams for ``protocol`` to ``handler``."""

    def parse_peer_id(self, text: str) -> str:
        """Validate and normalise a peer ID, raising ``ValueError`` on garbage."""


@dataclass(frozen=True)
class RelaySlot:
    """A relay this node keeps a reservation on (``peerup status``)."""

    addr: str
    reserved: bool
    #: Unix time the reservation expires; ``None`` when not reserved.
    expires: float | None


@dataclass(frozen=True)
class PeerConnection:
    """One open connection to a peer (``peerup peers``)."""

    peer_id: str
    path: str
    address: str
    #: Unix time the connection opened, when the transport saw it open.
    since: float | None
    #: Round trip of a ping on this very connection, in seconds; ``None``: no answer in time.
    rtt: float | None


@runtime_checkable
class Introspectable(Protocol):
    """What ``peerup status`` and ``peers`` ask a node; optional, so a transport may leave it out."""

    def relay_slots(self) -> list[RelaySlot]:
        """Each configured relay and whether this node holds a slot on it."""

    def reachability(self) -> str:
        """``public``, ``nated`` or ``unknown``: can peers dial this node directly?"""

    async def wait_relay_slot(self) -> None:
        """Return once a slot is held on some relay (at once when none is configured)."""

    async def connections(self, rtt_timeout: float) -> list[PeerConnection]:
        """Open connections, each measured with one ping of at most ``rtt_timeout`` seconds."""


@dataclass(frozen=True)
class Sample:
    """One number a transport reports for the metrics endpoint (relay circuits, hole punches)."""

    name: str
    help: str
    kind: Literal["gauge", "counter"]
    labels: dict[str, str]
    value: float


@runtime_checkable
class Measured(Protocol):
    """A node that reports its own transport-level numbers; optional."""

    def samples(self) -> list[Sample]:
        """Current values; counters count since the node started."""
