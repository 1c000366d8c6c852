"""What is open right now, for ``peerup tunnels``, ``disconnect`` and the metrics.

Two kinds of entry: a *forward* (a local port carried to a peer's service, from
``[tunnels]`` or ``peerup connect``) and a *connection*, ``outbound`` (one TCP
connection accepted by a forward) or ``inbound`` (a peer using one of this
node's services). Each holds a cancel scope, so ``disconnect ID``
ends it the way revocation does (a reset, never a clean end: ADR 0008), and
byte counters fed by :class:`CountingStream`, which wraps the local side of a
tunnel: the one place both directions pass whichever proxy plugin copies them.

The registry also counts what happened (opened, failed by reason, dials by path,
auth decisions) so the metrics endpoint reads one object instead of hooking
into every branch of the runtime.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from anyio.abc import ByteStream

Kind = Literal["outbound", "inbound"]

#: The connection the current task carries; :meth:`TunnelRegistry.counted` wraps its local stream.
_CURRENT: ContextVar[Connection | None] = ContextVar("peerup_tunnel", default=None)


@dataclass
class Bytes:
    """Bytes each way: ``up`` leaves the local side toward the peer, ``down`` arrives from it."""

    up: int = 0
    down: int = 0


@dataclass
class Connection:
    """One open TCP connection carried over one peer stream."""

    id: str
    kind: Kind
    service: str
    peer: str
    scope: anyio.CancelScope
    opened: float = field(default_factory=time.time)
    bytes: Bytes = field(default_factory=Bytes)
    forward: Forward | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "service": self.service,
            "peer": self.peer,
            "forward": self.forward.id if self.forward is not None else None,
            "bytes_up": self.bytes.up,
            "bytes_down": self.bytes.down,
            "opened": self.opened,
            "age": round(time.time() - self.opened, 3),
        }


@dataclass
class Forward:
    """A listening local port whose connections go to ``service`` on ``peer``."""

    id: str
    peer: str
    service: str
    bind: str
    port: int
    persistent: bool
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    #: Cancelled first on shutdown: no new connections, open ones drain.
    listener: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    opened: float = field(default_factory=time.time)
    bytes: Bytes = field(default_factory=Bytes)
    connections: int = 0
    total: int = 0
    #: Set once its listener and connections are gone (a changed tunnel reopens its port after).
    done: anyio.Event = field(default_factory=anyio.Event)

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": "forward",
            "service": self.service,
            "peer": self.peer,
            "bind": self.bind,
            "port": self.port,
            "persistent": self.persistent,
            "connections": self.connections,
            "connections_total": self.total,
            "bytes_up": self.bytes.up,
            "bytes_down": self.bytes.down,
            "opened": self.opened,
            "age": round(time.time() - self.opened, 3),
        }


class CountingStream(ByteStream):
    """``inner`` with every byte counted into ``counters``; typed attributes pass through."""

    def __init__(self, inner: ByteStream, counters: list[Bytes]) -> None:
        self.inner = inner
        self._counters = counters

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self.inner.receive(max_bytes)
        for counter in self._counters:
            counter.up += len(data)
        return data

    async def send(self, item: bytes) -> None:
        await self.inner.send(item)
        for counter in self._counters:
            counter.down += len(item)

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return self.inner.extra_attributes


@dataclass
class Events:
    """Cumulative counts since start, by label; the metrics endpoint exports them as counters."""

    opened: Counter[tuple[str, str]] = field(default_factory=Counter)  # (service, kind)
    failed: Counter[tuple[str, str]] = field(default_factory=Counter)  # (service, reason)
    bytes_up: Counter[tuple[str, str]] = field(default_factory=Counter)  # (service, kind)
    bytes_down: Counter[tuple[str, str]] = field(default_factory=Counter)
    dials: Counter[tuple[str, str]] = field(default_factory=Counter)  # (path, result)
    auth: Counter[str] = field(default_factory=Counter)  # allowed / denied


class TunnelRegistry:
    """Forwards and open connections by ID; IDs are never reused within a process."""

    def __init__(self) -> None:
        self.forwards: dict[str, Forward] = {}
        self.connections: dict[str, Connection] = {}
        self.events = Events()
        self._ids = itertools.count(1)
        #: Called with (connection, seconds) as each connection ends (the duration histogram).
        self.on_close: list[Callable[[Connection, float], None]] = []

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids)}"

    def add_forward(self, forward: Forward) -> Forward:
        if forward.id in self.forwards:
            raise ValueError(f"a tunnel with ID {forward.id!r} is already open")
        self.forwards[forward.id] = forward
        return forward

    def remove_forward(self, forward_id: str) -> None:
        self.forwards.pop(forward_id, None)

    @contextmanager
    def open(self, kind: Kind, service: str, peer: str, forward: Forward | None = None) -> Iterator[Connection]:
        """Register a connection for the duration of the block; its scope ends it on ``disconnect``."""
        conn_id = self.new_id("out" if kind == "outbound" else "in")
        conn = Connection(conn_id, kind, service, peer, anyio.CancelScope(), forward=forward)
        self.connections[conn.id] = conn
        self.events.opened[(service, kind)] += 1
        if forward is not None:
            forward.connections += 1
            forward.total += 1
        token = _CURRENT.set(conn)
        started = anyio.current_time()
        try:
            with conn.scope:
                yield conn
        finally:
            _CURRENT.reset(token)
            del self.connections[conn.id]
            if forward is not None:
                forward.connections -= 1
            self.events.bytes_up[(service, kind)] += conn.bytes.up
            self.events.bytes_down[(service, kind)] += conn.bytes.down
            for callback in self.on_close:
                callback(conn, anyio.current_time() - started)

    def counted(self, local: ByteStream) -> ByteStream:
        """``local`` counting into the current task's connection (and its forward), if any."""
        conn = _CURRENT.get()
        if conn is None:
            return local
        counters = [conn.bytes] if conn.forward is None else [conn.bytes, conn.forward.bytes]
        return CountingStream(local, counters)

    def live_bytes(self) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
        """Bytes so far by (service, kind): finished connections plus those still open."""
        up, down = Counter(self.events.bytes_up), Counter(self.events.bytes_down)
        for conn in self.connections.values():
            up[(conn.service, conn.kind)] += conn.bytes.up
            down[(conn.service, conn.kind)] += conn.bytes.down
        return up, down

    def close(self, entry_id: str) -> bool:
        """End a forward (its listener and connections) or one connection; ``False`` if unknown."""
        if entry_id in self.forwards:
            self.forwards[entry_id].scope.cancel()
            return True
        if entry_id in self.connections:
            self.connections[entry_id].scope.cancel()
            return True
        return False

    def failed(self, service: str, reason: str) -> None:
        self.events.failed[(service, reason)] += 1

    def dialed(self, path: str, result: str) -> None:
        self.events.dials[(path, result)] += 1

    def decided(self, allowed: bool) -> None:
        self.events.auth["allowed" if allowed else "denied"] += 1

    def as_json(self) -> list[dict[str, Any]]:
        return [f.as_json() for f in self.forwards.values()] + [c.as_json() for c in self.connections.values()]
