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

import inspect
import logging
from collections.abc import Awaitable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from peerup.core import hookspecs
from peerup.core.errors import PeerupError, PluginError

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
    """The pluggy manager plus the async first-result calling convention.

    Kept as one object so tests and embedding programs can build a host with
    exactly the plugins they want (``PluginHost.from_objects``).
    """

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origin: dict[str, str] = {}

    @classmethod
    def from_objects(cls, plugins: Iterable[tuple[str, object]]) -> PluginHost:
        host = cls()
        for name, plugin in plugins:
            host.register(name, plugin, origin=name)
        return host

    def register(self, name: str, plugin: object, origin: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:  # duplicate name, hook argument typo
            raise PluginError(f"plugin {origin}: {_first_and_last_line(exc)}") from exc
        self._origin[name] = origin
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise PluginError(f"plugin {origin}: {_first_and_last_line(exc)}") from exc

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def hooks_of(self, name: str) -> tuple[str, ...]:
        plugin = self.pm.get_plugin(name)
        return tuple(sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or ()))

    def origin(self, plugin_name: str) -> str:
        return self._origin.get(plugin_name, plugin_name)

    def call_first(self, hook_name: str, **kwargs: Any) -> Any:
        """A synchronous first-result hook, with plugin failures named."""
        hook = getattr(self.pm.hook, hook_name)
        try:
            return hook(**kwargs)
        except PeerupError:
            raise
        except Exception as exc:
            raise PluginError(f"hook {hook_name} failed in a plugin: {type(exc).__name__}: {exc}") from exc

    def _in_order(self, hook_name: str) -> list[Any]:
        """Implementations in pluggy's call order (it stores them first-registered-first)."""
        return list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))

    @contextmanager
    def _blame(self, impl: Any, hook_name: str) -> Iterator[None]:
        """A plugin's unexpected exception becomes one PluginError line naming it."""
        try:
            yield
        except PeerupError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {self.origin(impl.plugin_name)} failed in {hook_name}: {type(exc).__name__}: {exc}"
            ) from exc

    def call_all(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """A synchronous hook every plugin answers; a failure names its plugin."""
        results = []
        for impl in self._in_order(hook_name):
            with self._blame(impl, hook_name):
                results.append(impl.function(**{name: kwargs[name] for name in impl.argnames}))
        return results

    async def acall_first(self, hook_name: str, **kwargs: Any) -> Any:
        """Call an async hook: await results in pluggy order, stop at the first non-None.

        Each implementation is called on its own (not through pluggy's loop) so a
        failure names its plugin and losing coroutines are never created.
        """
        for impl in self._in_order(hook_name):
            with self._blame(impl, hook_name):
                result = impl.function(**{name: kwargs[name] for name in impl.argnames})
                if inspect.isawaitable(result):
                    result = await _await(result)
            if result is not None:
                return result
        return None


def _first_and_last_line(exc: Exception) -> str:
    """pluggy explains a bad hookimpl over three lines; the user gets one."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if len(lines) < 2 else f"{lines[0]}: {lines[-1]}"


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


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
