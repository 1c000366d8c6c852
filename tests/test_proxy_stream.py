"""The built-in half-close proxy over real TCP sockets (no transport in between).

Both ends are real loopback connections, so what is asserted is what a client
of ``peerup proxy`` sees: EOF crossing as a FIN, the other direction still
flowing, and an abort on one side reaching the other.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from peerup.core.settings import load_settings
from peerup.plugins.proxy import proxy_stream
from peerup.testing import tcp_pair

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def proxied(home: Path) -> AsyncIterator[tuple[SocketStream, SocketStream]]:
    """(app, service): bytes from ``app`` reach ``service`` through proxy_stream."""
    app, local = await tcp_pair()
    remote, service = await tcp_pair()
    settings = load_settings(home)
    async with anyio.create_task_group() as tg:
        tg.start_soon(proxy_stream, local, remote, settings, None)
        yield app, service
    await app.aclose()
    await service.aclose()


async def read_all(stream: SocketStream) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return b"".join(chunks)


async def test_half_close_keeps_the_reply_flowing(home: Path) -> None:
    async with proxied(home) as (app, service):
        await app.send(b"request")
        await app.send_eof()
        with anyio.fail_after(5):
            assert await read_all(service) == b"request"  # the FIN crossed the proxy
            reply = os.urandom(512 * 1024)
            await service.send(reply)  # the other direction still works after EOF
            await service.send_eof()
            assert await read_all(app) == reply


async def test_large_transfer_both_ways_is_byte_exact(home: Path) -> None:
    size = 8 * 1024 * 1024
    up, down = os.urandom(size), os.urandom(size)

    async def send_then_eof(stream: SocketStream, data: bytes) -> None:
        for start in range(0, len(data), 65536):
            await stream.send(data[start : start + 65536])
        await stream.send_eof()

    async with proxied(home) as (app, service):
        results: dict[str, bytes] = {}

        async def collect(name: str, stream: SocketStream) -> None:
            results[name] = await read_all(stream)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_then_eof, app, up)
                tg.start_soon(send_then_eof, service, down)
                tg.start_soon(collect, "service", service)
                tg.start_soon(collect, "app", app)
    assert hashlib.sha256(results["service"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(results["app"]).digest() == hashlib.sha256(down).digest()


@pytest.mark.parametrize("side", ["app", "service"])
async def test_abort_on_one_side_closes_the_other(home: Path, side: str) -> None:
    async with proxied(home) as (app, service):
        victim, survivor = (app, service) if side == "app" else (service, app)
        await victim.send(b"x")
        with anyio.fail_after(5):
            await survivor.receive()
        # An abortive close (RST), as a crashing client or service produces.
        import socket
        import struct

        raw = victim.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await victim.aclose()
        with anyio.fail_after(5):
            # A reset, passed on as a reset: a clean EOF would tell the survivor the
            # exchange was complete (ADR 0008).
            assert await ending(survivor) == "reset"


async def ending(stream: SocketStream) -> str:
    """Read to the end: ``"eof"`` for a clean end, ``"reset"`` for a broken connection."""
    try:
        while True:
            await stream.receive()
    except anyio.EndOfStream:
        return "eof"
    except (anyio.BrokenResourceError, ConnectionError):
        return "reset"


async def test_a_client_that_resets_while_the_service_never_reads_ends_the_tunnel(home: Path) -> None:
    """The upward copy is stuck sending to a service that never reads; the client gives up with RST.

    Nothing reads the client's socket any more, so only its TCP state shows it is
    gone; the tunnel must notice and let go of the service's connection too.
    """
    import socket
    import struct

    from peerup.plugins.proxy import RESET_CHECK_INTERVAL

    async with proxied(home) as (app, service):
        chunk = b"x" * 65536
        with anyio.move_on_after(2):  # until every buffer on the way is full
            while True:
                await app.send(chunk)
        raw = app.extra(anyio.abc.SocketAttribute.raw_socket)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await app.aclose()
        started = anyio.current_time()
        with anyio.fail_after(RESET_CHECK_INTERVAL * 2 + 3):
            # The service drains what was already sent, then sees the tunnel reset.
            assert await ending(service) == "reset"
        assert anyio.current_time() - started < RESET_CHECK_INTERVAL * 2 + 3


async def test_idle_timeout_when_configured(home: Path) -> None:
    (home / "config.toml").write_text("[timeouts]\nidle = 0.3\n")
    app, local = await tcp_pair()
    remote, service = await tcp_pair()
    settings = load_settings(home)
    with anyio.fail_after(5):
        assert await proxy_stream(local, remote, settings, None) is True
        # Closed for idleness is a cut, not a finished exchange: both ends see a reset.
        assert await ending(app) == "reset"
        assert await ending(service) == "reset"
    await app.aclose()
    await service.aclose()
