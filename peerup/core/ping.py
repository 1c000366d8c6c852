"""``peerup ping``'s protocol and what it reports.

Every peerup node answers the echo protocol; the pinging side (``Client.ping``)
opens one stream per echo over the existing connection, so the reported path
is the one a new tunnel would take at that moment.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import anyio
from anyio.abc import ByteStream

#: Echo protocol every peerup node answers; ``peerup ping`` measures round trips on it.
PING_PROTOCOL = "/peerup/ping/1.0.0"
PING_SIZE = 32


@dataclass
class PingStats:
    peer_id: str
    first_path: str
    source: str
    rtts: list[float | None] = field(default_factory=list)
    #: The path of each stream that was opened, in order.
    paths: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The path the last reply took (the one a new tunnel gets now)."""
        return self.paths[-1] if self.paths else self.first_path

    @property
    def received(self) -> list[float]:
        return [rtt for rtt in self.rtts if rtt is not None]

    def as_json(self, peer: str) -> dict[str, object]:
        """``peerup ping --json``: stable field names (docs/operations.md), times in milliseconds."""
        sent, got = len(self.rtts), len(self.received)
        ms = [rtt * 1000 for rtt in self.received]
        return {
            "peer": peer,
            "peer_id": self.peer_id,
            "path": self.path,
            "first_path": self.first_path,
            "paths": self.paths,
            "source": self.source,
            "sent": sent,
            "received": got,
            "loss_percent": round(100.0 * (sent - got) / sent, 1) if sent else 0.0,
            "rtt_ms": [round(rtt * 1000, 3) if rtt is not None else None for rtt in self.rtts],
            "min_ms": round(min(ms), 3) if ms else None,
            "avg_ms": round(statistics.fmean(ms), 3) if ms else None,
            "max_ms": round(max(ms), 3) if ms else None,
            "mdev_ms": round(statistics.pstdev(ms), 3) if ms else None,
        }

    def summary(self) -> str:
        sent, got = len(self.rtts), len(self.received)
        loss = 100.0 * (sent - got) / sent if sent else 0.0
        line = f"{sent} sent, {got} received, {loss:.0f}% loss"
        if got:
            ms = [rtt * 1000 for rtt in self.received]
            dev = statistics.pstdev(ms)
            line += f", rtt min/avg/max/mdev = {min(ms):.2f}/{statistics.fmean(ms):.2f}/{max(ms):.2f}/{dev:.2f} ms"
        return line


async def answer_ping(stream: ByteStream, remote_peer: str) -> None:
    """The echo side of ``peerup ping``: what arrives goes back, until the pinger half-closes."""
    async with stream:
        try:
            while True:
                await stream.send(await stream.receive(PING_SIZE))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass
