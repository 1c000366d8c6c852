"""The transports a peerup host dials and listens with: TCP (default) and WebSocket (``ws``).

Why WebSocket: some networks let only web traffic out (hotel and guest Wi-Fi,
corporate firewalls). A relay that listens on a ``/ws`` port as well as on
TCP (``relay.listen = ["/ip4/0.0.0.0/tcp/7777", "/ip4/0.0.0.0/tcp/7778/ws"]``)
is reachable from there by nodes with ``transports = ["tcp", "ws"]``; the
bytes inside are the same Noise + yamux connection as over TCP.

How a WebSocket connection reaches the rest of peerup (read from py-libp2p
0.8.1, checked by tests/test_websocket.py):

* **Upgrader.** ``WebsocketTransport`` only produces raw connections; the swarm
  upgrades them (Noise, then the muxer) with ``swarm.upgrader`` for dials
  (network/swarm.py:1094-1130) and through its inbound handler for accepted
  ones. The transport built here is given that same upgrader object, so
  :func:`peerup.plugins.libp2p.muxer.install` (which patches
  ``upgrader.muxer_multistream.new_conn``) gives WebSocket connections
  peerup's yamux session too.
* **Admission.** The WebSocket listener hands each accepted connection to the
  swarm's per-listener ``conn_handler`` (listener.py:380 -> swarm.py:1913-1916),
  which calls ``self._handle_inbound_connection`` *at call time*, i.e. the
  :class:`~peerup.plugins.libp2p.admission.InboundGate` installed on the
  instance. WebSocket peers are therefore counted, capped and deadlined like
  TCP peers, after the HTTP upgrade.
* Three faults met on the way, fixed here:

  1. ``P2PWebSocketConnection.get_remote_address`` is a stub returning None
     (connection.py:536-543): every WebSocket peer looked like source "?" to
     the admission gate, so ``limits.max_pending_per_ip`` counted all of them
     as one address (16 strangers in their handshake locked out every other
     WebSocket peer). It now returns the socket's peer address.
  2. The HTTP upgrade runs before the gate, under trio-websocket's default
     60 s ``connect_timeout`` (listener.py:241 passes none): a silent socket
     held a task for a minute. It is bounded by ``limits.handshake_timeout``.
  (Faults 1 and 2 are process-wide, installed by :mod:`.patches` as "websocket".)

  3. The dialing transport counts each dialed connection
     (transport.py:634-643, called at :731) and never uncounts it (``_untrack_connection`` has
     no caller): after ``max_connections`` (1000) dials over a node's life,
     every WebSocket dial failed with "Maximum connections reached", and each
     closed connection stayed referenced. :class:`PeerupWebsocketTransport`
     uncounts a connection when it closes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from libp2p.abc import IHost
from libp2p.transport.tcp.tcp import TCP
from libp2p.transport.websocket import listener as ws_listener
from libp2p.transport.websocket.connection import P2PWebSocketConnection
from libp2p.transport.websocket.transport import WebsocketConfig, WebsocketTransport

from peerup.core.errors import ConfigError

#: Every transport name ``settings.transports`` accepts.
KNOWN = ("tcp", "ws")

#: Seconds a WebSocket peer has for its HTTP upgrade before the gate sees it (fault 2);
#: set from ``limits.handshake_timeout`` by :func:`install` (one node per process in production).
_ws_bounds = {"connect_timeout": 5.0, "disconnect_timeout": 5.0}


def listen_shape(kinds: Sequence[str]) -> str | None:
    """The transport a listen address needs ("tcp" or "ws"), or None if peerup cannot listen on it."""
    if len(kinds) == 2 and kinds[0] in ("ip4", "ip6") and kinds[1] == "tcp":
        return "tcp"
    if len(kinds) == 3 and kinds[0] in ("ip4", "ip6") and kinds[1:] == ["tcp", "ws"]:
        return "ws"
    return None


def check_listen_addr(where: str, text: str, kinds: Sequence[str], transports: Sequence[str]) -> None:
    """One :class:`ConfigError` line when ``text`` is not an address this host can listen on.

    ``kinds`` are the multiaddr's protocol names. TCP is ``/ip4|ip6/ADDR/tcp/PORT``,
    WebSocket ``/ip4|ip6/ADDR/tcp/PORT/ws``; each needs its transport in
    ``transports``. (``/wss`` is not offered: it needs certificates, and a
    TLS-terminating reverse proxy in front of a ``/ws`` port does the same job.)
    """
    shape = listen_shape(list(kinds))
    if shape is None:
        raise ConfigError(
            f"{where}: cannot listen on {text!r}: expected a TCP address, /ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT"
            + (", or a WebSocket address, /ip4/ADDR/tcp/PORT/ws" if "ws" in transports else "")
        )
    if shape not in transports:
        what = "a WebSocket" if shape == "ws" else "a TCP"
        raise ConfigError(
            f"{where}: {text!r} is {what} address but transports = {list(transports)}: "
            f"add {shape!r} to transports, or remove the address"
        )


class PeerupWebsocketTransport(WebsocketTransport):
    """Upstream's WebSocket transport, minus the dial counter that never goes down (fault 3)."""

    async def _track_connection(self, conn: P2PWebSocketConnection) -> None:
        await super()._track_connection(conn)
        close: Callable[[], Awaitable[None]] = conn.close

        async def close_and_forget() -> None:
            try:
                await close()
            finally:
                self._forget(conn)

        conn.close = close_and_forget  # type: ignore[method-assign]

    def _forget(self, conn: P2PWebSocketConnection) -> None:
        # Synchronous on purpose: a close that is being cancelled must still uncount.
        if self._connections.pop(str(id(conn)), None) is not None:
            self._current_connections -= 1


