"""Loading plugins from the ``peerup.plugins`` entry-point group.

Built-ins are registered through the same group in peerup's own pyproject, so a
built-in is replaced or disabled exactly as a third party's plugin would be.
Which plugins are active:

* every built-in (a plugin shipped in the ``peerup`` distribution) unless it is
  named in ``disable_plugins``;
* every plugin named in ``plugins`` (``peerup run --plugin NAME``), registered
  after the built-ins, so pluggy asks it first and its answer wins.

Installed plugins that are not selected are listed by ``peerup plugins`` but not
loaded, so a broken or surprising package cannot change a node by being present.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy
from anyio.abc import ByteStream

from peerup.core import hookspecs
from peerup.core.errors import PluginError
from peerup.core.hookcall import Answer, Blame
from peerup.core.hookspecs import IdentityMode, hookimpl
from peerup.core.node import Node, PeerRecord
from peerup.core.retry import RetryPolicy
from peerup.core.settings import PluginSettings, ServiceSettings, Settings

log = logging.getLogger("peerup.plugins")

GROUP = "peerup.plugins"
BUILTIN_DISTRIBUTION = "peerup"


@dataclass(frozen=True)
class PluginInfo:
    """One installed plugin as ``peerup plugins`` shows it."""

    name: str
    distribution: str
    version: str
    builtin: bool
    active: bool
    hooks: tuple[str, ...]
    value: str


def _dist(ep: EntryPoint) -> tuple[str, str]:
    dist = ep.dist
    if dist is None:
        return "?", "?"
    return dist.metadata["Name"] or "?", dist.version


def installed_entry_points() -> list[EntryPoint]:
    """Entry points of the group, built-ins first, then others by name."""
    eps = list(entry_points(group=GROUP))
    return sorted(eps, key=lambda ep: (_dist(ep)[0] != BUILTIN_DISTRIBUTION, ep.name))


class PluginHost:
    """The pluggy manager and one typed method per hook.

    The core calls hooks only through these methods, never by string name, so
    a hook's arguments and result are checked by mypy where it is called. Every
    call goes through pluggy's own loop (tracing, ``add_hookcall_monitoring``
    and wrappers all apply); async hooks are answered as described in
    :mod:`peerup.core.hookcall`. Kept as one object so tests and embedding
    programs can build a host with exactly the plugins they want
    (``PluginHost.from_objects``).
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origin: dict[str, str] = {}
        self._blame = Blame()
        self.pm.register(_AsyncAnswers(self), name=CORE_PLUGIN)

    @classmethod
    def from_objects(cls, plugins: Iterable[tuple[str, object]]) -> PluginHost:
        host = cls()
        for name, plugin in plugins:
            host.register(name, plugin, origin=name)
        return host

    def register(self, name: str, plugin: object, origin: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:  # duplicate name, hook argument typo, async wrapper
            raise PluginError(f"plugin {origin}: {_first_and_last_line(exc)}") from exc
        self._origin[name] = origin
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin {origin}: {_first_and_last_line(exc)}") from exc
        for caller in self.pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    self._blame.add(impl.function, origin)

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin() if name != CORE_PLUGIN]

    def plugins(self) -> list[tuple[str, object]]:
        return [(name, plugin) for name, plugin in self.pm.list_name_plugin() if name != CORE_PLUGIN]

    def hooks_of(self, name: str) -> tuple[str, ...]:
        plugin = self.pm.get_plugin(name)
        return tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))

    def origin(self, plugin_name: str) -> str:
        return self._origin.get(plugin_name, plugin_name)

    def declared_settings(self) -> list[tuple[str, type[PluginSettings]]]:
        """(plugin name, settings model) for each registered plugin that declares one."""
        found = []
        for name, plugin in self.plugins():
            model = getattr(plugin, "settings_model", None)
            if model is None:
                continue
            if not (isinstance(model, type) and issubclass(model, PluginSettings)):
                raise PluginError(f"plugin {self.origin(name)}: settings_model must be a PluginSettings subclass")
            if not isinstance(getattr(model, "section", None), str):
                raise PluginError(f"plugin {self.origin(name)}: {model.__name__}.section must name its [plugin.NAME]")
            found.append((name, model))
        return found

    def check_settings(self, settings: Settings) -> None:
        """Validate every declared ``[plugin.NAME]`` once, at start-up: a typo is one line, now."""
        for _name, model in self.declared_settings():
            settings.plugin_settings(model)

    # -- the hooks, typed ------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        with self._blame.around("configure"):
            self.pm.hook.configure(settings=settings)

    def open_node(
        self, settings: Settings, role: str, retry_policy: RetryPolicy
    ) -> AbstractAsyncContextManager[Node] | None:
        with self._blame.around("open_node"):
            manager: AbstractAsyncContextManager[Node] | None = self.pm.hook.open_node(
                settings=settings, role=role, retry_policy=retry_policy
            )
        return manager

    def retry_policy(
        self, settings: Settings, service: ServiceSettings | None, service_name: str | None = None
    ) -> RetryPolicy | None:
        if service_name is None and service is not None:
            service_name = service.name
        with self._blame.around("retry_policy"):
            policy: RetryPolicy | None = self.pm.hook.retry_policy(
                settings=settings, service=service, service_name=service_name
            )
        return policy

    def identity(self, home: Path, mode: IdentityMode) -> str:
        """The home's peer ID through the active transport (see the hook for ``mode``)."""
        with self._blame.around("identity"):
            peer_id: str | None = self.pm.hook.identity(home=home, mode=mode)
        if peer_id is None:
            raise PluginError("no active plugin keeps an identity (identity); is the built-in 'libp2p' disabled?")
        return peer_id

    def resolve_name(self, name: str, settings: Settings) -> str | None:
        with self._blame.around("resolve_name"):
            peer: str | None = self.pm.hook.resolve_name(name=name, settings=settings)
        if peer is not None and not isinstance(peer, str):
            raise PluginError(f"resolve_name answered {name!r} with a {type(peer).__name__}, not a peer ID string")
        return peer

    def parse_peer_id(self, text: str) -> str | None:
        """The transport's canonical form of ``text``; raises ValueError on garbage, None if no transport."""
        parsed: str | None = self.pm.hook.parse_peer_id(text=text)
        return parsed

    async def discover_peer(self, node: Node, peer_id: str, settings: Settings) -> PeerRecord | None:
        record = await self._answer("discover_peer", node=node, peer_id=peer_id, settings=settings)
        if record is not None and not isinstance(record, PeerRecord):
            raise PluginError(f"discover_peer answered with a {type(record).__name__}, not a PeerRecord")
        return record

    async def dial(self, node: Node, peer: PeerRecord, protocol: str, settings: Settings) -> ByteStream | None:
        stream = await self._answer("dial", node=node, peer=peer, protocol=protocol, settings=settings)
        if stream is not None and not isinstance(stream, ByteStream):
            await _close_anything(stream)
            raise PluginError(f"dial answered with a {type(stream).__name__}, not an anyio ByteStream")
        return stream

    async def proxy_stream(
        self, local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
    ) -> bool | None:
        handled = await self._answer("proxy_stream", local=local, remote=remote, settings=settings, service=service)
        return None if handled is None else bool(handled)

    async def _answer(self, hook: str, **kwargs: Any) -> Any:
        with self._blame.around(hook):
            outcome = getattr(self.pm.hook, hook)(**kwargs)
            return await outcome if inspect.isawaitable(outcome) else outcome

    def again(self, hook: str) -> Callable[[dict[str, Any]], Iterator[Any]]:
        """Call the plain (non-wrapper) implementations of ``hook`` lazily, in pluggy's order."""

        def call(kwargs: dict[str, Any]) -> Iterator[Any]:
            for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
                if impl.wrapper or impl.hookwrapper:
                    continue
                yield impl.function(*(kwargs[name] for name in impl.argnames))

        return call


