"""The built-in transport plugin: libp2p hosts, relay, DHT discovery and dialing.

Registered through the ``peerup.plugins`` entry point like any third-party
plugin. Importing it changes nothing in libp2p: the patches (patches.py) are
applied when a node opens.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path

from anyio.abc import ByteStream
from libp2p.peer.id import ID

from peerup.core.hookspecs import IdentityMode, hookimpl
from peerup.core.node import Node, PeerRecord
from peerup.core.retry import RetryPolicy
from peerup.core.settings import Settings
from peerup.plugins.libp2p.identity import create_identity, load_identity, peer_id_of
from peerup.plugins.libp2p.node import Libp2pNode, open_libp2p_node, relay_circuit_addr
from peerup.plugins.libp2p.node import parse_peer_id as _parse_peer_id

log = logging.getLogger("peerup.libp2p")

#: A DHT lookup never takes longer than this; an unanswered lookup means "not found".
DHT_LOOKUP_TIMEOUT = 5.0


@hookimpl
def open_node(settings: Settings, role: str, retry_policy: RetryPolicy) -> AbstractAsyncContextManager[Node]:
    return open_libp2p_node(settings, role, delays_factory=partial(endless_delays, retry_policy, settings))


def endless_delays(policy: RetryPolicy, settings: Settings) -> Iterator[float]:
    """The policy's delays, then its last delay forever: a node never gives up on its relay."""
    last = settings.retry.max_delay
    for delay in policy.delays():
        last = delay
        yield delay
    while True:
        yield last


@hookimpl
async def discover_peer(node: Node, peer_id: str, settings: Settings) -> PeerRecord | None:
    """The seed's ConnectToPeer: connection, then peerstore, then DHT, then relay circuit."""
    if not isinstance(node, Libp2pNode):
        return None
    peer = ID.from_base58(node.parse_peer_id(peer_id))
    if node.is_connected(peer):
        log.info("peer %s: already connected", peer_id)
        return PeerRecord(peer_id, tuple(_known_addrs(node, peer)), source="connected", connected=True)
    addrs = _known_addrs(node, peer)
    source = "peerstore"
    if not addrs:
        addrs = await node.find_peer(peer, DHT_LOOKUP_TIMEOUT)
        source = "dht"
    if all("/p2p-circuit" in a for a in addrs) and node.relays:
        # Only relayed reach (or none known): go through our own relays too, they
        # are where a NATed peer reserves.
        ours = [relay_circuit_addr(r.addr, peer_id) for r in node.relays]
        if not addrs:
            source = "relay"
        addrs = addrs + [a for a in ours if a not in addrs]
    if not addrs:
        log.info("peer %s: not found (no connection, no known address, DHT had nothing)", peer_id)
        return None
    log.info("peer %s: %d address(es) from %s", peer_id, len(addrs), source)
    return PeerRecord(peer_id, tuple(addrs), source=source)


@hookimpl
async def dial(node: Node, peer: PeerRecord, protocol: str, settings: Settings) -> ByteStream | None:
    """Reuse a connection, else direct addresses, then circuits; then open ``protocol``."""
    if not isinstance(node, Libp2pNode):
        return None
    return await node.open_stream(peer.peer_id, peer.addrs, protocol)


def _known_addrs(node: Libp2pNode, peer: ID) -> list[str]:
    try:
        addrs = node.host.get_peerstore().addrs(peer)
    except Exception:  # noqa: BLE001 - PeerStoreError and friends: never heard of it
        return []
    suffix = f"/p2p/{peer.to_base58()}"
    out = []
    for addr in addrs:
        text = str(addr)
        out.append(text if text.endswith(suffix) else text + suffix)
    return out


@hookimpl
def parse_peer_id(text: str) -> str:
    return _parse_peer_id(text)


@hookimpl
def identity(home: Path, mode: IdentityMode) -> str:
    if mode == "create":
        return create_identity(home)
    return peer_id_of(load_identity(home))
