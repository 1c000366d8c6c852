"""The bare-libp2p baseline: the same hosts and path as peerup, none of peerup's layers.

    python -m benchmarks.bare_libp2p serve --home H --target [NAME=]127.0.0.1:PORT ... [--relay R]
    python -m benchmarks.bare_libp2p proxy --home H --peer-addr MADDR [--service NAME] [--relay R]

Both ends are hosts from ``peerup.plugins.libp2p.node.open_libp2p_node`` (so the
same Noise + yamux + circuit relay v2 and the same process-wide workarounds), but
a raw libp2p stream handler and a plain copy loop replace the runtime: no plugin
host, no discovery, no status line, no anyio ``ByteStream`` adapter, no
``proxy_stream`` hook. The client end listens on a local TCP port like
``peerup proxy``; the serving end connects to ``--target`` like ``peerup serve``.
Several named targets share one serving process (one protocol each), as
``peerup serve`` serves several services, so the CPU figures compare alike.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError

from peerup.core.settings import load_settings
from peerup.plugins.libp2p.node import open_libp2p_node
from peerup.plugins.proxy import CHUNK as PEERUP_CHUNK

PROTOCOL = TProtocol("/peerup-bench/bare/1.0.0")


def protocol(service: str) -> TProtocol:
    """The stream protocol of a named target; ``bench`` (or no name) keeps the original ID."""
    return PROTOCOL if service == "bench" else TProtocol(f"/peerup-bench/bare-{service}/1.0.0")


CHUNK = PEERUP_CHUNK  # the same read size as peerup's proxy_stream
_EOF = (StreamEOF, MuxedStreamEOF, EOFError)
_BROKEN = (StreamError, MuxedStreamError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


async def _p2p_to_tcp(stream, sock: trio.SocketStream) -> None:  # type: ignore[no-untyped-def]
    try:
        while True:
            try:
                data = await stream.read(CHUNK)
            except _EOF:
                break
            if not data:
                break
            await sock.send_all(data)
        await sock.send_eof()
    except _BROKEN:
        pass


async def _tcp_to_p2p(sock: trio.SocketStream, stream) -> None:  # type: ignore[no-untyped-def]
    try:
        while True:
            data = await sock.receive_some(CHUNK)
            if not data:
                break
            await stream.write(data)
        await stream.close_write()
    except _BROKEN:
        pass


async def _splice(stream, sock: trio.SocketStream) -> None:  # type: ignore[no-untyped-def]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_p2p_to_tcp, stream, sock)
            nursery.start_soon(_tcp_to_p2p, sock, stream)
    finally:
        with trio.CancelScope(shield=True):
            await sock.aclose()
            try:
                await stream.close()
            except Exception:  # noqa: BLE001
                await stream.reset()


def _handler(host_name: str, port: int):  # type: ignore[no-untyped-def]
    async def handler(stream) -> None:  # type: ignore[no-untyped-def]
        sock = await trio.open_tcp_stream(host_name, port)
        await _splice(stream, sock)

    return handler


async def serve(args: argparse.Namespace) -> None:
    # Relayed rows must stay relayed on 127.0.0.1 (see run.py): no confirmed address, no punching.
    settings = load_settings(
        args.home,
        relays=args.relay or [],
        listen=["/ip4/127.0.0.1/tcp/0"],
        nat={"hole_punching": False, "address_discovery": False},
    )
    async with open_libp2p_node(settings, "node") as node:
        for target in args.target:
            name, _, address = target.rpartition("=")
            host_name, port = address.rsplit(":", 1)
            node.host.set_stream_handler(protocol(name or "bench"), _handler(host_name, int(port)))
        print(f"peer {node.peer_id}", flush=True)
        for addr in node.listen_addrs():
            print(f"  reachable at {addr}", flush=True)
        await trio.sleep_forever()


async def proxy(args: argparse.Namespace) -> None:
    settings = load_settings(args.home, relays=args.relay or [], listen=["/ip4/127.0.0.1/tcp/0"])
    peer_text = args.peer_addr.rsplit("/p2p/", 1)[1]
    peer = ID.from_base58(peer_text)
    async with open_libp2p_node(settings, "node") as node:
        lock = trio.Lock()

        async def ensure_connected() -> None:
            async with lock:
                if node.is_connected(peer):
                    return
                if "/p2p-circuit" in args.peer_addr:
                    error = await node._connect_circuit(args.peer_addr)
                else:
                    error = await node._connect_direct(peer, args.peer_addr)
                if error:
                    raise RuntimeError(error)

        async def on_client(sock: trio.SocketStream) -> None:
            try:
                await ensure_connected()
                stream = await node.host.new_stream(peer, [protocol(args.service)])
            except Exception as exc:  # noqa: BLE001
                print(f"error: {exc}", flush=True)
                await sock.aclose()
                return
            await _splice(stream, sock)

        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
        port = listeners[0].socket.getsockname()[1]
        print(f"forwarding 127.0.0.1:{port}", flush=True)
        await trio.serve_listeners(on_client, listeners)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bare_libp2p")
    parser.add_argument("role", choices=["serve", "proxy"])
    parser.add_argument("--home", type=Path, required=True)
    parser.add_argument("--relay", action="append")
    parser.add_argument("--target", action="append", default=[], help="serve: [NAME=]HOST:PORT (repeatable)")
    parser.add_argument("--service", default="bench", help="proxy: which named target (default bench)")
    parser.add_argument("--peer-addr", help="proxy: the serving end's full multiaddr (direct or circuit)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve if args.role == "serve" else proxy, args)


if __name__ == "__main__":
    main()
