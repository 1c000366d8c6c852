"""Every change peerup makes to py-libp2p 0.8.1, in one registry (ADR 0012).

Why a registry: the changes used to be applied from six modules, some at
import time, so nobody could say which were in force, switch one off to see
whether it is still needed, or check that the docs list them all. Each
:class:`Patch` here names the upstream code it replaces (``file:line`` under
``.venv/lib/python3.11/site-packages/``), why, and the test that fails
without it (``tests/test_libp2p_patches.py`` switches each off in turn and
runs that test; ``docs/libp2p-workarounds.md`` lists exactly these entries,
which ``tests/test_docs.py`` checks).

Two scopes:

* ``process``: module or class attributes of libp2p replaced for the whole
  process. :func:`apply_all` installs them when the first node opens (not at
  import), once; :func:`revert` puts upstream's objects back.
* ``host``: applied by ``node.open_libp2p_node`` to each host it builds, if
  :func:`enabled`; reverting one means hosts opened afterwards do without it.

``PEERUP_PATCHES_OFF=name,...`` (read once, when this module is imported)
switches patches off for a whole process: the meta-test and
``python -m benchmarks.ab`` use it; nothing else should.
``PEERUP_FASTPATH_SKIP``, the benchmarks' older name, is read too.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network import swarm
from libp2p.network.stream.net_stream import NetStream
from libp2p.protocol_muxer import multiselect_client
from libp2p.relay.circuit_v2 import protocol as relay_protocol
from libp2p.relay.circuit_v2 import transport as relay_transport
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.security.noise import io as noise_io
from libp2p.stream_muxer.yamux import yamux
from libp2p.transport.tcp import tcp
from libp2p.transport.websocket import listener as ws_listener
from libp2p.transport.websocket.connection import P2PWebSocketConnection

from peerup.plugins.libp2p import fastpath, relay_circuits, relay_limit, transports, workarounds

log = logging.getLogger("peerup.libp2p.patches")

OFF_ENV = "PEERUP_PATCHES_OFF"
#: The benchmarks' name for the same switch (benchmarks/ab.py).
LEGACY_OFF_ENV = "PEERUP_FASTPATH_SKIP"
#: Where the ``upstream`` paths below are, relative to the repository.
SITE_PACKAGES = ".venv/lib/python3.11/site-packages"


class Change(Protocol):
    """One reversible change to an upstream object."""

    def install(self) -> None: ...
    def uninstall(self) -> None: ...
    def installed(self) -> bool: ...


class Swap:
    """Replace ``owner.attribute`` (a libp2p module or class) with ``replacement``; remember upstream's."""

    def __init__(self, owner: object, attribute: str, replacement: object) -> None:
        self.owner = owner
        self.attribute = attribute
        self.replacement = replacement
        self.original = getattr(owner, attribute)

    def install(self) -> None:
        setattr(self.owner, self.attribute, self.replacement)

    def uninstall(self) -> None:
        setattr(self.owner, self.attribute, self.original)

    def installed(self) -> bool:
        return getattr(self.owner, self.attribute) is self.replacement


class LogFilters:
    """Add :class:`workarounds.DemoteNoise` filters to upstream loggers (nothing to swap: logging is global)."""

    def __init__(self, noise: dict[str, tuple[str, ...]]) -> None:
        self.filters = {name: workarounds.DemoteNoise(prefixes) for name, prefixes in noise.items()}

    def install(self) -> None:
        for name, f in self.filters.items():
            logger = logging.getLogger(name)
            if f not in logger.filters:
                logger.addFilter(f)

    def uninstall(self) -> None:
        for name, f in self.filters.items():
            logging.getLogger(name).removeFilter(f)

    def installed(self) -> bool:
        return all(f in logging.getLogger(name).filters for name, f in self.filters.items())


