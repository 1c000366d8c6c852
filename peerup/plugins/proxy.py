"""Built-in ``proxy_stream``: a half-close bidirectional copy (seed ADR-A01) that never fakes a clean end.

EOF from one side becomes ``send_eof`` (a FIN) toward the other while the other
direction keeps flowing, so ``ssh host cmd < file`` and HTTP/1.0 clients that
shut their write side still get the whole reply. When both directions ended
cleanly both streams are closed cleanly. When anything else ends the tunnel
(one side broke or reset, the peer was revoked, shutdown gave up draining, an
idle timeout) both sides are *aborted*: the local application gets a TCP reset
and the peer a stream reset, because a FIN after part of a transfer is silent
data loss for any protocol without its own framing (docs/adr/0008).
"""

from __future__ import annotations

import contextlib
import logging
import math

import anyio
from anyio.abc import ByteStream

from peerup.core.hookspecs import hookimpl
from peerup.core.settings import ServiceSettings, Settings
from peerup.core.streams import abort, was_reset

log = logging.getLogger("peerup.proxy")

#: Most bytes per read on either side. 256 KiB lets one read take several
#: 64 KiB yamux frames at once (fewer awaits per MB); see docs/performance.md.
CHUNK = 256 * 1024
#: First and smallest read size. A read holds its bytes until the other side
#: took them, so what 1000 tunnels hold at once is 1000 reads; small messages
#: (RPC, keystrokes) never need more, and a recv() of 256 KiB for 64 bytes
#: costs a 256 KiB allocation each time. A read that fills the size doubles
#: it (bulk reaches CHUNK after four reads); one under a quarter halves it.
FIRST_CHUNK = 16 * 1024

#: How often a tunnel checks whether its TCP peer reset the connection while
#: nothing is reading from it (see :meth:`Tunnel.watch`).
RESET_CHECK_INTERVAL = 2.0

#: Errors that mean "the other end went away", not a bug.
BROKEN = (anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError, OSError)


class Tunnel:
    """Counts bytes and activity for logs and the optional idle timeout."""

    def __init__(self) -> None:
        self.up = 0  # local -> remote
        self.down = 0  # remote -> local
        self.last_activity = anyio.current_time()
        self.eof_to_local = False

    async def pump(self, source: ByteStream, sink: ByteStream, upward: bool) -> None:
        size = FIRST_CHUNK
        while True:
            try:
                data = await source.receive(size)
            except anyio.EndOfStream:
                break
            if len(data) >= size:
                size = min(size * 2, CHUNK)
            elif len(data) < size >> 2:
                size = max(size >> 1, FIRST_CHUNK)
            await sink.send(data)
            self.last_activity = anyio.current_time()
            if upward:
                self.up += len(data)
            else:
                self.down += len(data)
        with contextlib.suppress(*BROKEN):  # the sink already closed: nothing left to tell it
            await sink.send_eof()
        if not upward:
            self.eof_to_local = True

    async def watch(self, local: ByteStream, idle: float | None, scope: anyio.CancelScope) -> None:
        """The idle timeout, if any, and a reset of the local TCP peer while the upward copy is stuck.

        One task for both, since every open tunnel has it (a task and its
        cancel scopes are most of what an idle tunnel costs in memory).

        When the remote side does not take data (a service that never reads),
        the upward copy waits in ``send`` and never reads the local socket
        again, so a client that gives up and resets would leave the tunnel,
        its stream and its service connection open forever. The kernel knows:
        the socket's TCP state is CLOSE. A FIN is not enough to tell (it may be
        a half-close still waiting for the reply), so only a reset counts, and
        only before our own FIN went to the local side (after it, CLOSE is the
        normal end of a two-way close).
        """
        while True:
            now = anyio.current_time()
            wake = now + RESET_CHECK_INTERVAL
            if idle is not None:
                quiet_until = self.last_activity + idle
                if quiet_until <= now:
                    log.info("tunnel idle for %.0f s: closing", idle)
                    scope.cancel()
                    return
                wake = min(wake, quiet_until)
            await anyio.sleep(wake - now)
            if not self.eof_to_local and was_reset(local):
                raise anyio.BrokenResourceError("the local connection was reset")


@hookimpl(trylast=True)
async def proxy_stream(
    local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
) -> bool:
    tunnel = Tunnel()
    idle = settings.idle_timeout(service)
    finished = False
    outcome = "cut"
    ended = 0
    try:
        # One task group and two new tasks per tunnel (the upward copy and the
        # watcher); the downward copy runs in this task. An idle tunnel's
        # memory is mostly its tasks and cancel scopes (1000 open tunnels).
        async with anyio.create_task_group() as tg:

            def one_ended() -> None:
                nonlocal ended, finished
                ended += 1
                if ended == 2:
                    finished = True
                    tg.cancel_scope.cancel()  # the watcher

            async def upward() -> None:
                await tunnel.pump(local, remote, True)
                one_ended()

            limit = idle if idle is not None and math.isfinite(idle) else None
            tg.start_soon(tunnel.watch, local, limit, tg.cancel_scope)
            tg.start_soon(upward)
            await tunnel.pump(remote, local, False)
            one_ended()
    except* BROKEN as group:
        outcome = f"aborted ({group.exceptions[0]})"
    finally:
        if finished:
            outcome = "closed"
            with anyio.CancelScope(shield=True):
                await remote.aclose()
                await local.aclose()
        else:
            await abort(remote)
            await abort(local)
        log.info("tunnel %s: %d bytes up, %d bytes down", outcome, tunnel.up, tunnel.down)
    return True
