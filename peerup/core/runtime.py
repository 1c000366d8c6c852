"""The data path, one hook per arrow::

    peer name -> discover_peer -> dial (under retry_policy) -> status line -> proxy_stream <-> TCP

Timeouts are applied here, around the hooks (httpcore's way): a plugin never
takes a timeout argument, the core scopes each step with ``anyio.fail_after``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial

import anyio
from anyio.abc import ByteStream, SocketStream, TaskStatus
from anyio.streams.buffered import BufferedByteStream

from peerup.core import wire
from peerup.core.auth import AuthorizedKeys
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
from peerup.core.logs import OncePer
from peerup.core.node import Node, PeerAttribute, PeerRecord
from peerup.core.plugins import PluginHost
from peerup.core.retry import RetryPolicy, call_with_retry
from peerup.core.settings import ProxySettings, ServiceSettings, Settings, service_protocol
from peerup.core.streams import abort

log = logging.getLogger("peerup.runtime")

#: Echo protocol every peerup node answers; ``peerup ping`` measures round trips on it.
PING_PROTOCOL = "/peerup/ping/1.0.0"
PING_SIZE = 32


def short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


@dataclass
class PingStats:
    peer_id: str
    first_path: str
    source: str
    rtts: list[float | None] = field(default_factory=list)
    #: The path of each stream that was opened, in order.
    paths: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The path the last reply took (the one a new tunnel gets now)."""
        return self.paths[-1] if self.paths else self.first_path

    @property
    def received(self) -> list[float]:
        return [rtt for rtt in self.rtts if rtt is not None]

    def summary(self) -> str:
        sent, got = len(self.rtts), len(self.received)
        loss = 100.0 * (sent - got) / sent if sent else 0.0
        line = f"{sent} sent, {got} received, {loss:.0f}% loss"
        if got:
            ms = [rtt * 1000 for rtt in self.received]
            dev = statistics.pstdev(ms)
            line += f", rtt min/avg/max/mdev = {min(ms):.2f}/{statistics.fmean(ms):.2f}/{max(ms):.2f}/{dev:.2f} ms"
        return line


