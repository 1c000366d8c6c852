"""``peerup daemon``: one node from the config, its services and ``[tunnels]``, a control API, reloads.

``peerup run`` stays the foreground command driven by flags; the daemon is what
a service manager runs for months (docs/operations.md). It reads everything
from the peerup home, so a reboot brings back every service and tunnel.

Reload (SIGHUP, a change of config.toml's mtime, or ``POST /v1/reload``)
re-reads the config and authorized_keys and applies the difference: services
added, removed or changed, tunnels opened or closed, peers revoked. Open
tunnels that are still allowed keep running; a config that does not validate
is refused as a whole, with its one-line error, and the daemon keeps what it
had.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pydantic import ValidationError

from peerup import __version__
from peerup.core.errors import ConfigError, PeerupError
from peerup.core.node import Introspectable, Node, RelaySlot
from peerup.core.plugins import PluginHost
from peerup.core.runtime import Runtime, stop_on_signals
from peerup.core.settings import ProxySettings, Settings, load_settings
from peerup.core.tunnels import Forward
from peerup.daemon import control
from peerup.daemon.api import ApiError, ControlApp
from peerup.daemon.http import serve_app
from peerup.daemon.metrics import Metrics
from peerup.daemon.notify import Notifier

log = logging.getLogger("peerup.daemon")

#: How often config.toml's mtime is checked (a change reloads, as SIGHUP does).
CONFIG_POLL = 2.0
#: A ping on each connection for ``peerup peers`` waits at most this long.
RTT_TIMEOUT = 2.0


class Daemon:
    """The running node plus what the control API asks of it (peerup/daemon/api.py)."""

    def __init__(
        self, settings: Settings, plugins: PluginHost, flags: dict[str, Any], out: Callable[[str], None] = print
    ) -> None:
        self.settings = settings
        self.flags = flags
        self.runtime = Runtime(settings, plugins)
        self.out = out
        self.started = time.time()
        self.node: Node | None = None
        self.notifier = Notifier()
        self.ready = False
        self._forwards: TaskGroup | None = None
        self._reloading = anyio.Lock()
        self._config_stamp = _stamp(settings.config_file)
        #: Forward IDs from [tunnels] -> the settings they were opened with.
        self._persistent: dict[str, ProxySettings] = {}
        self._tasks: TaskGroup | None = None
        #: Invites this daemon holds (``peerup invite`` while it runs), by ID; one waits at a time.
        self._invites: dict[str, _Invite] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def run(self) -> None:
        settings = self.settings
        sock_path, cookie_path = settings.control_socket, settings.control_cookie
        sock = control.open_socket(sock_path)  # refused before any node starts: wrong mode, a second daemon
        try:
            cookie = control.write_cookie(cookie_path)
            await self._run(sock, cookie)
        finally:
            sock.close()
            control.remove(sock_path, cookie_path)

    async def _run(self, sock: Any, cookie: str) -> None:
        settings, runtime = self.settings, self.runtime
        accepting = anyio.CancelScope()
        async with stop_on_signals(accepting), runtime.node() as node, anyio.create_task_group() as forwards:
            self.node, self._forwards = node, forwards
            with accepting:
                runtime.expose(node, settings.services)
                async with anyio.create_task_group() as tasks:
                    self._tasks = tasks
                    tasks.start_soon(runtime.watch_authorized_keys)
                    self.out(f"peer {node.peer_id}")
                    for service in settings.services.values():
                        self.out(f"serving {service.name} -> {service.address}")
                    for name, tunnel in settings.tunnels.items():
                        forward = await self.open_forward(name, tunnel, persistent=True)
                        self.out(f"tunnel {name}: {forward.bind}:{forward.port} -> {tunnel.service} on {tunnel.peer}")
                    await tasks.start(serve_app, ControlApp(self, cookie), sock)
                    self.out(f"control API on {settings.control_socket}")
                    if settings.metrics.enabled:
                        metrics = Metrics(runtime.registry, lambda: self.node, "node", self.health)
                        binds = await self._serve_metrics(tasks, metrics)
                        self.out(f"metrics on {binds[0]}/metrics")
                    tasks.start_soon(self._on_sighup)
                    tasks.start_soon(self._watch_config)
                    await self._become_ready(tasks)
                    await anyio.sleep_forever()
            self.notifier.send("STOPPING=1", "STATUS=draining open tunnels")
            for forward in list(runtime.registry.forwards.values()):
                forward.listener.cancel()
            if runtime.open_tunnels:
                log.warning("waiting up to %g s for %d open connections", settings.timeouts.drain, runtime.open_tunnels)
                if not await runtime.drain(settings.timeouts.drain):
                    log.warning("closing %d connections still open", runtime.open_tunnels)
            forwards.cancel_scope.cancel()

    async def _serve_metrics(self, tasks: TaskGroup, metrics: Metrics) -> list[str]:
        try:
            binds: list[str] = await tasks.start(serve_app, metrics.app, self.settings.metrics.listen)
        except OSError as exc:  # hypercorn binds before it reports started
            raise ConfigError(f"metrics.listen {self.settings.metrics.listen}: {exc.strerror or exc}") from exc
        return binds

    async def _become_ready(self, tasks: TaskGroup) -> None:
        """READY=1 once a relay slot is held (at once without relays), then the watchdog."""
        node = self.node
        if isinstance(node, Introspectable):
            await node.wait_relay_slot()
        self.ready = True
        self.notifier.send("READY=1", f"STATUS=serving {len(self.settings.services)} services")
        self.out("ready")
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            tasks.start_soon(self.notifier.watchdog, interval)

    def health(self) -> dict[str, Any]:
        node = self.node
        slots: list[RelaySlot] = node.relay_slots() if isinstance(node, Introspectable) else []
        held = not slots or any(slot.reserved for slot in slots)
        return {"ok": self.ready and held, "ready": self.ready, "relay_slot": held}

    # -- tunnels -------------------------------------------------------------------

    async def open_forward(self, forward_id: str, proxy: ProxySettings, persistent: bool) -> Forward:
        """Listen for ``proxy``; a port in use or a bad peer raises ``ConfigError`` and leaves nothing open."""
        assert self._forwards is not None and self.node is not None
        forward = self.runtime.registry.add_forward(
            Forward(forward_id, proxy.peer, proxy.service, proxy.bind, proxy.port, persistent)
        )
        try:
            forward.port = await self._forwards.start(self._run_forward, forward, proxy)
        except BaseExceptionGroup as group:  # the listener's task group wraps "port in use"
            self.runtime.registry.remove_forward(forward_id)
            found = _first(group, ConfigError)
            if found is None:
                raise
            raise found from None
        except BaseException:
            self.runtime.registry.remove_forward(forward_id)
            raise
        if persistent:
            self._persistent[forward_id] = proxy
        return forward

    async def _run_forward(self, forward: Forward, proxy: ProxySettings, *, task_status: TaskStatus[int]) -> None:
        assert self.node is not None
        try:
            with forward.scope:
                async with anyio.create_task_group() as connections:
                    with forward.listener:
                        await self.runtime.serve_proxy(
                            self.node, proxy, connections, forward=forward, task_status=task_status
                        )
        finally:
            self.runtime.registry.remove_forward(forward.id)
            if self._persistent.get(forward.id) is proxy:
                del self._persistent[forward.id]
            forward.done.set()

    async def connect(self, request: dict[str, Any]) -> dict[str, Any]:
        unknown = set(request) - {"peer", "service", "port", "bind"}
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))}: expected peer, service, port, bind")
        try:
            proxy = ProxySettings(**request)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "request"
            raise ApiError(400, f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        assert self.node is not None
        self.runtime.peer_id(self.node, proxy.peer)  # ConfigError -> 400, one line
        try:
            forward = await self.open_forward(self.runtime.registry.new_id("t"), proxy, persistent=False)
        except ConfigError as exc:
            raise ApiError(409, str(exc)) from None
        log.info("tunnel %s: %s:%d -> %s on %s", forward.id, forward.bind, forward.port, proxy.service, proxy.peer)
        return forward.as_json()

    def disconnect(self, entry_id: str) -> None:
        if not self.runtime.registry.close(entry_id):
            known = ", ".join(sorted(self.runtime.registry.forwards) + sorted(self.runtime.registry.connections))
            raise ApiError(404, f"no tunnel or connection with ID {entry_id!r} (open: {known or 'none'})")
        log.info("closing %s on request", entry_id)

    # -- invites -------------------------------------------------------------------

    async def invite(self, request: dict[str, Any]) -> dict[str, Any]:
        """Start waiting for one joiner on this daemon's node; the code is the answer.

        ``peerup invite`` comes here when a daemon runs for the home: a second
        node with the same identity would compete with the daemon for the relay
        slot and could take the joiner's connection.
        """
        from peerup.core.invite import invite, pick_relay
        from peerup.core.pairing import check_invite

        unknown = set(request) - {"ttl", "name", "services", "expires"}
        if unknown:
            raise ApiError(400, f"unknown field(s) {', '.join(sorted(unknown))}: expected ttl, name, services, expires")
        if any(entry.state == "waiting" for entry in self._invites.values()):
            raise ApiError(409, "an invite is already waiting on this daemon; let it finish or expire first")
        ttl = request.get("ttl", 600.0)
        if not isinstance(ttl, int | float) or not 0 < ttl <= 7 * 24 * 3600:
            raise ApiError(400, f"ttl: expected seconds between 0 and 604800, got {ttl!r}")
        raw_services = request.get("services") or []
        if not isinstance(raw_services, list) or not all(isinstance(item, str) for item in raw_services):
            raise ApiError(400, "services: expected a list of service names")
        settings, node, tasks = self.settings, self.node, self._tasks
        assert node is not None and tasks is not None
        try:
            terms = check_invite(settings, request.get("name"), raw_services, request.get("expires"))
        except PeerupError as exc:
            raise ApiError(400, str(exc)) from None
        name, services, expires = terms.name, terms.services, terms.expires
        entry = _Invite(self.runtime.registry.new_id("i"))
        self._invites = {key: value for key, value in self._invites.items() if value.state == "waiting"}
        self._invites[entry.id] = entry
        shown = anyio.Event()

        def show(code: Any) -> None:
            entry.code = str(code)
            shown.set()

        async def wait() -> None:
            with entry.scope:
                try:
                    relay = await pick_relay(settings, node)
                    paired = await invite(
                        self.runtime,
                        node,
                        relay=relay,
                        ttl=float(ttl),
                        show=show,
                        name=name,
                        services=services,
                        expires=expires,
                    )
                    entry.state, entry.peer_id, entry.name = "paired", paired.peer_id, paired.name
                    log.info("invite %s: paired with %s (%s)", entry.id, paired.name, paired.peer_id)
                except PeerupError as exc:
                    entry.state, entry.error = "failed", str(exc)
            if entry.scope.cancelled_caught:
                entry.state, entry.error = "failed", "the invite was cancelled"
            entry.done.set()
            shown.set()

        tasks.start_soon(wait)
        await shown.wait()
        if entry.code is None:
            raise ApiError(409, entry.error or "the invite could not start")
        return {"id": entry.id, "code": entry.code, "ttl": ttl}

    async def invitation(self, invite_id: str, wait: float = 20.0) -> dict[str, Any]:
        """The invite's state, waiting up to ``wait`` seconds for it to end."""
        entry = self._invites.get(invite_id)
        if entry is None:
            raise ApiError(404, f"no invite with ID {invite_id!r} on this daemon")
        with anyio.move_on_after(wait):
            await entry.done.wait()
        return entry.as_json()

    def cancel_invite(self, invite_id: str) -> None:
        entry = self._invites.get(invite_id)
        if entry is None:
            raise ApiError(404, f"no invite with ID {invite_id!r} on this daemon")
        entry.scope.cancel()

    # -- reload --------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Apply config.toml and authorized_keys as they are now; a bad config changes nothing."""
        async with self._reloading:
            self._config_stamp = _stamp(self.settings.config_file)
            new = load_settings(self.settings.home, **self.flags)  # ConfigError: the caller reports it
            assert self.node is not None
            for key in ("listen", "relays", "transports", "plugins", "disable_plugins"):
                if getattr(new, key) != getattr(self.settings, key):
                    log.warning("%s changed in the config: restart the daemon to apply it", key)
            old_settings = self.runtime.settings
            self.runtime.settings = new
            try:
                closed = self.runtime.update_services(self.node, new.services)
            except BaseException:
                self.runtime.settings = old_settings
                raise
            self.settings = new
            closed += self.runtime.reauthorize()
            closed_tunnels, opened, errors = await self._apply_tunnels(new.tunnels)
            result = {
                "services": sorted(new.services),
                "tunnels_opened": opened,
                "tunnels_closed": closed_tunnels,
                "connections_closed": closed,
                "errors": errors,
            }
            log.warning("reloaded %s: %s", new.config_file, result)
            return result

    async def _apply_tunnels(self, wanted: dict[str, ProxySettings]) -> tuple[list[str], list[str], list[str]]:
        registry = self.runtime.registry
        closed: list[str] = []
        for name, proxy in list(self._persistent.items()):
            if wanted.get(name) != proxy:
                forward = registry.forwards.get(name)
                if forward is not None:
                    forward.scope.cancel()
                    with anyio.move_on_after(10):
                        await forward.done.wait()  # its port is free again before a changed tunnel reopens it
                self._persistent.pop(name, None)
                closed.append(name)
        opened: list[str] = []
        errors: list[str] = []
        for name, proxy in wanted.items():
            if name in self._persistent:
                continue
            if name in registry.forwards:
                errors.append(f"tunnels.{name}: a tunnel opened with `peerup connect` has that ID")
                continue
            try:
                await self.open_forward(name, proxy, persistent=True)
                opened.append(name)
            except ConfigError as exc:
                log.error("tunnels.%s: %s", name, exc)
                errors.append(f"tunnels.{name}: {exc}")
        return closed, opened, errors

    async def _on_sighup(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                await self._reload_logged("SIGHUP")

    async def _watch_config(self) -> None:
        while True:
            await anyio.sleep(CONFIG_POLL)
            if _stamp(self.settings.config_file) != self._config_stamp:
                await self._reload_logged("config.toml changed")

    async def _reload_logged(self, why: str) -> None:
        log.warning("%s: reloading", why)
        try:
            await self.reload()
        except ConfigError as exc:
            log.error("reload refused, keeping the running config: %s", exc)

    # -- what the API reports ------------------------------------------------------

    def status(self) -> dict[str, Any]:
        node = self.node
        assert node is not None
        now = time.time()
        slots = node.relay_slots() if isinstance(node, Introspectable) else []
        return {
            "peer_id": node.peer_id,
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "uptime": round(now - self.started, 3),
            "ready": self.ready,
            "reachability": node.reachability() if isinstance(node, Introspectable) else "unknown",
            "addresses": node.listen_addrs(),
            "relays": [
                {
                    "addr": slot.addr,
                    "reserved": slot.reserved,
                    "expires": slot.expires,
                    "expires_in": round(slot.expires - now, 1) if slot.expires else None,
                }
                for slot in slots
            ],
            "services": {name: service.address for name, service in self.settings.services.items()},
            "tunnels": len(self.runtime.registry.forwards),
            "connections": len(self.runtime.registry.connections),
            "config": str(self.settings.config_file),
        }

    async def peers(self) -> list[dict[str, Any]]:
        node = self.node
        if not isinstance(node, Introspectable):
            return []
        names = {peer_id: name for name, peer_id in self.settings.peers.items()}
        relays = {slot.addr.rsplit("/p2p/", 1)[-1] for slot in node.relay_slots()}
        now = time.time()
        return [
            {
                "peer_id": conn.peer_id,
                "name": names.get(conn.peer_id),
                "relay": conn.peer_id in relays,
                "path": conn.path,
                "address": conn.address,
                "rtt_ms": round(conn.rtt * 1000, 3) if conn.rtt is not None else None,
                "since": conn.since,
                "connected_for": round(now - conn.since, 1) if conn.since else None,
            }
            for conn in await node.connections(RTT_TIMEOUT)
        ]

    def tunnels(self) -> list[dict[str, Any]]:
        return self.runtime.registry.as_json()


class _Invite:
    """One invite the daemon holds: its code, and how it ended."""

    def __init__(self, invite_id: str) -> None:
        self.id = invite_id
        self.code: str | None = None
        self.state = "waiting"
        self.peer_id: str | None = None
        self.name: str | None = None
        self.error: str | None = None
        self.done = anyio.Event()
        self.scope = anyio.CancelScope()

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "peer_id": self.peer_id, "name": self.name, "error": self.error}


def _first(group: BaseExceptionGroup[Any], kind: type[ConfigError]) -> ConfigError | None:
    for inner in group.exceptions:
        if isinstance(inner, kind):
            return inner
        if isinstance(inner, BaseExceptionGroup):
            found = _first(inner, kind)
            if found is not None:
                return found
    return None


def _stamp(path: Path) -> tuple[int, int, int] | None:
    with contextlib.suppress(OSError):
        info = os.stat(path)
        return info.st_mtime_ns, info.st_size, info.st_ino
    return None
