"""The status line a serving node sends first: hostile or broken answers, no lost bytes."""

from __future__ import annotations

import anyio
import pytest
from anyio.abc import SocketStream

from peerup.core import wire
from peerup.core.errors import PeerupError, ServiceError
from peerup.testing import tcp_pair

pytestmark = pytest.mark.anyio


async def answered(answer: bytes, close: bool = True) -> tuple[SocketStream, SocketStream]:
    """(client, server) ends of a real TCP connection; the server has sent ``answer``."""
    client, server = await tcp_pair()
    if answer:
        await server.send(answer)
    if close:
        await server.send_eof()
    return client, server


async def test_ok_keeps_the_bytes_that_follow_it() -> None:
    client, server = await answered(b"OK\nSSH-2.0-OpenSSH_9.2\r\n", close=False)
    async with client, server:
        stream = await wire.read_status(client, "ssh")
        assert await stream.receive() == b"SSH-2.0-OpenSSH_9.2\r\n"


async def test_error_line_becomes_a_service_error_with_its_code() -> None:
    client, server = await answered(b"ERR refused local service 127.0.0.1:22 refused the connection\n")
    async with client, server:
        with pytest.raises(ServiceError) as info:
            await wire.read_status(client, "ssh")
    assert info.value.code == "refused"
    assert str(info.value) == "service 'ssh': local service 127.0.0.1:22 refused the connection"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"", "the peer closed the stream before answering"),
        (b"OK", "the peer closed the stream before answering"),  # truncated
        (b"X" * 5000, "malformed answer (no status line)"),  # oversized: bounded at 1024 bytes
        (b"ERR teapot short and stout\n", "malformed answer: 'ERR teapot short and stout'"),
        (b"\xff\xfe\x00garbage\n", "malformed answer"),
    ],
)
async def test_broken_answers_are_one_line_errors(answer: bytes, expected: str) -> None:
    client, server = await answered(answer)
    async with client, server:
        with anyio.fail_after(5), pytest.raises(PeerupError) as info:
            await wire.read_status(client, "ssh")
    assert type(info.value) is PeerupError  # not a ServiceError: the peer never answered a status
    assert expected in str(info.value)
    assert "\n" not in str(info.value)
