"""``proxy_stream`` wrapping the built-in copy: opt-in per-service idle timeout, and counters.

Why: the built-in has no idle timeout by default because SSH sessions sit idle
for hours and must live. Other services are not interactive (an inference
server, a database a batch job forgot to close): a tunnel left idle there holds
a relay circuit and a local socket for nothing. This plugin closes those after
the timeout named for that service, and only those; interactive services are
left alone unless listed. It also counts connections and bytes per service, so
an operator can see who uses what.

It does not copy bytes itself: it is a pluggy wrapper around ``proxy_stream``
and hands whichever plugin carries the bytes (the built-in half-close proxy,
or its replacement) streams that report every byte, through
``Answer.call(local=..., remote=...)``. It imports no other plugin.

Settings, ``[plugin.idle]``::

    timeouts = { llm = 300, db = 60 }   # service name -> seconds without traffic; unlisted: never

Timeouts apply on the serving side, where the service is known; closing there
closes the client's end too. The client side counts under ``"outbound"``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass, replace
from typing import Annotated, Any

import anyio
from anyio.abc import ByteStream
from peerup.core.hookcall import Answer
from peerup.core.hookspecs import hookimpl
from peerup.core.settings import PluginSettings, ServiceSettings, Settings
from peerup.core.streams import abort
from pydantic import Field

__all__ = ["Counters", "IdlePlugin", "IdleSettings"]

log = logging.getLogger("peerup.idle")

SECTION = "idle"
#: Counters key for tunnels opened by ``peerup proxy`` (the client side knows no service settings).
OUTBOUND = "outbound"


class IdleSettings(PluginSettings):
    """``[plugin.idle]``."""

    section = SECTION

    timeouts: dict[str, Annotated[float, Field(gt=0)]] = Field(
        {}, description="service name -> idle seconds; unlisted = no idle timeout"
    )

    def timeout_for(self, service: ServiceSettings | None) -> float | None:
        return self.timeouts.get(service.name) if service is not None else None


@dataclass
class Counters:
    """Totals for one service (or ``outbound``) since this process started."""

    connections: int = 0  # tunnels started
    open: int = 0  # tunnels running now
    idle_closed: int = 0  # tunnels this plugin closed for idleness
    bytes_up: int = 0  # local side -> peer
    bytes_down: int = 0  # peer -> local side


class _Watched(ByteStream):
    """A stream that reports every byte it carries, so idleness and totals are seen, not guessed."""

    def __init__(self, inner: ByteStream, on_receive: Callable[[int], None], on_send: Callable[[], None]) -> None:
        self._inner = inner
        self._on_receive = on_receive
        self._on_send = on_send

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await self._inner.receive(max_bytes)
        self._on_receive(len(data))
        return data

    async def send(self, item: bytes) -> None:
        await self._inner.send(item)
        self._on_send()

    async def send_eof(self) -> None:
        await self._inner.send_eof()

    async def aclose(self) -> None:
        await self._inner.aclose()

    @property
    def extra_attributes(self) -> Any:
        return self._inner.extra_attributes


class IdlePlugin:
    """The ``idle`` entry point; one per process, holding the counters."""

    settings_model = IdleSettings

    def __init__(self) -> None:
        self._counters: defaultdict[str, Counters] = defaultdict(Counters)

    def counters(self) -> dict[str, Counters]:
        """A snapshot: service name (or ``outbound``) -> totals."""
        return {key: replace(value) for key, value in self._counters.items()}

    @hookimpl(wrapper=True)
    def proxy_stream(
        self, local: ByteStream, remote: ByteStream, settings: Settings, service: ServiceSettings | None
    ) -> Generator[None, Answer[bool], Awaitable[bool | None]]:
        carriers = yield
        return self._watched(carriers, local, remote, settings, service)

    async def _watched(
        self,
        carriers: Answer[bool],
        local: ByteStream,
        remote: ByteStream,
        settings: Settings,
        service: ServiceSettings | None,
    ) -> bool | None:
        idle = settings.plugin_settings(IdleSettings).timeout_for(service)
        key = service.name if service is not None else OUTBOUND
        total = self._counters[key]
        total.connections += 1
        total.open += 1
        last = [anyio.current_time()]
        up, down = [0], [0]

        def touched() -> None:
            last[0] = anyio.current_time()

        def received(into: list[int], counter: str) -> Callable[[int], None]:
            def note(size: int) -> None:
                into[0] += size
                setattr(total, counter, getattr(total, counter) + size)
                touched()

            return note

        watched_local = _Watched(local, received(up, "bytes_up"), touched)
        watched_remote = _Watched(remote, received(down, "bytes_down"), touched)
        outcome = "closed"
        handled: bool | None = None
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    if idle is not None:
                        tg.start_soon(_watch_idle, idle, last, scope)
                    handled = await carriers.call(local=watched_local, remote=watched_remote)
                    tg.cancel_scope.cancel()
            if scope.cancelled_caught:
                # The built-in proxy aborted both streams on its way out; a replacement
                # might not have, and a tunnel cut for idleness must not stay half-open.
                with anyio.CancelScope(shield=True):
                    await abort(local)
                    await abort(remote)
                outcome = f"closed after {idle:g} s idle"
                total.idle_closed += 1
        finally:
            total.open -= 1
        log.info(
            "%s tunnel %s: %d bytes up, %d down; %s totals: %d connections (%d open), %d bytes up, %d down",
            key,
            outcome,
            up[0],
            down[0],
            key,
            total.connections,
            total.open,
            total.bytes_up,
            total.bytes_down,
        )
        return True if scope.cancelled_caught else handled


async def _watch_idle(idle: float, last: list[float], scope: anyio.CancelScope) -> None:
    """Sleep until ``idle`` seconds passed without a byte either way, then end the tunnel."""
    while True:
        remaining = last[0] + idle - anyio.current_time()
        if remaining <= 0:
            scope.cancel()
            return
        await anyio.sleep(remaining)
