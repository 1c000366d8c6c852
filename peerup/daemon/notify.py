"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``): READY, WATCHDOG, STOPPING, STATUS.

Does nothing unless systemd (or a test) set ``NOTIFY_SOCKET``. READY=1 waits for
a relay slot when relays are configured: before that, the node is up but
nobody behind another NAT can reach it, and units ordered ``After=`` it would
start too early. WATCHDOG=1 comes from a task of the daemon's own event loop,
so a loop that hangs stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os

import anyio
import sdnotify

log = logging.getLogger("peerup.daemon")


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def send(self, *states: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(states))

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half of ``WatchdogSec`` (systemd's advice), when this process is the one watched."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6

    async def watchdog(self, interval: float) -> None:
        """WATCHDOG=1 every ``interval`` seconds, as long as the event loop runs this task."""
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(interval)
