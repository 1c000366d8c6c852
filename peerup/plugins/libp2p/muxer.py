"""peerup's yamux session: upstream's ``Yamux`` with its frame reader, stream reads and teardown replaced.

py-libp2p 0.8.1's yamux (stream_muxer/yamux/yamux.py) is where a hostile or
broken peer reaches a node's memory and where a broken tunnel turns into a
clean end of stream. Four faults, each reproduced from outside (issue #11):

1. **Receive windows are not enforced.** ``handle_incoming`` (yamux.py:1537-1548)
   logs "peer exceeded receive window" and buffers the data anyway: 1 GiB sent
   by a peer that ignores window updates grew a relay by 1 GB, before any
   authorization. Here a DATA frame longer than what the peer may send is a
   protocol error: GO_AWAY (protocol error) and the connection is closed,
   logged once, and nothing is buffered beyond the window (go-yamux does the
   same, ``session.go`` ``incomingStream``/``readData``).
2. **A reset or a dead connection reads as end of stream.** The read paths
   (yamux.py:501-574, 1057-1150) raise ``MuxedStreamEOF`` when the connection
   shuts down, when a stream entry was removed, or when the buffer is gone;
   ``Yamux.close`` (yamux.py:800-808) marks streams closed without marking them
   reset. A tunnel whose relay or peer died mid-transfer then ended with a FIN,
   after a third of the bytes. Here only a FIN from the peer is an end of
   stream; every other way a stream ends without one is a reset.
3. **Unbounded inbound streams.** Outbound streams are capped (backlog
   semaphore) but inbound ones were never limited (upstream accepts every SYN,
   yamux.py:1272-1281). Here a connection holds at most
   ``MuxerLimits.max_inbound_streams``; a SYN beyond that is answered with RST.
4. **Teardown loses data that had arrived.** On a connection error upstream
   clears every buffer (yamux.py:1716-1718), also of streams whose peer had
   sent everything and its FIN: the reader then saw "stream closed" for data
   that had arrived. Here such a stream keeps its buffer until it is read.

And two bounds on memory, which windows alone do not give:

* receive-window *growth* (autotuning, up to ``max_window`` per stream) comes
  from a per-connection budget (``window_growth``), so one peer cannot make a
  node buffer more than ``streams * 256 KiB + window_growth`` for it, and a
  well-behaved peer never hits a limit, it just gets smaller windows;
* every unread byte of every connection is counted process-wide
  (:class:`BufferGuard`); past ``max_buffered`` the connection holding the most
  unread bytes is closed, which bounds the total whatever the number of peers.

The frame format, flags and window arithmetic are the yamux spec's; the
session is installed per host by :func:`install` (no process-wide patch).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import weakref
from collections import deque
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, ISecureConn
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.yamux import yamux as upstream
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

from peerup.core.logs import OncePer
from peerup.plugins.libp2p import fastpath

log = logging.getLogger("peerup.libp2p.muxer")

_HEADER = struct.Struct(upstream.YAMUX_HEADER_FORMAT)
HEADER_SIZE = upstream.HEADER_SIZE
INITIAL_WINDOW = upstream.DEFAULT_WINDOW_SIZE
TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY = (
    upstream.TYPE_DATA,
    upstream.TYPE_WINDOW_UPDATE,
    upstream.TYPE_PING,
    upstream.TYPE_GO_AWAY,
)
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = upstream.FLAG_SYN, upstream.FLAG_ACK, upstream.FLAG_FIN, upstream.FLAG_RST
GO_AWAY_PROTOCOL_ERROR = upstream.GO_AWAY_PROTOCOL_ERROR
#: Most bytes one group-commit write takes from the queue (one Noise write, a few messages).
COMMIT_BYTES = 256 * 1024


@dataclass(frozen=True)
class MuxerLimits:
    """Per-connection bounds; the defaults suit a relay and a serving node alike."""

    #: Streams the peer may have open on one connection at once (ours are capped separately).
    max_inbound_streams: int = 4096
    #: Ceiling of one stream's autotuned receive window (upstream's MAX_WINDOW_SIZE).
    max_window: int = upstream.MAX_WINDOW_SIZE
    #: Receive-window growth beyond 256 KiB per stream, all streams of one connection together.
    window_growth: int = 64 * 1024 * 1024
    #: Unread bytes across all connections of the process before the largest holder is closed.
    max_buffered: int = 512 * 1024 * 1024
    #: Send the frames queued behind a write together (patch ``yamux-group-commit``).
    group_commit: bool = True


class _ProtocolError(Exception):
    """The peer broke the yamux protocol; the connection is closed with GO_AWAY."""


#: A peer's misbehaviour is logged at WARNING once a minute per peer and kind.
_log = OncePer(log)


class BufferGuard:
    """Counts unread bytes of every session of a process; closes the largest holder past the limit.

    Windows bound what each stream may buffer, but a node with many peers (or
    one attacker with many identities) could still add those bounds up to
    more memory than the machine has. The guard turns that into a fixed
    ceiling: the session holding the most unread bytes is the one whose
    reader is not keeping up, or an attacker; it is closed, and its streams
    reset, which a tunnel reports to its application as a broken connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.evictions = 0
        self._sessions: weakref.WeakSet[Session] = weakref.WeakSet()

    def register(self, session: Session) -> None:
        self._sessions.add(session)

    def adjust(self, session: Session, delta: int) -> None:
        session.buffered += delta
        self.total += delta
        if delta > 0 and self.total > self.limit:
            self._relieve()

    def forget(self, session: Session) -> None:
        self.total -= session.buffered
        session.buffered = 0
        self._sessions.discard(session)

    def _relieve(self) -> None:
        victim = max(self._sessions, key=lambda s: s.buffered, default=None)
        if victim is None or victim.buffered == 0:
            return
        self.evictions += 1
        log.warning(
            "memory bound: %d MiB unread across all connections (limit %d MiB); closing the connection to %s, "
            "which holds %d MiB",
            self.total >> 20,
            self.limit >> 20,
            victim.peer_id,
            victim.buffered >> 20,
        )
        victim.abort_soon("memory bound reached")


