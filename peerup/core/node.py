"""What the core needs from a transport: a node that can open and accept streams.

The core only speaks anyio byte streams. A transport plugin (the built-in one is
libp2p) adapts its own streams to :class:`anyio.abc.ByteStream`, including
``send_eof`` for half-close, and exposes the facts below through anyio's typed
attributes so logs and ``peerup ping`` can say which path a stream took.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

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
