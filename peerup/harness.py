"""One call to test a plugin the way it will run: a real relay, a serving node, a client.

What ``pytester`` is to pytest plugins and ``Datasette(plugins=[...])`` to
datasette's: a plugin author writes ::

    async def test_my_plugin(tmp_path):
        async with plugin_lab(tmp_path, plugins=[MyPlugin()]) as lab:
            assert await lab.roundtrip(b"hello") == b"hello"

and gets real libp2p hosts on 127.0.0.1, a real circuit relay, real TCP
sockets, the built-in plugins plus the given ones registered after them (as
``--plugin`` would register them, so they are asked first), and a proxy
listener on the client that carries each connection to the server's ``svc``
service (an echo service unless another handler is given).

Failures arrive flat: a plugin's error raised somewhere inside the nodes' task
groups is re-raised on its own, not as exception groups nested ten deep.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from peerup.core.node import Node
from peerup.core.plugins import PluginHost, load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import ServiceSettings
from peerup.testing import Handler, echo_handler, echo_roundtrip, make_settings, proxy_listener, tcp_service

__all__ = ["Lab", "flat_errors", "plugin_host", "plugin_lab"]


@dataclass
class Lab:
    """What :func:`plugin_lab` started; all of it stops when the ``async with`` ends."""

    relay_addr: str
    server: Runtime
    server_node: Node
    client: Runtime
    client_node: Node
    #: The client's proxy listener on 127.0.0.1, forwarding to the server's ``svc``.
    port: int
    #: The local TCP service behind ``svc``, ``host:port``.
    service_addr: str

    async def roundtrip(self, payload: bytes) -> bytes:
        """Send ``payload`` through the tunnel, half-close, return all the service answered."""
        return await echo_roundtrip(self.port, payload)


def plugin_host(plugins: Iterable[object] = (), disabled: Iterable[str] = ()) -> PluginHost:
    """The built-ins (minus ``disabled``) plus ``plugins``, registered after them as ``--plugin`` would."""
    host = load_plugins(disabled=disabled)
    for index, plugin in enumerate(plugins):
        name = getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{index}"
        host.register(name, plugin, origin=name)
    return host


@asynccontextmanager
async def plugin_lab(
    tmp_path: Path,
    plugins: Iterable[object] = (),
    *,
    server_plugins: Iterable[object] | None = None,
    client_plugins: Iterable[object] | None = None,
    disabled: Iterable[str] = (),
    service: Handler = echo_handler,
    server_settings: dict[str, Any] | None = None,
    client_settings: dict[str, Any] | None = None,
) -> AsyncIterator[Lab]:
    """Start a relay, a node serving ``svc`` and a client with a proxy to it.

    :param plugins: registered on both the server and the client.
    :param server_plugins: / ``client_plugins``: registered on one side only
        (instead of ``plugins`` on that side).
    :param disabled: built-ins to leave out on both sides (``--disable-plugin``).
    :param server_settings: / ``client_settings``: extra settings for that node,
        as keyword values of :class:`~peerup.core.settings.Settings` (for
        example ``plugin={"idle": {"timeouts": {"svc": 2}}}``).
    """
    shared = list(plugins)
    server_extra = list(server_plugins) if server_plugins is not None else shared
    client_extra = list(client_plugins) if client_plugins is not None else shared
    with flat_errors():
        relay_runtime = Runtime(
            make_settings(tmp_path / "relay", relay={"listen": ["/ip4/127.0.0.1/tcp/0"]}),
            plugin_host(disabled=disabled),
        )
        async with relay_runtime.node("relay") as relay_node, tcp_service(service) as service_addr:
            relay_addr = relay_node.listen_addrs()[0]
            server_values = {"auth": {"allow_all": True}, **(server_settings or {})}
            server_config = make_settings(
                tmp_path / "server",
                relays=[relay_addr],
                services={"svc": ServiceSettings(name="svc", address=service_addr)},
                **server_values,
            )
            server = Runtime(server_config, plugin_host(server_extra, disabled))
            client = Runtime(
                make_settings(tmp_path / "client", relays=[relay_addr], **(client_settings or {})),
                plugin_host(client_extra, disabled),
            )
            async with server.node() as server_node, client.node() as client_node:
                server.expose(server_node, server_config.services)
                async with proxy_listener(client, client_node, server_node.peer_id) as port:
                    yield Lab(relay_addr, server, server_node, client, client_node, port, service_addr)


@contextlib.contextmanager
def flat_errors() -> Iterator[None]:
    """Re-raise the single real error inside nested exception groups on its own."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        real = [leaf for leaf in leaves if not isinstance(leaf, anyio.get_cancelled_exc_class())]
        if len(real) == 1:
            raise real[0] from None
        raise


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
