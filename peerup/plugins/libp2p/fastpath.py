"""Throughput fixes for py-libp2p 0.8.1's Noise and yamux data path (process-wide).

Found with py-spy on ``benchmarks/bare_libp2p.py`` and measured with two hosts
in one process on 127.0.0.1 (64 KiB application writes and reads, 32 MiB; see
``docs/performance.md``). Each patch names the upstream function it replaces,
where it lives in the installed package, and what it gained. They change no
wire format: frames, Noise messages and window accounting stay as upstream
sends them, only fewer, larger system calls and awaits carry them.

Installed (and switched off, one by one) through :mod:`.patches`, which
names each; this module only holds the replacements.
"""

from __future__ import annotations

import struct
from collections import deque
from typing import Any

import trio
from libp2p.io.exceptions import IncompleteReadError, IOException
from libp2p.io.trio import TrioTCPStream
from libp2p.network.stream.net_stream import NetStream
from libp2p.protocol_muxer import multiselect_client
from libp2p.protocol_muxer.exceptions import (
    MultiselectClientError,
    MultiselectCommunicatorError,
    ProtocolNotSupportedError,
)
from libp2p.security.noise import io as noise_io
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux
from libp2p.utils import encode_delim

#: One TCP receive for the Noise reader: several 64 KiB Noise messages at once.
NOISE_RECV_SIZE = 256 * 1024
#: Most payload one YamuxStream.write() hands to the connection per lock round.
YAMUX_WRITE_BATCH = 256 * 1024
#: Poll interval while a yamux writer waits for the peer's window update
#: (upstream: 10 ms, which caps a window-limited stream at window/10 ms).
YAMUX_WINDOW_POLL = 0.0005
#: Streams one yamux connection may have open at once, opened by this side
#: (upstream: 256). Every tunnel is one stream on the connection to its peer.
YAMUX_MAX_STREAMS = 8192

#: (6) on or off: Yamux.__init__ (patch 4) gives each connection chunk buffers
#: only while the registry's "yamux-buffers" patch sets this.
CHUNK_BUFFERS = False
_HEADER = struct.Struct(yamux.YAMUX_HEADER_FORMAT)
_FRAME_PAYLOAD = yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE
_MAX_PLAINTEXT = noise_io.MAX_PLAINTEXT_LENGTH


# (1) security/noise/io.py:81 BaseNoiseMsgReadWriter.read_msg -> io/msgio.py:42
# BaseMsgReadWriter.read_msg reads every Noise message with two read_exactly()
# calls (2-byte length, then the body; io/utils.py:11), i.e. at least two
# awaits, two lock rounds in io/trio.py:36 and two recv() per 64 KiB message.
# Here the transport reader (not the handshake one, which must not read ahead)
# keeps a buffer filled NOISE_RECV_SIZE at a time and cuts messages out of it.
async def _noise_transport_read_msg(self: Any, prefix_encoded: bool = False) -> bytes:
    buf: bytearray | None = self.__dict__.get("_fp_buf")
    if buf is None:
        buf = self._fp_buf = bytearray()
    conn = self.read_writer.read_write_closer
    need = 2
    while True:
        if len(buf) >= 2:
            need = 2 + ((buf[0] << 8) | buf[1])
            if len(buf) >= need:
                break
        chunk = await conn.read(NOISE_RECV_SIZE)
        if not chunk:
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {need} bytes but received {len(buf)} bytes",
                expected_bytes=need,
                received_bytes=len(buf),
            )
        buf += chunk
    body = bytes(memoryview(buf)[2:need])
    del buf[:need]
    if prefix_encoded:
        body = body[len(self.prefix) :]
    return self.decrypt(body)