#: One guard per process; :func:`install` sets its limit from the node's settings.
GUARD = BufferGuard(MuxerLimits().max_buffered)


class Stream(YamuxStream):
    """A yamux stream that tells a FIN from a reset, and whose window growth is budgeted."""

    conn: Session

    def __init__(self, stream_id: int, conn: Yamux, is_initiator: bool) -> None:
        super().__init__(stream_id, conn, is_initiator)
        #: The peer sent FIN: everything it will ever send has arrived.
        self.fin_received = False
        #: Window growth this stream holds from its connection's budget.
        self.growth = 0
        if fastpath.QUICK_LOCKS:
            self.window_lock = fastpath.QuickLock()  # type: ignore[assignment]
            self.rw_lock = fastpath.QuickWriterLock()  # type: ignore[assignment]

    @property
    def finished_receiving(self) -> bool:
        """True once the peer ended its side cleanly (FIN) or the stream is dead."""
        return self.fin_received or self.reset_received

    async def read(self, n: int | None = -1) -> bytes:
        """Buffered data first; then EOF only after the peer's FIN, otherwise a reset."""
        if n is None:
            n = -1
        conn = self.conn
        sid = self.stream_id
        while True:
            buffer = conn.stream_buffers.get(sid)
            if buffer:
                size = len(buffer)
                if n < 0 or n >= size:
                    data = bytes(buffer)
                    buffer.clear()
                else:
                    data = bytes(buffer[:n])
                    del buffer[:n]
                conn.note_read(len(data))
                if self.closed and not len(buffer):
                    await conn._finalize_stream(self, fully_closed=True)
                elif not self.finished_receiving and not conn.event_shutting_down.is_set():
                    await self._auto_tune_and_send_window_update(bytes_read=len(data))
                return data
            if self.fin_received:
                if self.closed:
                    await conn._finalize_stream(self, fully_closed=True)
                raise MuxedStreamEOF("Stream is closed for receiving")
            if self.reset_received or self.recv_closed or self.closed or sid not in conn.streams:
                raise MuxedStreamReset("Stream was reset")
            if conn.event_shutting_down.is_set():
                raise MuxedStreamReset("Connection closed")
            event = conn.stream_events.get(sid)
            if event is None:
                raise MuxedStreamReset("Stream was reset")
            await event.wait()
            if conn.stream_events.get(sid) is event:
                conn.stream_events[sid] = trio.Event()

    async def reset(self) -> None:
        """Upstream's reset, without trying to write RST on a connection that is gone."""
        if not self.conn.event_shutting_down.is_set():
            await super().reset()
            return
        self.closed = self.send_closed = self.recv_closed = True
        if not self.fin_received:
            self.reset_received = True
        await self.conn._finalize_stream(self, fully_closed=True)

    def _apply_autotune_epoch(self, buffered: int) -> int:
        """Upstream's doubling (yamux.py:379), capped by ``max_window`` and the connection's growth budget."""
        rtt = self._effective_rtt()
        now = trio.current_time()
        if rtt <= 0 or (self.epoch_start > 0 and (now - self.epoch_start) >= rtt * 4):
            self.epoch_start = now
            return 0
        want = min(self.target_recv_window * 2, self.conn.limits.max_window) - self.target_recv_window
        granted = self.conn.grant_growth(want)
        extra = 0
        if granted > 0:
            self.target_recv_window += granted
            self.growth += granted
            grow = self.target_recv_window - (self.recv_window + buffered)
            if grow > 0:
                self.recv_window += grow
                extra = grow
        self.epoch_start = now
        return extra


