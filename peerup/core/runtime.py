"""One process's node and what it does with it: the facade the CLI, the daemon and tests use.

The work lives in modules named for it: :mod:`peerup.core.client` (reaching a
peer's service, ping, local listeners), :mod:`peerup.core.serving` (who may
use what, the local dial), :mod:`peerup.core.carrier` (the byte copy and the
drain count). ``Runtime`` builds them around one settings object and one
plugin host, starts the node through the ``open_node`` hook, and forwards.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteStream, TaskStatus
from anyio.streams.buffered import BufferedByteStream

from peerup.core.carrier import Carrier
from peerup.core.client import Client
from peerup.core.errors import PluginError
from peerup.core.names import short
from peerup.core.node import Node, PeerRecord
from peerup.core.ping import PING_PROTOCOL, PingStats, answer_ping
from peerup.core.plugins import PluginHost
from peerup.core.retry import RetryPolicy
from peerup.core.serving import Server
from peerup.core.settings import ProxySettings, ServiceSettings, Settings
from peerup.core.tunnels import Forward, TunnelRegistry

__all__ = ["PingStats", "Runtime", "short", "stop_on_signals"]

log = logging.getLogger("peerup.runtime")


class Runtime:
    """One process's node plus what it serves and proxies."""

    def __init__(self, settings: Settings, plugins: PluginHost) -> None:
        self.settings = settings
        self.plugins = plugins
        plugins.check_settings(settings)
        plugins.configure(settings)
        self.carrier = Carrier(settings, plugins)
        self.client = Client(settings, plugins, self.carrier)
        self.server = Server(settings, plugins, self.carrier)

    @property
    def registry(self) -> TunnelRegistry:
        """Open forwards and connections, with byte counters (``peerup tunnels``, metrics)."""
        return self.carrier.registry

    @asynccontextmanager
    async def node(self, role: str = "node") -> AsyncIterator[Node]:
        manager = self.plugins.open_node(self.settings, role, self.retry_policy(None))
        if manager is None:
            raise PluginError("no active plugin provides a transport (open_node); is the built-in 'libp2p' disabled?")
        async with manager as node:
            node.set_stream_handler(PING_PROTOCOL, answer_ping)
            yield node

    # -- the client side -------------------------------------------------------

    def peer_id(self, node: Node, text: str) -> str:
        """A friendly name or a peer ID, validated; bad input is one line."""
        return self.client.peer_id(node, text)

    def retry_policy(self, service: ServiceSettings | None, service_name: str | None = None) -> RetryPolicy:
        return self.client.retry_policy(service, service_name)

    async def connect_to_peer(self, node: Node, peer_id: str) -> PeerRecord:
        return await self.client.connect_to_peer(node, peer_id)

    async def open_stream(self, node: Node, peer_id: str, protocol: str) -> tuple[ByteStream, PeerRecord]:
        return await self.client.open_stream(node, peer_id, protocol)

    async def open_service_stream(
        self, node: Node, peer: str, service: str, timeout: float | None = None
    ) -> BufferedByteStream:
        return await self.client.open_service_stream(node, peer, service, timeout)

    async def ping(
        self,
        node: Node,
        peer: str,
        count: int,
        interval: float,
        on_reply: Callable[[int, float | None, str], None] = lambda seq, rtt, path: None,
    ) -> PingStats:
        return await self.client.ping(node, peer, count, interval, on_reply)

    async def serve_proxy(
        self,
        node: Node,
        proxy: ProxySettings,
        tunnels: anyio.abc.TaskGroup,
        *,
        forward: Forward | None = None,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.client.serve_proxy(node, proxy, tunnels, forward=forward, task_status=task_status)

    # -- the serving side ------------------------------------------------------

    def expose(self, node: Node, services: dict[str, ServiceSettings]) -> None:
        self.server.expose(node, services)

    def update_services(self, node: Node, services: dict[str, ServiceSettings]) -> int:
        return self.server.update_services(node, services)

    def revoke(self) -> int:
        return self.server.revoke()

    def reauthorize(self) -> int:
        return self.server.reauthorize()

    async def watch_authorized_keys(self, interval: float = 2.0) -> None:
        await self.server.watch_authorized_keys(interval)

    # -- both ------------------------------------------------------------------

    @property
    def open_tunnels(self) -> int:
        return self.carrier.open_tunnels

    async def drain(self, timeout: float) -> bool:
        return await self.carrier.drain(timeout)

    async def carry(self, local: ByteStream, remote: ByteStream, service: ServiceSettings | None) -> None:
        await self.carrier.carry(local, remote, service)


@asynccontextmanager
async def stop_on_signals(scope: anyio.CancelScope) -> AsyncIterator[None]:
    """SIGINT/SIGTERM cancel ``scope``: a clean, bounded shutdown instead of a traceback."""

    async def watch() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.warning("received %s: shutting down (send it again to stop at once)", signal.Signals(signum).name)
                scope.cancel()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
