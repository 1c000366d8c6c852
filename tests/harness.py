"""Real nodes for integration tests: a relay, serving nodes and clients in one process.

Everything is real: libp2p hosts on 127.0.0.1, the built-in plugins loaded from
the entry points, the core runtime, and TCP services on loopback sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream

from peerup.core.node import Node
from peerup.core.plugins import load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import ServiceSettings, Settings
from peerup.plugins.libp2p.identity import create_identity

LOCAL = "/ip4/127.0.0.1/tcp/0"
#: Short delays so retry tests take seconds, not minutes; the shape (doubling, cap) is the seed's.
FAST_RETRY = {"retries": 3, "initial": 0.2, "multiplier": 2.0, "max_delay": 1.0}


def make_settings(home: Path, **values: Any) -> Settings:
    if not (home / "identity.key").exists():
        create_identity(home)
    values.setdefault("listen", [LOCAL])
    values.setdefault("retry", FAST_RETRY)
    return Settings(home=home, **values)


@asynccontextmanager
async def relay(tmp_path: Path, listen: str = LOCAL) -> AsyncIterator[str]:
    """A relay + DHT bootstrap node; yields its dialable address."""
    settings = make_settings(tmp_path / "relay", relay={"listen": [listen]})
    runtime = Runtime(settings, load_plugins())
    async with runtime.node("relay") as node:
        yield node.listen_addrs()[0]


@asynccontextmanager
async def serving_node(
    tmp_path: Path, relay_addr: str, services: dict[str, str], name: str = "server", **values: Any
) -> AsyncIterator[tuple[Runtime, Node]]:
    """A node exposing ``services`` (name -> host:port) and holding a relay slot."""
    settings = make_settings(
        tmp_path / name,
        relays=[relay_addr],
        services={key: ServiceSettings(name=key, address=addr) for key, addr in services.items()},
        **values,
    )
    runtime = Runtime(settings, load_plugins())
    async with runtime.node() as node:
        runtime.expose(node, settings.services)
        yield runtime, node


@asynccontextmanager
async def client_node(
    tmp_path: Path, relay_addr: str, name: str = "client", **values: Any
) -> AsyncIterator[tuple[Runtime, Node]]:
    settings = make_settings(tmp_path / name, relays=[relay_addr], **values)
    runtime = Runtime(settings, load_plugins())
    async with runtime.node() as node:
        yield runtime, node


Handler = Callable[[SocketStream], Awaitable[None]]


@asynccontextmanager
async def tcp_service(handler: Handler) -> AsyncIterator[str]:
    """A real TCP service on 127.0.0.1; yields ``host:port``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def echo_handler(stream: SocketStream) -> None:
    """Echo until EOF, then half-close: the shape of a request/response service."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def read_all(stream: Any) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b"".join(chunks)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
