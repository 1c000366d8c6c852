"""anyio ``ByteStream`` over a libp2p stream, so the core never sees libp2p types.

libp2p signals end-of-stream by raising ``StreamEOF`` (``read()`` never returns
``b""``) and a broken stream with ``StreamReset``/``StreamError``; anyio code
expects ``EndOfStream`` and ``BrokenResourceError``. Half-close maps to
``close_write()``, which with yamux sends FIN and keeps the read side open.
With peerup's yamux session (:mod:`.muxer`) ``StreamEOF`` means the peer's FIN
and nothing else: a reset or a lost connection is ``BrokenResourceError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import anyio
from anyio.abc import ByteStream
from libp2p.abc import INetStream
from libp2p.connection_types import ConnectionType
from libp2p.network.stream.exceptions import StreamClosed, StreamEOF, StreamError
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError

from peerup.core.node import PeerAttribute

#: Reads return at most this much unless the caller asks for less.
DEFAULT_MAX_BYTES = 256 * 1024


def _conn_of(stream: INetStream) -> Any:
    return getattr(stream, "swarm_conn", None) or getattr(stream, "muxed_conn", None)


def stream_path(stream: INetStream) -> str:
    """``"relayed"`` when the stream's connection is a circuit, else ``"direct"``."""
    for conn in (getattr(stream, "swarm_conn", None), getattr(stream, "muxed_conn", None)):
        if conn is None:
            continue
        try:
            if conn.get_connection_type() == ConnectionType.RELAYED:
                return "relayed"
        except Exception:  # noqa: BLE001 - best effort: some conns lack transport info
            continue
    return "relayed" if "/p2p-circuit" in stream_remote_address(stream) else "direct"


def stream_remote_address(stream: INetStream) -> str:
    """The address the stream's connection uses, as a multiaddr string when known."""
    conn = _conn_of(stream)
    try:
        addrs = conn.get_transport_addresses() if conn is not None else []
    except Exception:  # noqa: BLE001 - best effort, for logs only
        addrs = []
    if addrs:
        return str(addrs[0])
    try:
        remote = stream.get_remote_address()
    except Exception:  # noqa: BLE001 - best effort, for logs only
        remote = None
    if remote is None:
        return ""
    host, port = remote
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


class Libp2pByteStream(ByteStream):
    """An :class:`anyio.abc.ByteStream` over a libp2p ``INetStream``."""

    def __init__(self, stream: INetStream, remote_peer: str, path: str | None = None) -> None:
        self._stream = stream
        self._remote_peer = remote_peer
        self._path = path or stream_path(stream)
        # Formatting a multiaddr costs ~0.1 ms per stream (py-spy, warm tunnel
        # set-up); only logs ask for it, so it is computed on first use.
        self._remote_address: str | None = None
        self._eof_sent = False
        self._closed = False

    @property
    def libp2p_stream(self) -> INetStream:
        return self._stream

    async def receive(self, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
        if self._closed:
            raise anyio.ClosedResourceError
        try:
            data = await self._stream.read(max_bytes)
        except (StreamEOF, MuxedStreamEOF, EOFError) as exc:
            raise anyio.EndOfStream from exc
        except (StreamError, MuxedStreamError, OSError) as exc:
            raise anyio.BrokenResourceError(f"peer stream broken: {exc or exc.__class__.__name__}") from exc
        if not data:  # not expected from libp2p, but b"" must never reach anyio code
            raise anyio.EndOfStream
        return data

    async def send(self, item: bytes) -> None:
        if self._closed or self._eof_sent:
            raise anyio.ClosedResourceError
        try:
            await self._stream.write(item)
        except (StreamClosed, StreamError, MuxedStreamError, OSError) as exc:
            raise anyio.BrokenResourceError(f"peer stream broken: {exc or exc.__class__.__name__}") from exc

    async def send_eof(self) -> None:
        if self._eof_sent or self._closed:
            return
        self._eof_sent = True
        try:
            await self._stream.close_write()  # type: ignore[attr-defined]
        except (StreamError, MuxedStreamError, OSError) as exc:
            raise anyio.BrokenResourceError(f"peer stream broken: {exc or exc.__class__.__name__}") from exc

    async def aclose(self) -> None:
        """FIN when the peer has finished sending too; otherwise a reset, as TCP's close() does.

        A stream closed while the peer may still send (a refused request, a
        handler that returned early) would otherwise keep its receive buffer
        and its slot until the peer happens to finish.
        """
        if self._closed:
            return
        self._closed = True
        muxed = getattr(self._stream, "muxed_stream", None)
        if not getattr(muxed, "finished_receiving", True):
            await self.abort()
            return
        try:
            await self._stream.close()
        except Exception:  # noqa: BLE001 - any failure: fall back to reset
            # Already reset or the connection is gone: nothing left to flush.
            await self.abort()

    async def abort(self) -> None:
        """Reset the stream: the peer reads a reset, never a clean end."""
        self._closed = True
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self._stream.reset()

    def _get_remote_address(self) -> str:
        if self._remote_address is None:
            self._remote_address = stream_remote_address(self._stream)
        return self._remote_address

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {
            PeerAttribute.remote_peer: lambda: self._remote_peer,
            PeerAttribute.path: lambda: self._path,
            PeerAttribute.remote_address: self._get_remote_address,
            PeerAttribute.abort: lambda: self.abort,
        }
