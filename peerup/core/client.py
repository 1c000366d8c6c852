"""The client side: from a peer's name to an open service stream, and ``peerup proxy``'s listener.

Each arrow of the data path is a hook, called here in order and under the
core's timeouts (httpcore's way: plugins take no timeout argument)::

    peer name -> resolve_name -> discover_peer -> dial (under retry_policy) -> status line -> proxy_stream
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from functools import partial

import anyio
from anyio.abc import ByteStream, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteStream

from peerup.core import names, wire
from peerup.core.carrier import Carrier
from peerup.core.errors import (
    ConfigError,
    PeerNotFound,
    PeerTimeout,
    PeerUnreachable,
    PeerupError,
    PluginError,
    ProtocolNotSupported,
    ServiceError,
)
from peerup.core.names import short
from peerup.core.node import Node, PeerAttribute, PeerRecord
from peerup.core.ping import PING_PROTOCOL, PING_SIZE, PingStats
from peerup.core.plugins import PluginHost
from peerup.core.retry import RetryPolicy, call_with_retry
from peerup.core.settings import ProxySettings, ServiceSettings, Settings, service_protocol
from peerup.core.streams import abort
from peerup.core.tunnels import Forward

log = logging.getLogger("peerup.runtime")


class Client:
    """Reaches peers' services: discovery, dialing, retries, the status line, ping, local listeners."""

    def __init__(self, settings: Settings, plugins: PluginHost, carrier: Carrier) -> None:
        self.settings = settings
        self.plugins = plugins
        self._carrier = carrier
        self._connecting: dict[str, anyio.Lock] = {}

    def peer_id(self, node: Node, text: str) -> str:
        """A friendly name or a peer ID, validated; bad input is one line."""
        return names.peer_id(self.plugins, self.settings, text)

    async def connect_to_peer(self, node: Node, peer_id: str) -> PeerRecord:
        """The seed's ConnectToPeer: discovery before every proxy connection and ping."""
        record = await self.plugins.discover_peer(node, peer_id, self.settings)
        if record is None:
            raise PeerNotFound(
                f"peer {short(peer_id)} not found: no discovery plugin knows it (is it running with the same relay?)"
            )
        log.debug("peer %s found via %s: %s", short(peer_id), record.source, ", ".join(record.addrs) or "-")
        return record

    async def open_stream(self, node: Node, peer_id: str, protocol: str) -> tuple[ByteStream, PeerRecord]:
        """Discover, then open a stream; one connection attempt per peer at a time.

        When many local connections arrive for a peer that is not connected yet
        (a browser opening 50 sockets, a benchmark opening 1000), the first one
        discovers and connects while the others wait, then they all reuse its
        connection instead of each running a lookup and a dial of its own.
        """
        async with self._connecting.setdefault(peer_id, anyio.Lock()):
            # Held only while not connected: once a connection exists, discovery
            # answers at once ("connected") and streams open outside the lock.
            record = await self.connect_to_peer(node, peer_id)
            if not record.connected:
                return await self._open(node, record, protocol), record
        return await self._open(node, record, protocol), record

    async def _open(self, node: Node, record: PeerRecord, protocol: str) -> ByteStream:
        stream = await self.plugins.dial(node, record, protocol, self.settings)
        if stream is None:
            raise PeerUnreachable(f"peer {short(record.peer_id)}: no active plugin can dial it")
        return stream

    def retry_policy(self, service: ServiceSettings | None, service_name: str | None = None) -> RetryPolicy:
        policy = self.plugins.retry_policy(self.settings, service, service_name)
        if policy is None:
            raise PluginError("no active plugin provides a retry_policy; is the built-in 'backoff' disabled?")
        return policy

    async def open_service_stream(
        self, node: Node, peer: str, service: str, timeout: float | None = None
    ) -> BufferedByteStream:
        """Discover, dial and hear ``OK`` from the serving node, under the retry policy.

        ``timeout`` bounds each attempt (a proxy's ``service_stream_timeout``);
        ``timeouts.service_stream`` when not given.
        """
        peer_id = self.peer_id(node, peer)
        protocol = service_protocol(service)
        timeout = timeout if timeout is not None else self.settings.timeouts.service_stream

        async def attempt() -> BufferedByteStream:
            try:
                with anyio.fail_after(timeout):
                    try:
                        stream, _ = await self.open_stream(node, peer_id, protocol)
                    except ProtocolNotSupported as exc:
                        raise ServiceError(
                            "unknown-service", f"peer {short(peer_id)} does not expose a service named {service!r}"
                        ) from exc
                    try:
                        return await wire.read_status(stream, service)
                    except BaseException:
                        await anyio.aclose_forcefully(stream)
                        raise
            except TimeoutError:
                raise PeerTimeout(f"peer {short(peer_id)}: no answer for {service!r} within {timeout:g} s") from None

        policy = self.retry_policy(None, service_name=service)
        return await call_with_retry(policy, attempt, f"{service} on {short(peer_id)}")

    async def ping(
        self,
        node: Node,
        peer: str,
        count: int,
        interval: float,
        on_reply: Callable[[int, float | None, str], None] = lambda seq, rtt, path: None,
    ) -> PingStats:
        """Round trips after discovery, as ``ping`` reports them, each on the path it took.

        Each echo goes on a new stream (over the existing connection, so only the
        first pays for discovery and dialing), and the stream is opened before
        the clock starts: the RTT is the echo's alone, and the path reported is
        the one the node would give a new tunnel at that moment, so an upgrade
        from relayed to direct shows up as it happens.
        """
        peer_id = self.peer_id(node, peer)
        timeout = self.settings.service_stream_timeout(None)
        stats: PingStats | None = None

        async def reach() -> tuple[ByteStream, PeerRecord]:
            try:
                with anyio.fail_after(timeout):
                    return await self.open_stream(node, peer_id, PING_PROTOCOL)
            except TimeoutError:
                raise PeerTimeout(f"peer {short(peer_id)}: timed out after {timeout:g} s") from None
            except ProtocolNotSupported as exc:
                raise PeerUnreachable(f"peer {short(peer_id)} does not answer peerup pings: {exc}") from exc

        for seq in range(count):
            if seq:
                await anyio.sleep(interval)
            try:
                if stats is None:  # reaching the peer at all goes under the retry policy, as a tunnel's does
                    raw, record = await call_with_retry(self.retry_policy(None), reach, f"ping {short(peer_id)}")
                else:
                    raw, record = await reach()
            except (PeerTimeout, PeerNotFound, PeerUnreachable):
                if stats is None:  # the first one decides whether there is anyone to ping at all
                    raise
                stats.rtts.append(None)  # later ones are a lost reply
                on_reply(seq, None, stats.path)
                continue
            path = raw.extra(PeerAttribute.path, "unknown")
            if stats is None:
                stats = PingStats(peer_id, path, record.source)
            stats.paths.append(path)
            rtt: float | None = None
            async with BufferedByteStream(raw) as stream:
                payload = os.urandom(PING_SIZE)
                with anyio.move_on_after(max(interval, 1.0) * 5):
                    started = anyio.current_time()
                    await stream.send(payload)
                    if await stream.receive_exactly(PING_SIZE) != payload:
                        raise PeerupError(f"peer {short(peer_id)} echoed different bytes: the stream is corrupt")
                    rtt = anyio.current_time() - started
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    await stream.send_eof()
            stats.rtts.append(rtt)
            on_reply(seq, rtt, path)
        assert stats is not None  # count >= 1 and the first dial either worked or raised
        return stats

    async def serve_proxy(
        self,
        node: Node,
        proxy: ProxySettings,
        tunnels: anyio.abc.TaskGroup,
        *,
        forward: Forward | None = None,
        task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``bind:port``; each connection becomes a tunnel in ``tunnels``.

        Tunnels live in the caller's task group so that cancelling this
        listener (shutdown) stops new connections but lets open ones drain.
        """
        self.peer_id(node, proxy.peer)  # a bad peer is a startup error, not a per-connection one
        try:
            listener = await anyio.create_tcp_listener(local_host=proxy.bind, local_port=proxy.port)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {proxy.bind}:{proxy.port}: {exc.strerror or exc} (choose another port, or 0 for any)"
            ) from exc
        async with listener:
            port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
            task_status.started(port)
            await listener.serve(partial(self._proxy_connection, node, proxy, forward=forward), task_group=tunnels)

    async def _proxy_connection(
        self, node: Node, proxy: ProxySettings, local: SocketStream, forward: Forward | None = None
    ) -> None:
        with self._carrier.tunnel(), self._carrier.registry.open("outbound", proxy.service, proxy.peer, forward):
            address = local.extra(anyio.abc.SocketAttribute.remote_address)
            client = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            try:
                remote = await self.open_service_stream(node, proxy.peer, proxy.service, proxy.service_stream_timeout)
            except PeerupError as exc:
                # A reset, like a refused TCP connection: an application that reads
                # until EOF must not mistake "no tunnel" for "an empty answer".
                log.error("%s", exc)
                self._carrier.registry.dialed("none", "failed")
                self._carrier.registry.failed(proxy.service, getattr(exc, "code", type(exc).__name__))
                await abort(local)
                return
            except BaseException:
                await abort(local)
                raise
            path = remote.extra(PeerAttribute.path, "unknown")
            log.info("connection from %s -> %s on %s: %s path", client, proxy.service, proxy.peer, path)
            self._carrier.registry.dialed(path, "ok")
            await self._carrier.carry(local, remote, None)
