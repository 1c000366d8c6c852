"""What both sides of a tunnel share: the byte copy and the count of open tunnels.

The client side (a proxied local connection) and the serving side (a stream
from a peer) end the same way: the ``proxy_stream`` hook carries the bytes,
counted for ``peerup tunnels`` and metrics. The count of open tunnels is what
a drain waits for when the process is asked to stop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio
from anyio.abc import ByteStream

from peerup.core.errors import PluginError
from peerup.core.plugins import PluginHost
from peerup.core.settings import ServiceSettings, Settings
from peerup.core.tunnels import TunnelRegistry


class Carrier:
    """Counts open tunnels (for drain) and hands their bytes to ``proxy_stream``."""

    def __init__(self, settings: Settings, plugins: PluginHost) -> None:
        self.settings = settings
        self.plugins = plugins
        #: Open forwards and connections, with byte counters (``peerup tunnels``, metrics).
        self.registry = TunnelRegistry()
        self._open_tunnels = 0
        self._idle = anyio.Event()
        self._idle.set()

    @contextmanager
    def tunnel(self) -> Iterator[None]:
        self._open_tunnels += 1
        self._idle = anyio.Event() if self._open_tunnels == 1 else self._idle
        try:
            yield
        finally:
            self._open_tunnels -= 1
            if self._open_tunnels == 0:
                self._idle.set()

    @property
    def open_tunnels(self) -> int:
        return self._open_tunnels

    async def drain(self, timeout: float) -> bool:
        """Wait for open tunnels to finish; ``False`` if some were still open at the deadline."""
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        return self._open_tunnels == 0

    async def carry(self, local: ByteStream, remote: ByteStream, service: ServiceSettings | None) -> None:
        local = self.registry.counted(local)
        handled = await self.plugins.proxy_stream(local, remote, self.settings, service)
        if handled is None:
            await anyio.aclose_forcefully(local)
            await anyio.aclose_forcefully(remote)
            raise PluginError("no active plugin provides proxy_stream; is the built-in 'proxy' disabled?")