#: The name of the core's own wrappers in the plugin manager.
CORE_PLUGIN = "peerup.core"


class _AsyncAnswers:
    """Innermost wrappers of the async hooks: pluggy's list of results becomes one Answer."""

    def __init__(self, host: PluginHost) -> None:
        self._host = host

    def _wrap(self, hook: str, kwargs: dict[str, Any]) -> Generator[None, list[Any], Answer[Any]]:
        results = yield
        return Answer(hook, results, kwargs, self._host.again(hook))

    @hookimpl(wrapper=True, trylast=True)
    def discover_peer(self, node: Node, peer_id: str, settings: Settings) -> Generator[None, list[Any], Answer[Any]]:
        return (yield from self._wrap("discover_peer", {"node": node, "peer_id": peer_id, "settings": settings}))

    @hookimpl(wrapper=True, trylast=True)
    def dial(
        self, node: Node, peer: PeerRecord, protocol: str, settings: Settings
    ) -> Generator[None, list[Any], Answer[Any]]:
        kwargs = {"node": node, "peer": peer, "protocol": protocol, "settings": settings}
        return (yield from self._wrap("dial", kwargs))

    @hookimpl(wrapper=True, trylast=True)
    def proxy_stream(
        self, local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
    ) -> Generator[None, list[Any], Answer[Any]]:
        kwargs = {"local": local, "remote": remote, "settings": settings, "service": service}
        return (yield from self._wrap("proxy_stream", kwargs))