@dataclass(frozen=True)
class Patch:
    """One change to libp2p 0.8.1; ``label`` is its row in docs/libp2p-workarounds.md."""

    name: str
    label: str
    scope: Literal["process", "host"]
    upstream: tuple[str, ...]
    why: str
    #: pytest node id that fails with this patch off; None when no test can show it (see ``evidence``).
    test: str | None
    #: For entries without a failing test: what shows the need instead (a benchmark, a measurement).
    evidence: str = ""
    changes: tuple[Change, ...] = field(default=(), repr=False)


def _kad_swaps() -> tuple[Change, ...]:
    return tuple(
        Swap(importlib.import_module(name), "PROTOCOL_ID", TProtocol(workarounds.PEERUP_KAD_PROTOCOL))
        for name in workarounds.KAD_MODULES
    )


def _fast(name: str, owner: object, attribute: str) -> Swap:
    return Swap(owner, attribute, fastpath.REPLACEMENTS[name])


_T = "tests/test_libp2p_workarounds.py::"
_F = "tests/test_libp2p_fastpath.py::"
_AB = "throughput only, no behaviour to test: `python -m benchmarks.ab` measures it off (docs/performance.md)"

REGISTRY: tuple[Patch, ...] = (
    Patch(
        "dht-protocol",
        "a",
        "process",
        ("libp2p/kad_dht/common.py:14", "libp2p/kad_dht/kad_dht.py:69", "libp2p/kad_dht/peer_routing.py:31"),
        "PROTOCOL_ID /ipfs/kad/1.0.0 is imported by name; KadDHT(protocol_prefix=...) never reaches the wire",
        _T + "test_a_dht_speaks_the_private_protocol",
        changes=_kad_swaps(),
    ),
    Patch(
        "happy-eyeballs",
        "b",
        "process",
        ("libp2p/network/swarm.py:92", "libp2p/network/swarm.py:936"),
        "host.connect() waits a fixed 250 ms after dialing the last address",
        _T + "test_b_connect_skips_the_250ms_happy_eyeballs_wait",
        changes=(Swap(swarm, "_HAPPY_EYEBALLS_DELAY", 0.0),),
    ),
    Patch(
        "connection-config",
        "m",
        "host",
        (
            "libp2p/network/config.py:140",
            "libp2p/network/config.py:147",
            "libp2p/network/connection_pruner.py:239",
            "libp2p/network/swarm.py:2844",
        ),
        "300 connections with a pruner above 200, and 3 per peer; peerup's cap is limits.max_connections",
        None,
        evidence="none found that fails: the default caps are only reached by hundreds of peers (tests/test_churn.py "
        "uses fewer)",
    ),
    Patch(
        "single-dial-attempt",
        "q",
        "host",
        ("libp2p/network/swarm.py:980", "libp2p/network/config.py:37"),
        "every dial of an address is retried 3 more times with its own backoff, under peerup's retry policy",
        _T + "test_q_one_dial_is_one_attempt",
    ),
    Patch(
        "drop-resource-manager",
        "n",
        "host",
        ("libp2p/rcmgr/manager.py:833", "libp2p/network/swarm.py:369"),
        "new_host() attaches limits of its own and a stream semaphore that queues without a deadline",
        None,
        evidence="none found that fails: its caps (1000 connections, 10,000 streams) lie above what tests open; "
        "peerup's own caps, which replace it, are tested in tests/test_hostile.py",
    ),
    Patch(
        "dial-for-real",
        "o",
        "host",
        ("libp2p/network/swarm.py:110", "libp2p/network/swarm.py:752"),
        "a peer that failed all addresses is refused for 60 s from a negative cache, whatever the retry policy says",
        _T + "test_o_a_peer_back_within_a_minute_is_dialed",
    ),
    Patch(
        "no-auto-dial",
        "h",
        "host",
        ("libp2p/network/auto_connector.py:262", "libp2p/network/auto_connector.py:611", "libp2p/network/swarm.py:395"),
        "the swarm dials every peerstore peer up to ~half its cap and remembers every peer that ever disconnected",
        None,
        evidence="the effect is dials that do not happen and 460 bytes per departed peer "
        "(benchmarks/churn.py measured 99 -> 117 MiB over 20,000 peers without it)",
    ),
    Patch(
        "hide-wildcard-addrs",
        "r",
        "host",
        ("libp2p/host/basic_host.py:492", "libp2p/network/swarm.py:879"),
        "identify advertises 0.0.0.0 listen addresses; peers then redial the relay at 0.0.0.0",
        _T + "test_r_a_wildcard_listener_is_not_advertised",
    ),
    Patch(
        "advertise-addrs",
        "d",
        "host",
        ("libp2p/host/basic_host.py:534",),
        "an announced circuit address is rewritten into relay address + own ID",
        _T + "test_d_circuit_address_is_what_the_relay_learns",
    ),
    Patch(
        "release-reservations",
        "c",
        "host",
        ("libp2p/relay/circuit_v2/resources.py:401",),
        "a relay frees a reservation only at its TTL (1 h), not when the peer leaves",
        _T + "test_c_relay_frees_a_reservation_when_its_peer_leaves",
    ),
    Patch(
        "close-host",
        "f",
        "host",
        ("libp2p/network/swarm.py:420", "libp2p/transport/tcp/tcp.py:303", "libp2p/network/swarm.py:2301"),
        "leaving host.run() leaves the TCP listener accepting; Swarm.close() closes connections one by one",
        _T + "test_f_stopped_host_refuses_connections",
    ),
    Patch(
        "punch-dial-close",
        "x",
        "process",
        ("libp2p/transport/tcp/tcp.py:122", "libp2p/transport/tcp/tcp.py:143", "libp2p/transport/tcp/tcp.py:162"),
        "a source-bound dial cancelled in bind() or connect() (every punch round cancels its other dials) "
        "leaves its socket unclosed",
        _T + "test_x_a_cancelled_punch_dial_closes_its_socket",
        changes=(Swap(tcp, "_open_tcp_stream_from", workarounds.open_tcp_stream_from),),
    ),
    Patch(
        "log-noise",
        "g",
        "process",
        (
            "libp2p/relay/circuit_v2/protocol.py:351",
            "libp2p/kad_dht/kad_dht.py:661",
            "libp2p/transport/tcp/tcp.py:483",
            "libp2p/network/swarm.py:2710",
        ),
        "ERROR/WARNING records for normal events (every RESERVE, every DHT stream close, every failed punch dial, "
        "a connection that ends while it starts)",
        _T + "test_g_known_noise_is_demoted",
        changes=(LogFilters(workarounds.NOISE),),
    ),
    Patch(
        "relay-pump",
        "i",
        "process",
        ("libp2p/relay/circuit_v2/protocol.py:810", "libp2p/relay/circuit_v2/protocol.py:926"),
        "the relay's pump closes another client's circuit, has a 15 s write deadline, ignores idle durations",
        "tests/test_faults.py::test_a_client_leaving_does_not_cut_another_clients_tunnel",
        changes=(Swap(CircuitV2Protocol, "_relay_data", relay_circuits.relay_data),),
    ),
    Patch(
        "relay-limits",
        "s",
        "process",
        ("libp2p/relay/circuit_v2/transport.py:426", "libp2p/relay/circuit_v2/protocol.py:397"),
        "the limit in a CONNECT reply or STOP message is never read: a limited relay cuts tunnels unexplained",
        "tests/test_limited_relay.py::test_peerup_relay_limit_is_read_and_a_transfer_beyond_it_is_reset",
        changes=(
            Swap(relay_transport, "read_delimited_msg", relay_limit.read_delimited_msg),
            Swap(relay_transport, "write_delimited_msg", relay_limit.write_delimited_msg),
            Swap(relay_protocol, "read_delimited_msg", relay_limit.read_delimited_msg),
        ),
    ),
    Patch(
        "websocket",
        "t",
        "process",
        ("libp2p/transport/websocket/connection.py:536", "libp2p/transport/websocket/listener.py:241"),
        "a WebSocket peer has no remote address (all share one per-IP budget); the HTTP upgrade waits 60 s",
        "tests/test_websocket.py::test_websocket_upgrade_is_bounded_by_the_handshake_timeout",
        changes=(
            Swap(P2PWebSocketConnection, "get_remote_address", transports.ws_remote_address),
            Swap(ws_listener, "serve_websocket", transports.serve_websocket_bounded),
        ),
    ),
    Patch(
        "websocket-uncount",
        "u",
        "host",
        ("libp2p/transport/websocket/transport.py:634",),
        "each dialed WebSocket connection is counted and never uncounted: dial 1001 fails",
        "tests/test_websocket.py::test_websocket_dials_are_uncounted_when_they_close",
    ),
    Patch(
        "admission-gate",
        "v",
        "host",
        ("libp2p/network/swarm.py:1982", "libp2p/network/swarm.py:2056"),
        "inbound connections hold a slot of a 250-slot limiter for the swarm's life; slow handshakes hold it 10 s",
        _T + "test_v_closed_inbound_connections_free_their_slot",
    ),
    Patch(
        "peerup-session",
        "w",
        "host",
        ("libp2p/stream_muxer/yamux/yamux.py:1431", "libp2p/stream_muxer/yamux/yamux.py:1312"),
        "yamux windows not enforced, inbound streams unlimited, a dead connection reads as EOF",
        "tests/test_hostile.py::test_window_ignoring_flood_is_cut_off_and_memory_stays_bounded",
    ),
    Patch(
        "yamux-group-commit",
        "8",
        "host",
        ("libp2p/stream_muxer/yamux/yamux.py:850",),
        "one Noise message and one send() per yamux frame, also when frames of many streams wait for the connection",
        _F + "test_frames_queued_behind_a_write_go_out_together",
    ),
    Patch(
        "quick-locks",
        "9",
        "process",
        (
            "libp2p/network/stream/net_stream.py:149",
            "libp2p/stream_muxer/yamux/yamux.py:185",
            "libp2p/stream_muxer/yamux/yamux.py:679",
            "libp2p/io/trio.py:27",
        ),
        "an uncontended trio.Lock still yields to the scheduler; libp2p takes about ten per message and hop",
        _F + "test_a_message_costs_few_scheduler_passes",
        changes=(
            Swap(fastpath, "QUICK_LOCKS", True),
            _fast("quick-locks-net-stream", NetStream, "__init__"),
            _fast("quick-locks-tcp", TrioTCPStream, "__init__"),
        ),
    ),
    Patch(
        "noise-read",
        "1",
        "process",
        ("libp2p/security/noise/io.py:81", "libp2p/io/msgio.py:42"),
        "two read_exactly() calls, two lock rounds and two recv() per Noise message",
        None,
        evidence=_AB,
        changes=(_fast("noise-read", noise_io.NoiseTransportReadWriter, "read_msg"),),
    ),
    Patch(
        "noise-write",
        "2",
        "process",
        ("libp2p/security/noise/io.py:59",),
        "one write per 65519-byte Noise chunk of a long message",
        None,
        evidence=_AB,
        changes=(_fast("noise-write", noise_io.NoiseTransportReadWriter, "write_msg"),),
    ),
    Patch(
        "yamux-write",
        "3",
        "process",
        ("libp2p/stream_muxer/yamux/yamux.py:229", "libp2p/stream_muxer/yamux/yamux.py:280"),
        "one frame per lock round, a 10 ms window poll, and a reset after 5 s without a window update",
        _T + "test_e_relayed_stream_survives_a_reader_paused_7s",
        changes=(_fast("yamux-write", yamux.YamuxStream, "write"),),
    ),
    Patch(
        "yamux-conn",
        "4",
        "process",
        ("libp2p/stream_muxer/yamux/yamux.py:667",),
        "Yamux.__init__ hard-codes a 256-stream semaphore",
        _F + "test_more_than_256_streams_at_once_on_one_connection",
        changes=(_fast("yamux-conn", yamux.Yamux, "__init__"),),
    ),
    Patch(
        "multiselect",
        "5",
        "process",
        ("libp2p/protocol_muxer/multiselect_client.py:60",),
        "two round trips before a new stream carries a byte",
        None,
        evidence=_AB,
        changes=(_fast("multiselect", multiselect_client.MultiselectClient, "select_one_of"),),
    ),
    Patch(
        "yamux-buffers",
        "6",
        "process",
        ("libp2p/stream_muxer/yamux/yamux.py:1542", "libp2p/stream_muxer/yamux/yamux.py:1115"),
        "a bytearray cut from the front copies the whole buffer (24% of a relay's time)",
        None,
        evidence=_AB,
        changes=(Swap(fastpath, "CHUNK_BUFFERS", True),),
    ),
    Patch(
        "yamux-credit",
        "7",
        "process",
        ("libp2p/stream_muxer/yamux/yamux.py:410",),
        "a WINDOW_UPDATE after nearly every read, also 1-byte reads",
        _F + "test_small_reads_send_no_window_updates",
        changes=(_fast("yamux-credit", yamux.YamuxStream, "_auto_tune_and_send_window_update"),),
    ),
)