# (2) security/noise/io.py:59 BaseNoiseMsgReadWriter.write_msg sends each
# 65519-byte Noise chunk of a message with its own write (one TCP send and one
# TrioTCPStream write-lock round each). Here all chunks of one message are
# encrypted first and go out in one write. Same Noise messages on the wire.
async def _noise_transport_write_msg(self: Any, msg: bytes, prefix_encoded: bool = False) -> None:
    if len(msg) <= _MAX_PLAINTEXT:
        out = self.encrypt(msg)
        if prefix_encoded:
            out = self.prefix + out
        await self.read_writer.read_write_closer.write(len(out).to_bytes(2, "big") + out)
        return
    view = memoryview(msg)
    parts: list[bytes] = []
    for start in range(0, len(msg), _MAX_PLAINTEXT):
        sealed = self.encrypt(bytes(view[start : start + _MAX_PLAINTEXT]))
        if prefix_encoded and start == 0:
            sealed = self.prefix + sealed
        parts.append(len(sealed).to_bytes(2, "big"))
        parts.append(sealed)
    await self.read_writer.read_write_closer.write(b"".join(parts))


# (3) stream_muxer/yamux/yamux.py:229 YamuxStream.write sends one frame per
# lock round and per Noise message: a 64 KiB write becomes a 65524-byte frame
# plus a 12-byte frame (MAX_MESSAGE_SIZE counts the header), i.e. 2 frames, 3
# Noise messages and 3 sends. When the send window is exhausted it polls every
# 10 ms (yamux.py:280-285), which bounds a window-limited stream (a relayed one)
# at window/10 ms. Here one lock round takes up to YAMUX_WRITE_BATCH of window,
# cuts it into the same <= 65524-byte frames and hands them to the connection
# in one _write_frame call (one Noise write, see (2)); the window wait polls
# every 0.5 ms and, unlike upstream, has no 5 s cap (a slow reader stalls
# the writer instead of killing the stream); the caller's cancel scope bounds it.
async def _yamux_stream_write(self: Any, data: bytes) -> None:
    if self.send_closed:
        raise MuxedStreamError("Stream is closed for sending")
    if not isinstance(data, bytes):  # frames may be sent after a cancelled write returned: no mutable views
        data = bytes(data)
    view = memoryview(data)
    total = len(data)
    sent = 0
    while sent < total:
        batch: list[bytes | memoryview] | None = None
        async with self.rw_lock.write_lock():
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            async with self.window_lock:
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                window = self.send_window
                if window > 0:
                    take = min(window, YAMUX_WRITE_BATCH, total - sent)
                    self.send_window -= take
                    parts: list[bytes | memoryview] = []
                    end = sent + take
                    pos = sent
                    while pos < end:
                        size = min(_FRAME_PAYLOAD, end - pos)
                        parts.append(_HEADER.pack(0, yamux.TYPE_DATA, 0, self.stream_id, size))
                        parts.append(view[pos : pos + size])
                        pos += size
                    batch = parts
        if batch is None:
            self._zero_window_waits += 1
            while True:
                async with self.window_lock:
                    if self.send_window > 0 or self.closed:
                        break
                await trio.sleep(YAMUX_WINDOW_POLL)
            continue
        write_parts = getattr(self.conn, "write_parts", None)  # peerup's Session: no joined copy per frame
        if write_parts is not None:
            await write_parts(batch)
        else:
            await self.conn._write_frame(b"".join(batch))
        sent += take


# (4) stream_muxer/yamux/yamux.py:667-668 Yamux.__init__ hard-codes
# stream_backlog_limit = 256 and trio.Semaphore(256), and open_stream
# (yamux.py:878-880) waits on that semaphore for a free slot, without a timeout
# or a message. Every tunnel is one stream on the one connection to its peer, so
# the 257th simultaneous tunnel hung silently until the caller's 30 s timeout
# ("no answer within 30 s"); a relay opening STOP streams to one node hits it too.
# Here a connection allows YAMUX_MAX_STREAMS; a full connection failing at once
# with a message that names the limit is muxer.Session.open_stream's. The per-peer policy
# stays with peerup's own caps (auth.max_streams_per_peer, relay.max_circuits*),
# which refuse earlier and say so. Inbound streams were never limited upstream.
_upstream_yamux_init = yamux.Yamux.__init__


