"""What ``peerup relay serve`` adds when run as a service: metrics, /healthz, sd_notify."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from peerup.core.node import Node
from peerup.core.runtime import Runtime
from peerup.daemon.metrics import serve_relay_metrics
from peerup.daemon.notify import Notifier


async def serve_relay_extras(runtime: Runtime, node: Node, out: Callable[[str], None]) -> None:
    """Serve metrics if enabled, tell systemd READY (a relay is ready once it listens); until cancelled."""
    notifier = Notifier()
    async with anyio.create_task_group() as tasks:
        if runtime.settings.metrics.enabled:
            out(f"metrics on {await serve_relay_metrics(tasks, runtime, node)}/metrics")
        notifier.send("READY=1", f"STATUS=relay listening on {len(node.listen_addrs())} addresses")
        interval = notifier.watchdog_interval()
        if interval is not None:
            tasks.start_soon(notifier.watchdog, interval)
        try:
            await anyio.sleep_forever()
        finally:
            notifier.send("STOPPING=1")