BY_NAME: dict[str, Patch] = {p.name: p for p in REGISTRY}


def _names_from_env() -> frozenset[str]:
    raw = ",".join(os.environ.get(name, "") for name in (OFF_ENV, LEGACY_OFF_ENV))
    names = frozenset(filter(None, (x.strip() for x in raw.split(","))))
    unknown = sorted(names - BY_NAME.keys())
    if unknown:
        raise ValueError(f"{OFF_ENV}: unknown patch {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    return names


_off: set[str] = set(_names_from_env())
_applied = False


def enabled(name: str) -> bool:
    """Is patch ``name`` in force (for host patches: should a new host get it)?"""
    if name not in BY_NAME:
        raise KeyError(name)
    return name not in _off


def apply_all() -> None:
    """Install every enabled process-wide patch; the first call does the work, later ones return at once."""
    global _applied
    if _applied:
        return
    for patch in REGISTRY:
        if patch.scope == "process" and patch.name not in _off:
            for change in patch.changes:
                change.install()
    _applied = True
    if _off:
        log.warning("libp2p patches switched off (%s): %s", OFF_ENV, ", ".join(sorted(_off)))


def installed(name: str) -> bool:
    """Is ``name`` in force now (process patches: are its objects in place)?"""
    patch = BY_NAME[name]
    if patch.scope == "host":
        return enabled(name)
    return _applied and all(change.installed() for change in patch.changes)


def revert(name: str) -> None:
    """Put upstream's behaviour back: now (process patches) or for hosts opened from now on."""
    _off.add(BY_NAME[name].name)
    for change in BY_NAME[name].changes:
        change.uninstall()


def restore(name: str) -> None:
    """Undo :func:`revert`."""
    _off.discard(BY_NAME[name].name)
    if _applied:
        for change in BY_NAME[name].changes:
            change.install()


@contextmanager
def reverted(name: str) -> Iterator[None]:
    """Upstream's behaviour for patch ``name`` inside the block (tests)."""
    was_off = name in _off
    revert(name)
    try:
        yield
    finally:
        if not was_off:
            restore(name)


__all__ = [
    "BY_NAME",
    "OFF_ENV",
    "REGISTRY",
    "SITE_PACKAGES",
    "Patch",
    "apply_all",
    "enabled",
    "installed",
    "restore",
    "revert",
    "reverted",
]
