"""Throughput fixes for py-libp2p 0.8.1's Noise and yamux data path (process-wide).

Found with py-spy on ``benchmarks/bare_libp2p.py`` and measured with two hosts
in one process on 127.0.0.1 (64 KiB application writes and reads, 32 MiB; see
``docs/performance.md``). Each patch names the upstream function it replaces,
where it lives in the installed package, and what it gained. They change no
wire format: frames, Noise messages and window accounting stay as upstream
sends them, only fewer, larger system calls and awaits carry them.

Applied by :func:`apply` from ``workarounds.apply_global_workarounds()``;
idempotent; :func:`applied` says whether they are in place.
"""

from __future__ import annotations

import struct
from typing import Any

import trio
from libp2p.io.exceptions import IncompleteReadError
from libp2p.security.noise import io as noise_io
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux

#: One TCP receive for the Noise reader: several 64 KiB Noise messages at once.
NOISE_RECV_SIZE = 256 * 1024
#: Most payload one YamuxStream.write() hands to the connection per lock round.
YAMUX_WRITE_BATCH = 256 * 1024
#: Poll interval while a yamux writer waits for the peer's window update
#: (upstream: 10 ms, which caps a window-limited stream at window/10 ms).
YAMUX_WINDOW_POLL = 0.0005

_MARK = "_peerup_fastpath"
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
# every 0.5 ms and, like workaround (e), has no 5 s cap (a slow reader stalls
# the writer instead of killing the stream); the caller's cancel scope bounds it.
async def _yamux_stream_write(self: Any, data: bytes) -> None:
    if self.send_closed:
        raise MuxedStreamError("Stream is closed for sending")
    view = memoryview(data)
    total = len(data)
    sent = 0
    while sent < total:
        batch: bytes | None = None
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
                    batch = b"".join(parts)
        if batch is None:
            self._zero_window_waits += 1
            while True:
                async with self.window_lock:
                    if self.send_window > 0 or self.closed:
                        break
                await trio.sleep(YAMUX_WINDOW_POLL)
            continue
        await self.conn._write_frame(batch)
        sent += take


_PATCHES: list[tuple[Any, str, Any]] = [
    (noise_io.NoiseTransportReadWriter, "read_msg", _noise_transport_read_msg),
    (noise_io.NoiseTransportReadWriter, "write_msg", _noise_transport_write_msg),
    (yamux.YamuxStream, "write", _yamux_stream_write),
]


def apply() -> None:
    """Install the patches above (idempotent)."""
    for owner, name, function in _PATCHES:
        if getattr(owner, name) is not function:
            setattr(owner, name, function)
    setattr(yamux, _MARK, True)


def applied() -> bool:
    return all(getattr(owner, name) is function for owner, name, function in _PATCHES)


__all__ = ["NOISE_RECV_SIZE", "YAMUX_WINDOW_POLL", "YAMUX_WRITE_BATCH", "applied", "apply"]