class Session(Yamux):
    """One yamux connection with enforced windows, bounded streams and honest teardown."""

    def __init__(
        self,
        secured_conn: ISecureConn,
        peer_id: ID,
        is_initiator: bool | None = None,
        *,
        limits: MuxerLimits,
        guard: BufferGuard = GUARD,
    ) -> None:
        super().__init__(secured_conn, peer_id, is_initiator=is_initiator)
        self.limits = limits
        self.guard = guard
        #: Unread bytes in this session's stream buffers (kept by the guard).
        self.buffered = 0
        self._growth_left = limits.window_growth
        self._inbound: set[int] = set()
        self._torn_down = False
        self._probes: dict[int, trio.Event] = {}
        self._probe_id = 0
        #: Frame parts waiting for the write lock (with their caller's ticket), and the tickets
        #: of the last queued and written callers.
        self._pending: deque[tuple[int, bytes | memoryview]] = deque()
        self._queued = 0
        self._written = 0
        self._write_broken: BaseException | None = None
        #: A task is sending queued parts; the others wait for ``_flushed``, set after each round.
        self._writing = False
        self._flushed = trio.Event()
        if fastpath.QUICK_LOCKS:
            self.streams_lock = fastpath.QuickLock()  # type: ignore[assignment]
            self._write_lock = fastpath.QuickLock()  # type: ignore[assignment]
        guard.register(self)

    # -- budget ---------------------------------------------------------------------

    def note_read(self, size: int) -> None:
        """A reader took ``size`` bytes out of a buffer (after teardown the guard no longer counts us)."""
        if self._torn_down:
            self.buffered -= size
        else:
            self.guard.adjust(self, -size)

    def grant_growth(self, want: int) -> int:
        granted = max(0, min(want, self._growth_left))
        self._growth_left -= granted
        return granted

    def _drop(self, stream: Stream) -> None:
        """Bookkeeping for a stream leaving ``self.streams`` (any path)."""
        self._growth_left += stream.growth
        stream.growth = 0
        self._inbound.discard(stream.stream_id)

    def _finalize_stream_locked(self, stream: YamuxStream, *, fully_closed: bool) -> None:
        super()._finalize_stream_locked(stream, fully_closed=fully_closed)
        if stream.stream_id not in self.streams and isinstance(stream, Stream):
            self._drop(stream)

    def _sweep_stale_streams(self, now: float | None = None) -> int:
        before = dict(self.streams)
        reclaimed = super()._sweep_stale_streams(now)
        for sid, stream in before.items():
            if sid not in self.streams and isinstance(stream, Stream):
                self._drop(stream)
        self.guard.adjust(self, sum(len(b) for b in self.stream_buffers.values()) - self.buffered)
        return reclaimed

    # -- writing --------------------------------------------------------------------

    async def _write_frame(self, data: bytes) -> None:
        """Send ``data`` (whole frames); upstream's callers (window updates, SYN, RST, pings) come here."""
        await self.write_parts((data,))

    async def write_parts(self, parts: tuple[bytes | memoryview, ...] | list[bytes | memoryview]) -> None:
        """Send the frames in ``parts`` (in order), together with frames other streams queue meanwhile.

        Group commit, as go-yamux's send loop does: while one task's write is
        on the socket, frames of other streams queue up; the next writer
        sends them in one Noise write and one send, instead of an encryption
        and a syscall per frame. Under many small concurrent messages (20 RPC
        clients on one connection) this is most of the CPU per message.

        * Order is kept: frames go out in the order they were queued, and one
          stream's frames are queued in order by its own write lock.
        * A batch stops at ``COMMIT_BYTES`` (at a caller's boundary): 1000
          tunnels that each queue 64 KiB at once must not become one 64 MB
          join, then a 64 MB ciphertext, on top of the frames themselves.
        * ``parts`` may be a header and a view of the caller's data, so a
          frame is not copied into a joined frame before the batch is.
        * One task writes at a time; the others wait on one event, set after
          each round, so all whose frames went out return in the same pass.
        * A failed or cancelled write leaves a partial Noise message on the
          wire, so the connection is broken for every frame queued so far,
          not only the writer's.

        (Upstream, yamux.py:853-873, also formats a debug line per frame.)
        """
        if not self.limits.group_commit:
            async with self._write_lock:
                await self.secured_conn.write(bytes(parts[0]) if len(parts) == 1 else b"".join(parts))
            return
        self._queued += 1
        ticket = self._queued
        pending = self._pending
        for part in parts:
            pending.append((ticket, part))
        while self._written < ticket:
            if self._write_broken is not None:
                raise self._broken_error()
            if self._writing:
                # Woken together when the writer is done, not one by one: a lock would
                # hand over to each waiter in turn, one scheduler pass each, only for most
                # of them to find their frames already sent (100 streams: 100 passes).
                await self._flushed.wait()
                continue
            self._writing = True
            try:
                await self._flush_until(ticket)
            finally:
                self._writing = False
                flushed, self._flushed = self._flushed, trio.Event()
                flushed.set()

    async def _flush_until(self, ticket: int) -> None:
        """Send queued parts from the front, at most COMMIT_BYTES per write, until ``ticket``'s are out."""
        pending = self._pending
        while self._written < ticket:
            # A cancelled task leaves here with its frames still queued for the next
            # writer: past this line nothing yields before the socket, and a write that
            # trio refuses there would have advanced the Noise nonce for a message
            # never sent, breaking the connection for every stream on it.
            await trio.lowlevel.checkpoint_if_cancelled()
            batch: list[bytes | memoryview] = []
            size = 0
            last = self._written
            while pending and (size < COMMIT_BYTES or pending[0][0] == last):
                last, part = pending.popleft()
                batch.append(part)
                size += len(part)
            try:
                await self.secured_conn.write(bytes(batch[0]) if len(batch) == 1 else b"".join(batch))
            except BaseException as exc:
                self._write_broken = exc
                raise
            self._written = last

    def _broken_error(self) -> Exception:
        exc = self._write_broken
        return MuxedStreamError(f"yamux: the connection to {self.peer_id} broke while sending: {exc!r}")

    async def open_stream(self) -> Stream:
        if self.stream_backlog_semaphore.value == 0:
            raise MuxedStreamError(
                f"yamux: {self.stream_backlog_limit} streams already open on the connection to {self.peer_id}"
            )
        await self.stream_backlog_semaphore.acquire()
        async with self.streams_lock:
            if self.event_shutting_down.is_set():
                self.stream_backlog_semaphore.release()
                raise MuxedStreamError("Connection is shutting down")
            stream_id = self.next_stream_id
            self.next_stream_id += 2
            stream = Stream(stream_id, self, True)
            stream._owns_backlog_slot = True
            self.streams[stream_id] = stream
            self.stream_buffers[stream_id] = bytearray()
            self.stream_events[stream_id] = trio.Event()
        try:
            await self._write_frame(_HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0))
        except Exception as exc:
            async with self.streams_lock:
                stream._backlog_slot_released = True
                self.stream_backlog_semaphore.release()
                self.streams.pop(stream_id, None)
                self.stream_buffers.pop(stream_id, None)
                self.stream_events.pop(stream_id, None)
            raise MuxedStreamError(f"Failed to send SYN: {exc}") from exc
        return stream

    # -- reading --------------------------------------------------------------------

    async def handle_incoming(self) -> None:
        """Read frames until the connection ends; a protocol violation ends it with GO_AWAY."""
        try:
            while not self.event_shutting_down.is_set():
                header = self._decrypted(HEADER_SIZE) or await read_exactly(self.secured_conn, HEADER_SIZE)
                version, typ, flags, sid, length = _HEADER.unpack(header)
                if version != 0:
                    raise _ProtocolError(f"unsupported yamux version {version}")
                if typ == TYPE_DATA:
                    await self._on_data(sid, flags, length)
                elif typ == TYPE_WINDOW_UPDATE:
                    await self._on_stream_frame(sid, flags, b"", length)
                elif typ == TYPE_PING:
                    await self._on_ping(flags, length)
                elif typ == TYPE_GO_AWAY:
                    log.debug("yamux: %s sent GO_AWAY (code %d)", self.peer_id, length)
                    return
                else:
                    raise _ProtocolError(f"unknown frame type {typ}")
        except _ProtocolError as exc:
            _log.warning((self.peer_id, "protocol"), "yamux: closing the connection to %s: %s", self.peer_id, exc)
            with trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await self._write_frame(_HEADER.pack(0, TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))
        except Exception as exc:  # noqa: BLE001 - a closed socket, a failed decrypt, garbage: the connection is over
            log.debug("yamux: connection to %s ended: %s: %s", self.peer_id, type(exc).__name__, exc)
        finally:
            with trio.CancelScope(shield=True):
                await self._cleanup_on_error()

    async def _on_data(self, sid: int, flags: int, length: int) -> None:
        stream = self.streams.get(sid)
        if flags & FLAG_SYN:
            allowed = INITIAL_WINDOW
        elif stream is not None:
            allowed = stream.recv_window
        else:
            allowed = self.limits.max_window  # a stream we dropped: read and discard, within reason
        if length > allowed:
            raise _ProtocolError(
                f"DATA frame of {length} bytes on stream {sid} exceeds the receive window ({allowed} bytes)"
            )
        body = (self._decrypted(length) or await self._read_data_body(length)) if length else b""
        await self._on_stream_frame(sid, flags, body, 0)

    def _decrypted(self, size: int) -> bytes:
        """``size`` bytes the secure session already decrypted, else ``b""`` (then read with an await).

        One Noise message usually carries several frames (group commit, a
        256 KiB batch); upstream reads each header and body through
        ``read_exactly`` and each body under a fresh ``fail_after`` scope
        (yamux.py:1177), a cancel scope per frame for bytes already in memory.
        """
        conn = self.secured_conn
        try:
            if conn.high_watermark - conn.low_watermark >= size:  # type: ignore[attr-defined]
                return conn._drain(size)  # type: ignore[attr-defined]
        except AttributeError:  # not a SecureSession (no buffer of its own): read as upstream does
            pass
        return b""

    async def _on_stream_frame(self, sid: int, flags: int, body: bytes, increment: int) -> None:
        """A DATA body (``body``) or a WINDOW_UPDATE (``increment``) with its flags, for stream ``sid``."""
        notify: Stream | None = None
        reply: bytes | None = None
        async with self.streams_lock:
            stream = self.streams.get(sid)
            if flags & FLAG_SYN:
                if stream is not None:
                    raise _ProtocolError(f"SYN for stream {sid}, which is already open")
                if (sid % 2 == 1) == self.is_initiator_value or sid == 0:
                    raise _ProtocolError(f"SYN for stream {sid}, an ID that is ours to use")
                if self.event_shutting_down.is_set() or flags & FLAG_RST:
                    return  # opened and reset at once: nothing to deliver
                if len(self._inbound) >= self.limits.max_inbound_streams:
                    self._inbound &= self.streams.keys()
                if len(self._inbound) >= self.limits.max_inbound_streams:
                    _log.warning(
                        (self.peer_id, "streams"),
                        "yamux: %s opened more than %d streams on one connection; refusing the excess",
                        self.peer_id,
                        self.limits.max_inbound_streams,
                    )
                    reply = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, sid, 0)
                else:
                    stream = Stream(sid, self, False)
                    self.streams[sid] = stream
                    self.stream_buffers[sid] = bytearray()
                    self.stream_events[sid] = trio.Event()
                    self._inbound.add(sid)
                    reply = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, sid, 0)
                    notify = stream
            if stream is not None and isinstance(stream, Stream):
                if body:
                    if len(body) > stream.recv_window:  # _on_data checked; a SYN's window is the initial one
                        raise _ProtocolError(f"stream {sid} received more than its receive window")
                    stream.recv_window -= len(body)
                    self.stream_buffers[sid].extend(body)
                    self.guard.adjust(self, len(body))
                if increment:
                    stream.send_window += increment
                if flags & FLAG_FIN:
                    stream.fin_received = True
                    stream.recv_closed = True
                    if stream.send_closed:
                        stream.closed = True
                if flags & FLAG_RST:
                    stream.reset_received = True
                    stream.closed = stream.send_closed = stream.recv_closed = True
                event = self.stream_events.get(sid)
                if event is not None:
                    event.set()
                if stream.closed:
                    self._finalize_stream_locked(stream, fully_closed=True)
        if reply is not None:
            await self._write_frame(reply)
        if notify is not None:
            await self.new_stream_send_channel.send(notify)

    async def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & FLAG_SYN:
            await self._write_frame(_HEADER.pack(0, TYPE_PING, FLAG_ACK, 0, opaque))
        elif flags & FLAG_ACK:
            probe = self._probes.pop(opaque, None)
            if probe is not None:
                probe.set()
                return
            rtt = trio.current_time() - self._ping_sent_time
            self._rtt = rtt if self._rtt == 0.0 else (self._rtt + rtt) / 2
            self._ping_event.set()

    async def probe(self, timeout: float) -> bool:
        """Does the peer answer a yamux ping on *this* connection within ``timeout``?

        A libp2p ping goes to a peer, over whichever connection the swarm picks;
        this one tests the connection itself, so a dead direct connection can be
        told apart from a live relayed one to the same peer (keepalive.py,
        node.py). The opaque values count down from 2**32 - 1, away from the
        RTT loop's, which count up from 1.
        """
        if self.event_shutting_down.is_set():
            return False
        self._probe_id = (self._probe_id - 1) % 2**32 or 0xFFFFFFFF
        opaque = self._probe_id
        answered = trio.Event()
        self._probes[opaque] = answered
        try:
            with trio.move_on_after(timeout):
                await self._write_frame(_HEADER.pack(0, TYPE_PING, FLAG_SYN, 0, opaque))
                await answered.wait()
                return True
            return False
        except Exception:  # noqa: BLE001 - a write on a dead connection: not alive
            return False
        finally:
            self._probes.pop(opaque, None)

    # -- teardown -------------------------------------------------------------------

    def abort_soon(self, why: str) -> None:
        """Close this connection from outside its reader task (the buffer guard's eviction)."""
        self.event_shutting_down.set()
        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(self._close_secured, why)

    async def _close_secured(self, why: str) -> None:
        log.debug("yamux: closing the connection to %s: %s", self.peer_id, why)
        with trio.move_on_after(1):
            with contextlib.suppress(Exception):
                await self.secured_conn.close()
        await self._cleanup_on_error()

    def _tear_down_streams(self) -> None:
        """Every stream without a FIN is reset; a finished stream keeps its unread data."""
        for sid, stream in list(self.streams.items()):
            event = self.stream_events.get(sid)
            finished = isinstance(stream, Stream) and stream.fin_received and bool(self.stream_buffers.get(sid))
            stream.send_closed = True
            if not finished:
                stream.closed = stream.recv_closed = True
                stream.reset_received = True
                self.streams.pop(sid, None)
                self.stream_buffers.pop(sid, None)
                self.stream_events.pop(sid, None)
                if isinstance(stream, Stream):
                    self._drop(stream)
            else:
                stream.closed = True
            if event is not None:
                event.set()
        self.guard.adjust(self, sum(len(b) for b in self.stream_buffers.values()) - self.buffered)

    async def _cleanup_on_error(self) -> None:
        if self._torn_down:
            return
        self._torn_down = True
        self.event_shutting_down.set()
        with contextlib.suppress(trio.ClosedResourceError):
            self.new_stream_send_channel.close()
        self._tear_down_streams()
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(Exception):
            await self.secured_conn.close()
        self.event_closed.set()
        self.guard.forget(self)
        if self.on_close is not None:
            try:
                await self.on_close()
            except Exception as exc:  # noqa: BLE001 - the swarm's callback; logged, not raised into the reader
                log.debug("yamux: on_close for %s failed: %s", self.peer_id, exc)

    async def close(self, error_code: int = upstream.GO_AWAY_NORMAL) -> None:
        """Send GO_AWAY, then tear down as :meth:`_cleanup_on_error` does (no fixed 100 ms sleep)."""
        if not self.event_shutting_down.is_set():
            with trio.move_on_after(1):
                with contextlib.suppress(Exception):
                    await self._write_frame(_HEADER.pack(0, TYPE_GO_AWAY, 0, 0, error_code))
        await self._cleanup_on_error()