# (6) stream_muxer/yamux/yamux.py:890, 1295 keep each stream's received data in
# a bytearray: handle_incoming appends every frame (yamux.py:1542
# ``.extend(data)``) and read_stream takes from the front (yamux.py:1115-1116
# ``bytes(buffer[:n])`` + ``del buffer[:n]``). CPython's bytearray, once its
# front was cut, copies the whole remaining buffer into a new allocation on the
# next growth, and again whenever it shrinks below half its allocation. A
# stream whose reader is a little slower than its writer holds up to its receive
# window (autotuned up to 16 MiB, yamux.py:149) in that buffer, so every 64 KiB
# frame cost a copy of megabytes: py-spy showed the relay spending 24% of its
# time on that one line during a relayed transfer. _ChunkBuffer keeps the frames
# as a queue of bytes objects instead; it offers exactly the bytearray
# operations yamux.py uses on these buffers (extend, len, truth, bytes(), clear,
# front slice [:n] and del [:n]); _StreamBuffers makes every buffer yamux stores
# one.
class _ChunkBuffer:
    __slots__ = ("_chunks", "_size")

    def __init__(self, data: bytes | bytearray = b"") -> None:
        # An empty buffer holds no deque (about 600 bytes each; an idle tunnel has four).
        self._chunks: deque[bytes] | tuple[bytes, ...] = ()
        self._size = 0
        if data:
            self.extend(data)

    def extend(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            chunk = bytes(data)  # no copy for bytes
            chunks = self._chunks
            if not isinstance(chunks, deque):
                chunks = self._chunks = deque()
            chunks.append(chunk)
            self._size += len(chunk)

    def __len__(self) -> int:
        return self._size

    def __bytes__(self) -> bytes:
        if len(self._chunks) == 1:
            return self._chunks[0]
        return b"".join(self._chunks)

    def clear(self) -> None:
        self._chunks = ()
        self._size = 0

    def _front(self, key: Any) -> int | None:
        if isinstance(key, slice) and key.start in (None, 0) and key.step in (None, 1):
            stop = self._size if key.stop is None else key.stop
            if stop >= 0:
                return min(stop, self._size)
        return None

    def __getitem__(self, key: Any) -> bytes:
        n = self._front(key)
        if n is None:
            return bytes(self)[key]  # not used by yamux.py; correct, not fast
        chunks = self._chunks
        if not n:
            return b""
        first = chunks[0]
        if len(first) >= n:
            return first if len(first) == n else first[:n]
        parts = []
        need = n
        for chunk in chunks:
            if len(chunk) >= need:
                parts.append(chunk[:need] if len(chunk) > need else chunk)
                break
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def __delitem__(self, key: Any) -> None:
        n = self._front(key)
        if n is None:
            rest = bytearray(bytes(self))
            del rest[key]
            self.clear()
            self.extend(rest)
            return
        if not n:
            return
        self._size -= n
        chunks = self._chunks
        assert isinstance(chunks, deque)
        while n:
            first = chunks[0]
            if len(first) <= n:
                chunks.popleft()
                n -= len(first)
            else:
                chunks[0] = first[n:]
                n = 0
        if not self._size:
            self._chunks = ()


class _StreamBuffers(dict):  # type: ignore[type-arg]
    """``Yamux.stream_buffers``: every bytearray stored into it becomes a :class:`_ChunkBuffer`."""

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(value, bytearray):
            value = _ChunkBuffer(value)
        super().__setitem__(key, value)


def _yamux_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _upstream_yamux_init(self, *args, **kwargs)
    self.stream_backlog_limit = YAMUX_MAX_STREAMS
    self.stream_backlog_semaphore = trio.Semaphore(YAMUX_MAX_STREAMS)
    if CHUNK_BUFFERS:
        self.stream_buffers = _StreamBuffers(self.stream_buffers)


# (5) protocol_muxer/multiselect_client.py select_one_of (handshake() then
# try_select()) writes "/multistream/1.0.0", waits for the answer, then writes
# the protocol and waits again: two round trips before a new stream carries a
# byte. Both messages are now sent in one write and both answers read after it
# (what go-libp2p's multistream client does). The server side
# (protocol_muxer/multiselect.py:63 negotiate) reads them one after the other,
# so the wire is the same, one round trip earlier: about half of a warm
# tunnel's set-up time through a relay. Only the first protocol is pipelined;
# the others, and every error message, are upstream's.
async def _select_one_of(
    self: Any, protocols: Any, communicator: Any, negotiate_timeout: int = multiselect_client.DEFAULT_NEGOTIATE_TIMEOUT
) -> Any:
    protocols = list(protocols)
    if not protocols or not hasattr(communicator, "read_writer"):
        return await _upstream_select_one_of(self, protocols, communicator, negotiate_timeout)
    first = protocols[0]
    first_text = first if first is not None else ""
    with trio.move_on_after(negotiate_timeout):
        try:
            await communicator.read_writer.write(
                encode_delim(multiselect_client.MULTISELECT_PROTOCOL_ID.encode()) + encode_delim(first_text.encode())
            )
        except (IOException, AssertionError, ValueError) as error:  # what upstream's communicator wraps
            raise MultiselectClientError(f"handshake write failed: {error}") from error
        try:
            handshake = await communicator.read()
        except MultiselectCommunicatorError as error:
            raise MultiselectClientError(f"handshake read failed: {error}") from error
        if not multiselect_client.is_valid_handshake(handshake):
            raise MultiselectClientError(
                f"multiselect protocol ID mismatch: expected {multiselect_client.MULTISELECT_PROTOCOL_ID}, "
                f"got {handshake!r}"
            )
        unsupported: list[str] = []
        try:
            response = await communicator.read()
        except MultiselectCommunicatorError as error:
            raise MultiselectClientError(f"protocol read failed: {error}, protocol={first}") from error
        if response == first_text:
            return first
        if response != multiselect_client.PROTOCOL_NOT_FOUND_MSG:
            raise MultiselectClientError(
                f"unrecognized response: {response!r}, expected {first_text!r} or "
                f"{multiselect_client.PROTOCOL_NOT_FOUND_MSG!r}, protocol={first}"
            )
        unsupported.append(f"protocol not supported: {first}, response={response!r}")
        for protocol in protocols[1:]:
            try:
                return await self.try_select(communicator, protocol)
            except ProtocolNotSupportedError as error:
                unsupported.append(str(error))
        raise MultiselectClientError(
            multiselect_client._build_protocols_not_supported_message(protocols, negotiate_timeout, unsupported)
        )
    raise MultiselectClientError(f"response timed out after {negotiate_timeout}s, protocols tried: {protocols}")


_upstream_select_one_of = multiselect_client.MultiselectClient.select_one_of


# (7) stream_muxer/yamux/yamux.py:410 YamuxStream._auto_tune_and_send_window_update
# sends a WINDOW_UPDATE after almost every read: the "partial slack" branch
# (yamux.py:440-444) whenever a little window is missing, and the
# PY_YAMUX_RELEASE_ON_READ branch (default on, yamux.py:445-451, reading
# os.environ per call) for every read otherwise. A 1-byte read (multistream-select
# reads its varint prefixes byte by byte) costs a frame, a Noise message and a
# send; through a relay each one is a message the relay decrypts, forwards and
# answers with a window update of its own. Here the go-yamux rule
# (session.go sendWindowUpdate / GrowTo): credit goes back once the consumed
# part reaches half the target window, with upstream's autotune doubling the
# target when updates come faster than 4 RTT. The window a writer sees never
# drops below half the target, so bulk transfers never starve.
async def _yamux_auto_tune_and_send_window_update(self: Any, *, bytes_read: int = 0) -> None:
    total = 0
    async with self.window_lock:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta > 0 and delta >= self.target_recv_window // 2:
            self.recv_window += delta
            total = delta + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
    if total > 0:
        await self.send_window_update(total, skip_lock=True)


# (9) trio.Lock.acquire (trio/_sync.py) ends with cancel_shielded_checkpoint()
# even when nobody holds the lock: the task goes back to the run queue and
# waits for a pass of the scheduler (with an epoll_wait of its own) before it
# continues. py-libp2p takes such a lock around nothing that awaits, several
# times per message: NetStream._state_lock around a state check on every
# read and write (network/stream/net_stream.py:149, 203, 263), the yamux
# stream's window lock (stream_muxer/yamux/yamux.py:185) and ReadWriteLock
# (rw_lock.py, a Semaphore plus an async context manager) for every write,
# the connection's streams and write locks for every frame (yamux.py:679,
# 691), and TrioTCPStream's read and write locks around every recv and send
# (io/trio.py:27-28). With 20 RPC clients that was ten scheduler round trips
# per message and hop where one (the socket's own) is needed.
class QuickLock:
    """A lock like ``trio.Lock`` whose uncontended acquire does not yield to the scheduler.

    The same hand-over as trio's (a ParkingLot: FIFO, ownership passes to
    the next waiter on release, a waiter cancelled while parked never gets
    it). What it gives up: trio's rule that every ``await`` is a scheduling
    point and a cancellation point, and the owner check on release (only
    libp2p's own code, which pairs them, takes these locks). Every path it is
    used on still reaches one at its socket operation, so no task runs on
    without yielding and a cancelled one stops there.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self) -> None:
        if self._held or self._lot:
            await self._lot.park()  # release() hands the lock over: _held stays True
        else:
            self._held = True

    def acquire_nowait(self) -> None:
        if self._held or self._lot:
            raise trio.WouldBlock
        self._held = True

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("release of a QuickLock that is not held")
        if self._lot:
            self._lot.unpark(count=1)
        else:
            self._held = False

    def locked(self) -> bool:
        return self._held

    async def __aenter__(self) -> None:
        # acquire() inlined: ``async with`` is the per-message path, and a nested await costs a coroutine.
        if self._held or self._lot:
            await self._lot.park()
        else:
            self._held = True

    async def __aexit__(self, *exc_info: object) -> None:
        if self._lot:
            self._lot.unpark(count=1)
        else:
            self._held = False


class QuickWriterLock:
    """Stands in for a yamux stream's ``ReadWriteLock``, of which libp2p uses only ``write_lock()``."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = QuickLock()

    def write_lock(self) -> QuickLock:
        return self._lock


#: (9) on or off: peerup's yamux Session and Stream (muxer.py) take quick locks while the
#: registry's "quick-locks" patch sets this; NetStream and TrioTCPStream through the inits below.
QUICK_LOCKS = False

_upstream_net_stream_init = NetStream.__init__
_upstream_tcp_stream_init = TrioTCPStream.__init__


def _net_stream_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _upstream_net_stream_init(self, *args, **kwargs)
    self._state_lock = QuickLock()


def _tcp_stream_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _upstream_tcp_stream_init(self, *args, **kwargs)
    self.read_lock = QuickLock()
    self.write_lock = QuickLock()


#: The replacement for each patch name of :mod:`.patches` (which says what each replaces).
REPLACEMENTS: dict[str, Any] = {
    "noise-read": _noise_transport_read_msg,
    "noise-write": _noise_transport_write_msg,
    "yamux-write": _yamux_stream_write,
    "yamux-conn": _yamux_init,
    "yamux-credit": _yamux_auto_tune_and_send_window_update,
    "multiselect": _select_one_of,
    "quick-locks-net-stream": _net_stream_init,
    "quick-locks-tcp": _tcp_stream_init,
}


__all__ = [
    "CHUNK_BUFFERS",
    "NOISE_RECV_SIZE",
    "QUICK_LOCKS",
    "REPLACEMENTS",
    "YAMUX_MAX_STREAMS",
    "YAMUX_WINDOW_POLL",
    "YAMUX_WRITE_BATCH",
    "QuickLock",
    "QuickWriterLock",
]