class Runtime:
    """One process's node plus what it serves and proxies."""

    def __init__(self, settings: Settings, plugins: PluginHost) -> None:
        self.settings = settings
        self.plugins = plugins
        plugins.call_all("configure", settings=settings)
        self._authorized_keys: AuthorizedKeys | None = None
        self._service_allow: dict[str, frozenset[str]] = {}
        self._streams_of: Counter[str] = Counter()
        self._connecting: dict[str, anyio.Lock] = {}
        #: Open tunnels served to each peer, so revoking a peer can close them.
        self._serving: dict[str, list[tuple[ServiceSettings, anyio.CancelScope]]] = {}
        self._refusals = OncePer(log)
        self._open_tunnels = 0
        self._idle = anyio.Event()
        self._idle.set()

    # -- node lifecycle --------------------------------------------------------

    @asynccontextmanager
    async def node(self, role: str = "node") -> AsyncIterator[Node]:
        manager = self.plugins.call_first(
            "open_node", settings=self.settings, role=role, retry_policy=self.retry_policy(None)
        )
        if manager is None:
            raise PluginError("no active plugin provides a transport (open_node); is the built-in 'libp2p' disabled?")
        async with manager as node:
            node.set_stream_handler(PING_PROTOCOL, self._answer_ping)
            yield node

    # -- finding and reaching a peer ------------------------------------------

    def peer_id(self, node: Node, text: str) -> str:
        """A friendly name or a peer ID, validated; bad input is one line."""
        return self.settings.peer_id(text, node.parse_peer_id)

    async def connect_to_peer(self, node: Node, peer_id: str) -> PeerRecord:
        """The seed's ConnectToPeer: discovery before every proxy connection and ping."""
        record: PeerRecord | None = await self.plugins.acall_first(
            "discover_peer", node=node, peer_id=peer_id, settings=self.settings
        )
        if record is None:
            raise PeerNotFound(
                f"peer {short(peer_id)} not found: no discovery plugin knows it (is it running with the same relay?)"
            )
        log.debug("peer %s found via %s: %s", short(peer_id), record.source, ", ".join(record.addrs) or "-")
        return record

    async def _dial(self, node: Node, peer_id: str, protocol: str) -> tuple[ByteStream, PeerRecord]:
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
        stream: ByteStream | None = await self.plugins.acall_first(
            "dial", node=node, peer=record, protocol=protocol, settings=self.settings
        )
        if stream is None:
            raise PeerUnreachable(f"peer {short(record.peer_id)}: no active plugin can dial it")
        return stream

    def retry_policy(self, service: ServiceSettings | None) -> RetryPolicy:
        policy: RetryPolicy | None = self.plugins.call_first("retry_policy", settings=self.settings, service=service)
        if policy is None:
            raise PluginError("no active plugin provides a retry_policy; is the built-in 'backoff' disabled?")
        return policy

    async def open_service_stream(self, node: Node, peer: str, service: str) -> BufferedByteStream:
        """Discover, dial and hear ``OK`` from the serving node, under the retry policy."""
        peer_id = self.peer_id(node, peer)
        protocol = service_protocol(service)
        timeout = self.settings.service_stream_timeout(None)

        async def attempt() -> BufferedByteStream:
            try:
                with anyio.fail_after(timeout):
                    try:
                        stream, _ = await self._dial(node, peer_id, protocol)
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

        return await call_with_retry(self.retry_policy(None), attempt, f"{service} on {short(peer_id)}")

    # -- ping ------------------------------------------------------------------

    async def _answer_ping(self, stream: ByteStream, remote_peer: str) -> None:
        async with stream:
            try:
                while True:
                    await stream.send(await stream.receive(PING_SIZE))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass

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
        for seq in range(count):
            if seq:
                await anyio.sleep(interval)
            try:
                with anyio.fail_after(timeout):
                    raw, record = await self._dial(node, peer_id, PING_PROTOCOL)
            except ProtocolNotSupported as exc:
                raise PeerUnreachable(f"peer {short(peer_id)} does not answer peerup pings: {exc}") from exc
            except (TimeoutError, PeerNotFound, PeerUnreachable) as exc:
                if stats is None:  # the first one decides whether there is anyone to ping at all
                    if isinstance(exc, TimeoutError):
                        raise PeerTimeout(f"peer {short(peer_id)}: timed out after {timeout:g} s") from None
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

    # -- serving ---------------------------------------------------------------

    @contextmanager
    def _tunnel(self) -> Iterator[None]:
        self._open_tunnels += 1
        self._idle = anyio.Event() if self._open_tunnels == 1 else self._idle
        try:
            yield
        finally:
            self._open_tunnels -= 1
            if self._open_tunnels == 0:
                self._idle.set()

    @property
    def open_tunnels(self) -> int:
        return self._open_tunnels

    async def drain(self, timeout: float) -> bool:
        """Wait for open tunnels to finish; ``False`` if some were still open at the deadline."""
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        return self._open_tunnels == 0

    def expose(self, node: Node, services: dict[str, ServiceSettings]) -> None:
        """Serve ``services`` to authorized peers; bad allowlist entries fail here, at start."""
        auth = self.settings.auth
        self._authorized_keys = AuthorizedKeys(self.settings.authorized_keys_file, node.parse_peer_id)
        for service in services.values():
            if service.allow is not None:
                self._service_allow[service.name] = frozenset(self.peer_id(node, entry) for entry in service.allow)
            node.set_stream_handler(service.protocol, partial(self._serve_stream, service))
            log.info("exposing %s (%s) as %s", service.name, service.address, service.protocol)
        if auth.allow_all:
            log.warning("auth.allow_all is on: any peer that finds this node can use its services")
        elif services and not len(self._authorized_keys):
            log.warning(
                "no peer is authorized yet: run `peerup auth add PEER_ID` (%s); until then every stream is refused",
                self.settings.authorized_keys_file,
            )

    def _authorized(self, service: ServiceSettings, remote_peer: str) -> bool:
        keys = self._authorized_keys
        if not self.settings.auth.allow_all and (keys is None or not keys.allows(remote_peer)):
            return False
        allow = self._service_allow.get(service.name)
        return allow is None or remote_peer in allow

    def _note(self, key: tuple[str, str], message: str) -> None:
        """Log a refusal once a minute per (peer, reason): a flood must not flood the log."""
        self._refusals.warning(key, "%s", message)

    async def _serve_stream(self, service: ServiceSettings, stream: ByteStream, remote_peer: str) -> None:
        """An inbound service stream: check the peer, dial the local service, answer, then proxy.

        The check comes first: an unauthorized peer never causes a connection
        to the local service, and its bytes are never read.
        """
        if not self._authorized(service, remote_peer):
            message = f"peer {remote_peer} is not authorized for service {service.name!r}"
            self._note((remote_peer, "unauthorized"), f"refused: {message}")
            await self._refuse(stream, "unauthorized", message)
            return
        limit = self.settings.auth.max_streams_per_peer
        if self._streams_of[remote_peer] >= limit:
            self._note((remote_peer, "busy"), f"refused: peer {remote_peer} already holds {limit} streams")
            await self._refuse(stream, "busy", f"too many open connections from this peer (limit {limit})")
            return
        self._streams_of[remote_peer] += 1
        entry = (service, anyio.CancelScope())
        self._serving.setdefault(remote_peer, []).append(entry)
        try:
            with entry[1]:
                await self._connect_local(service, stream, remote_peer)
        finally:
            self._serving[remote_peer].remove(entry)
            if not self._serving[remote_peer]:
                del self._serving[remote_peer]
            self._streams_of[remote_peer] -= 1
            if not self._streams_of[remote_peer]:
                del self._streams_of[remote_peer]

    def revoke(self) -> int:
        """Close the open tunnels of peers no longer authorized; how many were closed."""
        closed = 0
        for peer, entries in list(self._serving.items()):
            revoked = [scope for service, scope in entries if not self._authorized(service, peer)]
            if revoked:
                log.warning("peer %s is no longer authorized: closing its %d open tunnels", peer, len(revoked))
            for scope in revoked:
                scope.cancel()
                closed += 1
        return closed

    async def watch_authorized_keys(self, interval: float = 2.0) -> None:
        """Poll ``authorized_keys``; a removed peer loses its open tunnels, not only new ones."""
        while True:
            await anyio.sleep(interval)
            if self._authorized_keys is not None and self._authorized_keys.refresh():
                self.revoke()

    async def _connect_local(self, service: ServiceSettings, stream: ByteStream, remote_peer: str) -> None:
        with self._tunnel():
            target = f"{service.host}:{service.port}"
            timeout = self.settings.local_dial_timeout(service)
            try:
                with anyio.fail_after(timeout):
                    local = await anyio.connect_tcp(service.host, service.port)
            except TimeoutError:
                message = f"local service {target} did not answer within {timeout:g} s"
                log.warning("%s: %s", service.name, message)
                await self._refuse(stream, "timeout", message)
                return
            except OSError as exc:
                # anyio wraps per-address failures; the first cause says why (refused, unreachable).
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                reason = os.strerror(cause.errno) if cause.errno else str(cause)
                message = f"local service {target} refused the connection ({reason})"
                log.warning("%s: %s", service.name, message)
                await self._refuse(stream, "refused", message)
                return
            log.info("%s: stream from %s connected to %s", service.name, short(remote_peer), target)
            try:
                await wire.send_ok(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                await local.aclose()
                await anyio.aclose_forcefully(stream)
                return
            await self.carry(local, stream, service)

    async def _refuse(self, stream: ByteStream, code: str, message: str) -> None:
        try:
            await wire.send_error(stream, code, message)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await anyio.aclose_forcefully(stream)

    async def carry(self, local: ByteStream, remote: ByteStream, service: ServiceSettings | None) -> None:
        handled = await self.plugins.acall_first(
            "proxy_stream", local=local, remote=remote, settings=self.settings, service=service
        )
        if handled is None:
            await anyio.aclose_forcefully(local)
            await anyio.aclose_forcefully(remote)
            raise PluginError("no active plugin provides proxy_stream; is the built-in 'proxy' disabled?")

    # -- proxying --------------------------------------------------------------

    async def serve_proxy(
        self,
        node: Node,
        proxy: ProxySettings,
        tunnels: anyio.abc.TaskGroup,
        *,
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
            await listener.serve(partial(self._proxy_connection, node, proxy), task_group=tunnels)

    async def _proxy_connection(self, node: Node, proxy: ProxySettings, local: SocketStream) -> None:
        with self._tunnel():
            address = local.extra(anyio.abc.SocketAttribute.remote_address)
            client = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
            try:
                remote = await self.open_service_stream(node, proxy.peer, proxy.service)
            except PeerupError as exc:
                # A reset, like a refused TCP connection: an application that reads
                # until EOF must not mistake "no tunnel" for "an empty answer".
                log.error("%s", exc)
                await abort(local)
                return
            except BaseException:
                await abort(local)
                raise
            path = remote.extra(PeerAttribute.path, "unknown")
            log.info("connection from %s -> %s on %s: %s path", client, proxy.service, proxy.peer, path)
            await self.carry(local, remote, None)


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