def install(host: IHost, limits: MuxerLimits) -> None:
    """Make ``host`` use :class:`Session` for every yamux connection, inbound, outbound and relayed.

    Upstream's ``MuxerMultistream.new_conn`` constructs ``Yamux`` by name
    (stream_muxer/muxer_multistream.py:143), so the host's own instance is
    given a ``new_conn`` that negotiates the same way and builds a Session.
    The upgrader is shared by direct dials, listeners and the circuit relay
    transport, so this covers all three. Also sets the process's buffer guard
    limit (one node per process in production; tests share the last value).
    """
    muxers = host.get_network().upgrader.muxer_multistream  # type: ignore[attr-defined]
    GUARD.limit = limits.max_buffered

    async def new_conn(conn: ISecureConn, peer_id: ID) -> Session:
        protocol, _ = await muxers._selector.select(conn, conn.is_initiator, muxers.negotiate_timeout)
        if protocol != upstream.PROTOCOL_ID:
            raise MuxedStreamError(f"peerup speaks only yamux, the peer chose {protocol}")
        session = Session(conn, peer_id, is_initiator=conn.is_initiator, limits=limits)
        return muxers._annotate_connection(session, conn, protocol)

    muxers.new_conn = new_conn


__all__ = ["GUARD", "BufferGuard", "MuxerLimits", "Session", "Stream", "install"]
