"""The serving side: which peers may use which service, and the local dial behind each stream.

An inbound stream is checked before anything else (authorized_keys, the
service's ``allow``, the per-peer cap), so an unauthorized peer never causes a
connection to the local service and its bytes are never read. The local
service is then dialled under its own timeout, and the status line tells the
client what happened (ADR 0004) before ``proxy_stream`` carries the bytes.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from functools import partial

import anyio
from anyio.abc import ByteStream

from peerup.core import names, wire
from peerup.core.auth import AuthorizedKeys
from peerup.core.carrier import Carrier
from peerup.core.logs import OncePer
from peerup.core.names import short
from peerup.core.node import Node
from peerup.core.plugins import PluginHost
from peerup.core.settings import ServiceSettings, Settings

log = logging.getLogger("peerup.runtime")


class Server:
    """Exposes named services to authorized peers, and closes what they may no longer use."""

    def __init__(self, settings: Settings, plugins: PluginHost, carrier: Carrier) -> None:
        self.settings = settings
        self.plugins = plugins
        self._carrier = carrier
        self._authorized_keys: AuthorizedKeys | None = None
        self._service_allow: dict[str, frozenset[str]] = {}
        self._streams_of: Counter[str] = Counter()
        #: Open tunnels served to each peer, so revoking a peer can close them.
        self._serving: dict[str, list[tuple[ServiceSettings, anyio.CancelScope]]] = {}
        self._refusals = OncePer(log)
        #: Services exposed now, by name; a reload (:meth:`update_services`) replaces it.
        self._services: dict[str, ServiceSettings] = {}

    def expose(self, node: Node, services: dict[str, ServiceSettings]) -> None:
        """Serve ``services`` to authorized peers; bad allowlist entries fail here, at start."""
        auth = self.settings.auth
        self._authorized_keys = AuthorizedKeys(self.settings.authorized_keys_file, node.parse_peer_id)
        self.update_services(node, services)
        if auth.allow_all:
            log.warning("auth.allow_all is on: any peer that finds this node can use its services")
        elif services and not len(self._authorized_keys):
            log.warning(
                "no peer is authorized yet: run `peerup auth add PEER_ID` (%s); until then every stream is refused",
                self.settings.authorized_keys_file,
            )

    def update_services(self, node: Node, services: dict[str, ServiceSettings]) -> int:
        """Expose exactly ``services`` from now on (start, and the daemon's reload).

        Open tunnels of a service that is gone, or of a peer its new ``allow``
        list leaves out, are closed; every other open tunnel keeps running,
        also when the service's address changed (new streams get the new one).
        Returns how many open tunnels were closed. Bad allowlist entries raise
        before anything changes.
        """
        allow = {
            service.name: frozenset(names.peer_id(self.plugins, self.settings, entry) for entry in service.allow)
            for service in services.values()
            if service.allow is not None
        }
        for service in services.values():
            if service.name not in self._services:
                node.set_stream_handler(service.protocol, partial(self._serve_named, service.name))
                log.info("exposing %s (%s) as %s", service.name, service.address, service.protocol)
        removed = set(self._services) - set(services)
        self._services = dict(services)
        self._service_allow = allow
        closed = 0
        for peer, entries in list(self._serving.items()):
            for service, scope in entries:
                if service.name in removed:
                    log.warning("service %s is no longer exposed: closing a tunnel of peer %s", service.name, peer)
                    scope.cancel()
                    closed += 1
        return closed + self.revoke()

    async def _serve_named(self, name: str, stream: ByteStream, remote_peer: str) -> None:
        service = self._services.get(name)
        if service is None:  # removed by a reload; libp2p keeps the handler
            await self._refuse(stream, "unknown-service", f"this node no longer exposes a service named {name!r}", name)
            return
        await self._serve_stream(service, stream, remote_peer)

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
        allowed = self._authorized(service, remote_peer)
        self._carrier.registry.decided(allowed)
        if not allowed:
            message = f"peer {remote_peer} is not authorized for service {service.name!r}"
            self._note((remote_peer, "unauthorized"), f"refused: {message}")
            await self._refuse(stream, "unauthorized", message, service.name)
            return
        limit = self.settings.auth.max_streams_per_peer
        if self._streams_of[remote_peer] >= limit:
            self._note((remote_peer, "busy"), f"refused: peer {remote_peer} already holds {limit} streams")
            message = f"too many open connections from this peer (limit {limit})"
            await self._refuse(stream, "busy", message, service.name)
            return
        self._streams_of[remote_peer] += 1
        entry = (service, anyio.CancelScope())
        self._serving.setdefault(remote_peer, []).append(entry)
        try:
            with entry[1], self._carrier.registry.open("inbound", service.name, remote_peer):
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
            for service, _ in entries:
                if not self._authorized(service, peer):
                    self._carrier.registry.failed(service.name, "revoked")
            if revoked:
                log.warning("peer %s is no longer authorized: closing its %d open tunnels", peer, len(revoked))
            for scope in revoked:
                scope.cancel()
                closed += 1
        return closed

    def reauthorize(self) -> int:
        """Re-read authorized_keys now (the daemon's reload), closing tunnels of removed peers."""
        if self._authorized_keys is not None and self._authorized_keys.refresh():
            return self.revoke()
        return 0

    async def watch_authorized_keys(self, interval: float = 2.0) -> None:
        """Poll ``authorized_keys``; a removed peer loses its open tunnels, not only new ones."""
        while True:
            await anyio.sleep(interval)
            if self._authorized_keys is not None and self._authorized_keys.refresh():
                self.revoke()

    async def _connect_local(self, service: ServiceSettings, stream: ByteStream, remote_peer: str) -> None:
        with self._carrier.tunnel():
            target = f"{service.host}:{service.port}"
            timeout = self.settings.local_dial_timeout(service)
            try:
                with anyio.fail_after(timeout):
                    local = await anyio.connect_tcp(service.host, service.port)
            except TimeoutError:
                message = f"local service {target} did not answer within {timeout:g} s"
                log.warning("%s: %s", service.name, message)
                await self._refuse(stream, "timeout", message, service.name)
                return
            except OSError as exc:
                # anyio wraps per-address failures; the first cause says why (refused, unreachable).
                cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
                reason = os.strerror(cause.errno) if cause.errno else str(cause)
                message = f"local service {target} refused the connection ({reason})"
                log.warning("%s: %s", service.name, message)
                await self._refuse(stream, "refused", message, service.name)
                return
            log.info("%s: stream from %s connected to %s", service.name, short(remote_peer), target)
            try:
                await wire.send_ok(stream)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                await local.aclose()
                await anyio.aclose_forcefully(stream)
                return
            await self._carrier.carry(local, stream, service)

    async def _refuse(self, stream: ByteStream, code: str, message: str, service: str = "-") -> None:
        self._carrier.registry.failed(service, code)
        try:
            await wire.send_error(stream, code, message)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
        finally:
            await anyio.aclose_forcefully(stream)
