"""Ending a byte stream as a failure, so that a cut tunnel never looks like a finished one.

anyio's streams have two ways to end: ``send_eof``/``aclose`` (the far end
reads a clean end of stream) and nothing else. For a tunnel that broke half way
(the relay died, the peer was revoked, the other side reset), a clean end is a
lie that unframed protocols cannot detect: a file copy ends short and looks
complete. TCP has the right signal, a reset (RST); libp2p streams have one too.
:func:`abort` sends it on whichever kind of stream it is given.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import anyio
from anyio.abc import AnyByteReceiveStream, AnyByteSendStream, SocketAttribute

from peerup.core.node import PeerAttribute

#: SO_LINGER on with a zero timeout: close() sends RST and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)

#: /usr/include/netinet/tcp.h: TCP_INFO's first byte is the state; 7 is TCP_CLOSE.
_TCP_CLOSE = 7


async def abort(stream: AnyByteReceiveStream | AnyByteSendStream) -> None:
    """Close ``stream`` so its far end sees a reset: a transport reset, or a TCP RST.

    Works through wrappers (``BufferedByteStream``), since typed attributes are
    looked up through them. Never raises; bounded; safe inside a cancelled scope.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
        reset = stream.extra(PeerAttribute.abort, None)
        if reset is not None:
            with contextlib.suppress(Exception):
                await reset()
        else:
            sock = stream.extra(SocketAttribute.raw_socket, None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    await anyio.aclose_forcefully(stream)


def was_reset(stream: AnyByteReceiveStream | AnyByteSendStream) -> bool:
    """Has the TCP peer of ``stream`` reset the connection? ``False`` when unknown or not TCP.

    Reads the kernel's TCP state (``TCP_INFO``) without consuming the pending
    error, so a reader that has not reached the reset yet still gets it.
    """
    sock = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None or sock.type != socket.SOCK_STREAM or not hasattr(socket, "TCP_INFO"):
        return False
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
    except OSError:
        return False
    return bool(info) and info[0] == _TCP_CLOSE