async def _close_anything(thing: object) -> None:
    close = getattr(thing, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _first_and_last_line(exc: Exception) -> str:
    """pluggy explains a bad hookimpl over three lines; the user gets one."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]}: {lines[-1]}"


def _instantiate(name: str, plugin: object, dist: str, version: str) -> object:
    """A class entry point is instantiated, so plugins may keep per-process state."""
    if not isinstance(plugin, type):
        return plugin
    try:
        return plugin()
    except Exception as exc:
        raise PluginError(
            f"plugin {name!r} from {dist} {version} raised when created: {type(exc).__name__}: {exc}"
        ) from exc


def _load(ep: EntryPoint) -> object:
    dist, version = _dist(ep)
    try:
        plugin = ep.load()
    except Exception as exc:
        raise PluginError(
            f"plugin {ep.name!r} from {dist} {version} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    return _instantiate(ep.name, plugin, dist, version)


def _is_active(ep: EntryPoint, selected: list[str], disabled: list[str]) -> bool:
    if ep.name in disabled:
        return False
    return _dist(ep)[0] == BUILTIN_DISTRIBUTION or ep.name in selected


def load_plugins(selected: Iterable[str] = (), disabled: Iterable[str] = ()) -> PluginHost:
    """Build the plugin host for a deployment's ``plugins``/``disable_plugins``.

    Plugins are loaded with stevedore's ``NamedExtensionManager`` so selection
    by name and load-failure reporting behave as in other stevedore users; the
    callback turns a failure into one :class:`PluginError` line.
    """
    from stevedore import ExtensionManager, NamedExtensionManager

    selected, disabled = list(selected), list(disabled)
    eps = installed_entry_points()
    known = {ep.name for ep in eps}
    for name in [*selected, *disabled]:
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise PluginError(f"plugin {name!r} is not installed (installed: {choices})")

    order = [ep.name for ep in eps if _is_active(ep, selected, disabled) and ep.name not in selected]
    order += [name for name in dict.fromkeys(selected) if name not in disabled]
    by_name = {ep.name: ep for ep in eps}

    def on_failure(_manager: object, ep: EntryPoint, exc: BaseException) -> None:
        # stevedore hands back its cached entry point, which has no .dist: use ours.
        dist, version = _dist(by_name[ep.name])
        raise PluginError(
            f"plugin {ep.name!r} from {dist} {version} failed to load: {type(exc).__name__}: {exc}"
        ) from exc

    # stevedore memoizes a group's entry points per process; forget them so a
    # plugin installed while this process runs (tests, embedding programs) is seen.
    ExtensionManager.ENTRY_POINT_CACHE.pop(GROUP, None)
    manager: NamedExtensionManager[Any] = NamedExtensionManager(
        GROUP,
        names=order,
        invoke_on_load=False,
        on_load_failure_callback=on_failure,
        name_order=True,
    )
    host = PluginHost()
    for ext in manager.extensions:
        dist, version = _dist(by_name[ext.name])
        plugin = _instantiate(ext.name, ext.plugin, dist, version)
        host.register(ext.name, plugin, origin=f"{ext.name!r} from {dist} {version}")
        log.debug("plugin %s from %s %s registered", ext.name, dist, version)
    return host


def describe_plugins(selected: Iterable[str] = (), disabled: Iterable[str] = ()) -> list[PluginInfo]:
    """Every installed plugin, loaded one by one so a broken one shows as such."""
    selected, disabled = list(selected), list(disabled)
    rows = []
    for ep in installed_entry_points():
        dist, version = _dist(ep)
        try:
            plugin = _load(ep)
            probe = PluginHost()
            probe.register(ep.name, plugin, origin=ep.name)
            hooks = probe.hooks_of(ep.name)
        except PluginError as exc:
            hooks = (f"<broken: {exc}>",)
        rows.append(
            PluginInfo(
                name=ep.name,
                distribution=dist,
                version=version,
                builtin=dist == BUILTIN_DISTRIBUTION,
                active=_is_active(ep, selected, disabled),
                hooks=hooks,
                value=ep.value,
            )
        )
    return rows
