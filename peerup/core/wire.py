"""The one line a serving node sends before any service bytes.

The serving node dials its local service first and then answers ``OK`` or
``ERR <code> <message>``, so the client can say "refused" or "timed out" in
one line instead of seeing a silent close (issue #4). Anything after the line
is service data and is kept (``BufferedByteStream``), so no byte is lost.
"""

from __future__ import annotations

import anyio
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteStream

from peerup.core.errors import PeerupError, ServiceError

MAX_LINE = 1024
CODES = frozenset({"unknown-service", "refused", "timeout", "unauthorized", "busy", "error"})


async def send_ok(stream: ByteStream) -> None:
    await stream.send(b"OK\n")


async def send_error(stream: ByteStream, code: str, message: str) -> None:
    assert code in CODES, code
    line = f"ERR {code} {message}".replace("\n", " ")[: MAX_LINE - 1]
    await stream.send(line.encode() + b"\n")


async def read_status(stream: ByteStream, service: str) -> BufferedByteStream:
    """Read the status line; return a stream that still holds any bytes after it."""
    buffered = BufferedByteStream(stream)
    try:
        line = await buffered.receive_until(b"\n", MAX_LINE)
    except anyio.IncompleteRead as exc:
        raise PeerupError(f"service {service!r}: the peer closed the stream before answering") from exc
    except anyio.DelimiterNotFound as exc:
        raise PeerupError(f"service {service!r}: the peer sent a malformed answer (no status line)") from exc
    text = line.decode("utf-8", "replace")
    if text == "OK":
        return buffered
    parts = text.split(" ", 2)
    if len(parts) == 3 and parts[0] == "ERR" and parts[1] in CODES:
        raise ServiceError(parts[1], f"service {service!r}: {parts[2]}")
    raise PeerupError(f"service {service!r}: the peer sent a malformed answer: {text[:80]!r}")