def ws_remote_address(self: P2PWebSocketConnection) -> tuple[str, int] | None:
    """(fault 1) The peer's IP and port, from trio-websocket's connection."""
    remote = getattr(self._ws_connection, "remote", None)
    address = getattr(remote, "address", None)
    port = getattr(remote, "port", None)
    if address is None or port is None:
        return None
    return str(address), int(port)


#: trio-websocket's server as listener.py calls it (imported by name, so replaced by name).
_upstream_serve_websocket: Callable[..., Awaitable[Any]] = getattr(ws_listener, "serve_websocket")  # noqa: B009


async def serve_websocket_bounded(*args: Any, **kwargs: Any) -> Any:
    """(fault 2) trio-websocket's server with the handshake and close bounded."""
    for name, value in _ws_bounds.items():
        kwargs.setdefault(name, value)
    return await _upstream_serve_websocket(*args, **kwargs)


def install(host: IHost, transports: Sequence[str], handshake_timeout: float = 5.0, uncount: bool = True) -> None:
    """Give ``host`` exactly the transports named (``"tcp"``, ``"ws"``); call before ``host.run``.

    ``new_host`` builds a TCP transport and the swarm's upgrader; the WebSocket
    transport is added to the same swarm with that upgrader (see the module
    docstring), and TCP is removed when it is not wanted (a ws-only node must
    not spend its dial budget on TCP addresses its network drops).
    ``uncount`` False gives upstream's transport (fault 3 kept: patches.py, "websocket-uncount").
    """
    unknown = [name for name in transports if name not in KNOWN]
    if unknown:
        raise ConfigError(f"transports: unknown {unknown}: expected some of {list(KNOWN)}")
    swarm: Any = host.get_network()
    manager = swarm.transport_manager
    if "ws" in transports and not any(isinstance(t, WebsocketTransport) for t in manager.get_transports()):
        _ws_bounds["connect_timeout"] = _ws_bounds["disconnect_timeout"] = handshake_timeout
        kind = PeerupWebsocketTransport if uncount else WebsocketTransport
        ws = kind(swarm.upgrader, WebsocketConfig(handshake_timeout=handshake_timeout))
        with contextlib.suppress(Exception):  # only AutoTLS reads it
            ws.set_peer_id(host.get_id())
        manager.add_transport(ws)
    if "tcp" not in transports:
        manager._transports = [t for t in manager.get_transports() if not isinstance(t, TCP)]


def transport_names(host: IHost) -> list[str]:
    """The transports ``host`` has, as settings name them (for logs and tests)."""
    names = []
    for transport in host.get_network().transport_manager.get_transports():  # type: ignore[attr-defined]
        if isinstance(transport, WebsocketTransport):
            names.append("ws")
        elif isinstance(transport, TCP):
            names.append("tcp")
    return names


__all__ = [
    "KNOWN",
    "PeerupWebsocketTransport",
    "check_listen_addr",
    "install",
    "listen_shape",
    "serve_websocket_bounded",
    "transport_names",
    "ws_remote_address",
]
