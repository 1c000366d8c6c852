"""Built-in ``proxy_stream``: a half-close bidirectional copy (seed ADR-A01).

EOF from one side becomes ``send_eof`` (a FIN) toward the other while the other
direction keeps flowing, so ``ssh host cmd < file`` and HTTP/1.0 clients that
shut their write side still get the whole reply. When both directions are done
both streams are closed; when one side breaks, the other is closed at once
instead of waiting for an idle timeout that, by design, does not exist.
"""

from __future__ import annotations

import contextlib
import logging
import math

import anyio
from anyio.abc import ByteStream

from peerup.core.hookspecs import hookimpl
from peerup.core.settings import ServiceSettings, Settings

log = logging.getLogger("peerup.proxy")

#: Bytes per read on either side. 256 KiB lets one read take several 64 KiB
#: yamux frames at once (fewer awaits per MB); see docs/performance.md.
CHUNK = 256 * 1024

#: Errors that mean "the other end went away", not a bug.
BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError)


class Tunnel:
    """Counts bytes and activity for logs and the optional idle timeout."""

    def __init__(self) -> None:
        self.up = 0  # local -> remote
        self.down = 0  # remote -> local
        self.last_activity = anyio.current_time()

    async def pump(self, source: ByteStream, sink: ByteStream, upward: bool) -> None:
        while True:
            try:
                data = await source.receive(CHUNK)
            except anyio.EndOfStream:
                break
            await sink.send(data)
            self.last_activity = anyio.current_time()
            if upward:
                self.up += len(data)
            else:
                self.down += len(data)
        with contextlib.suppress(*BROKEN):  # the sink already closed: nothing left to tell it
            await sink.send_eof()

    async def watch_idle(self, idle: float, scope: anyio.CancelScope) -> None:
        while True:
            remaining = self.last_activity + idle - anyio.current_time()
            if remaining <= 0:
                log.info("tunnel idle for %.0f s: closing", idle)
                scope.cancel()
                return
            await anyio.sleep(remaining)


@hookimpl(trylast=True)
async def proxy_stream(
    local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
) -> bool:
    tunnel = Tunnel()
    idle = settings.idle_timeout(service)
    outcome = "closed"
    try:
        async with anyio.create_task_group() as tg:
            if idle is not None and math.isfinite(idle):
                tg.start_soon(tunnel.watch_idle, idle, tg.cancel_scope)

            async def both() -> None:
                async with anyio.create_task_group() as inner:
                    inner.start_soon(tunnel.pump, local, remote, True)
                    inner.start_soon(tunnel.pump, remote, local, False)
                tg.cancel_scope.cancel()

            tg.start_soon(both)
    except* BROKEN as group:
        outcome = f"aborted ({group.exceptions[0]!r})"
    finally:
        with anyio.CancelScope(shield=True):
            await remote.aclose()
            await local.aclose()
    log.info("tunnel %s: %d bytes up, %d bytes down", outcome, tunnel.up, tunnel.down)
    return True
