"""``peerup`` with one extra discovery plugin: a peer's address given on the command line.

    python -m benchmarks.static_peer PEER_MULTIADDR -- <peerup arguments>

The benchmarks pin the path a tunnel takes instead of leaving it to what
discovery and hole punching decide on one machine. This launcher registers a ``discover_peer`` implementation that
answers with the given ``/ip4/.../tcp/.../p2p/ID`` for that peer; it is asked
before the built-in one, the way any ``--plugin`` discovery plugin would be.
Everything else is the real ``peerup`` command.
"""

from __future__ import annotations

import sys

from peerup import cli
from peerup.core.hookspecs import hookimpl
from peerup.core.node import PeerRecord


class StaticDiscovery:
    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.peer_id = addr.rsplit("/p2p/", 1)[1]

    @hookimpl
    async def discover_peer(self, node: object, peer_id: str, settings: object) -> PeerRecord | None:
        if peer_id != self.peer_id:
            return None
        return PeerRecord(peer_id, (self.addr,), source="static")


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    plugin = StaticDiscovery(sys.argv[1])
    original = cli._plugins

    def plugins(settings):  # type: ignore[no-untyped-def]
        host = original(settings)
        host.register("static-peer", plugin, origin="benchmarks.static_peer")
        return host

    cli._plugins = plugins  # type: ignore[assignment, unused-ignore]
    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
