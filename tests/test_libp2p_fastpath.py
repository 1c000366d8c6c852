"""The Noise/yamux fast path (peerup/plugins/libp2p/fastpath.py) keeps every byte in order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.stream_muxer.yamux.yamux import Yamux

from peerup.core.settings import load_settings
from peerup.plugins.libp2p import fastpath
from peerup.plugins.libp2p.node import Libp2pNode, open_libp2p_node

pytestmark = pytest.mark.anyio
PROTOCOL = TProtocol("/peerup-test/fastpath/1.0.0")


def _home(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "peerup", "--home", str(path), "init"], check=True, capture_output=True)
    return path


async def test_odd_sized_writes_arrive_intact(tmp_path: Path) -> None:
    """Writes of many sizes (1 B to 1 MiB + 7: several frames, batches and Noise chunks) arrive in order."""
    sizes = [1, 12, 65523, 65524, 65525, 65536, 131049, 262144, 262145, (1 << 20) + 7, 3]
    payload = [os.urandom(n) for n in sizes]
    expected = b"".join(payload)
    a_settings = load_settings(_home(tmp_path / "a"), listen=["/ip4/127.0.0.1/tcp/0"])
    b_settings = load_settings(_home(tmp_path / "b"), listen=["/ip4/127.0.0.1/tcp/0"])
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:

        async def handler(stream) -> None:  # type: ignore[no-untyped-def]
            for chunk in payload:
                await stream.write(chunk)
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
        got = bytearray()
        with trio.fail_after(30):
            while True:
                try:
                    got += await stream.read(70000)
                except EOFError:
                    break
        assert bytes(got) == expected


def test_chunk_buffer_behaves_like_the_bytearray_it_replaces() -> None:
    """(6) Every operation yamux.py uses on a stream buffer gives what a bytearray gives."""
    import random

    rng = random.Random(7)
    real = bytearray()
    fake = fastpath._ChunkBuffer(bytearray(b"seed"))
    real += b"seed"
    for _ in range(2000):
        op = rng.choice(["extend", "extend", "take", "take", "all", "clear"])
        if op == "extend":
            data = os.urandom(rng.choice([0, 1, 5, 100, 65524]))
            real.extend(data)
            fake.extend(rng.choice([bytes, bytearray, memoryview])(data))
        elif op == "take":
            n = rng.choice([0, 1, 3, 1000, 65536, 300000])
            assert fake[:n] == bytes(real[:n])
            del fake[:n]
            del real[:n]
        elif op == "all":
            assert bytes(fake) == bytes(real)
        elif rng.random() < 0.1:
            fake.clear()
            real.clear()
        assert len(fake) == len(real)
        assert bool(fake) == bool(real)
    assert bytes(fake) == bytes(real)
    assert fake[2:5] == bytes(real[2:5])  # other slices: correct, if slower


def test_stream_buffers_store_chunk_buffers() -> None:
    buffers = fastpath._StreamBuffers()
    buffers[1] = bytearray()
    assert isinstance(buffers[1], fastpath._ChunkBuffer)
    assert len(buffers.get(2, b"")) == 0


async def _pair(tmp_path: Path):  # type: ignore[no-untyped-def]
    a_settings = load_settings(_home(tmp_path / "a"), listen=["/ip4/127.0.0.1/tcp/0"])
    b_settings = load_settings(_home(tmp_path / "b"), listen=["/ip4/127.0.0.1/tcp/0"])
    return a_settings, b_settings


def _yamux_of(node: Libp2pNode, peer: Libp2pNode) -> Yamux:
    conn = node.host.get_network().get_connections(peer.host.get_id())[0].muxed_conn
    assert isinstance(conn, Yamux)
    return conn


async def test_more_than_256_streams_at_once_on_one_connection(tmp_path: Path) -> None:
    """(4) Upstream's yamux let 256 streams be open per connection and the 257th wait silently."""
    count = 300
    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:
        release = trio.Event()

        async def handler(stream) -> None:  # type: ignore[no-untyped-def]
            await stream.write(b"x")
            await release.wait()
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        streams = []

        async def open_one() -> None:
            stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
            assert await stream.read(1) == b"x"
            streams.append(stream)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(count):
                    nursery.start_soon(open_one)
        assert len(streams) == count
        conn = _yamux_of(b, a)
        assert conn.stream_backlog_limit == fastpath.YAMUX_MAX_STREAMS
        release.set()
        for stream in streams:
            await stream.close()


async def test_a_full_connection_refuses_a_stream_at_once_and_says_why(tmp_path: Path) -> None:
    """(4) At the limit, open_stream raises a message naming it instead of waiting."""
    from libp2p.stream_muxer.exceptions import MuxedStreamError

    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:
        a.host.set_stream_handler(PROTOCOL, lambda stream: trio.sleep(5))
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        conn = _yamux_of(b, a)
        conn.stream_backlog_limit = 1
        conn.stream_backlog_semaphore = trio.Semaphore(1)
        first = await conn.open_stream()
        with trio.fail_after(2), pytest.raises(MuxedStreamError, match="1 streams already open"):
            await conn.open_stream()
        await first.reset()


async def test_pipelined_negotiation_falls_back_and_refuses_like_upstream(tmp_path: Path) -> None:
    """(5) Handshake + first protocol in one write; an unknown first protocol falls back to the next."""
    from libp2p.host.exceptions import StreamFailure

    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:

        async def handler(stream) -> None:  # type: ignore[no-untyped-def]
            await stream.write(b"ok")
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        with trio.fail_after(10):
            stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
            assert stream.get_protocol() == PROTOCOL
            assert await stream.read(2) == b"ok"
            unknown = TProtocol("/peerup-test/nobody/1.0.0")
            stream = await b.host.new_stream(a.host.get_id(), [unknown, PROTOCOL])
            assert stream.get_protocol() == PROTOCOL
            assert await stream.read(2) == b"ok"
            with pytest.raises(StreamFailure):
                await b.host.new_stream(a.host.get_id(), [unknown])


async def test_small_reads_send_no_window_updates(tmp_path: Path) -> None:
    """(7) Credit goes back at half the window (go-yamux), not after every read."""
    import struct

    from libp2p.stream_muxer.yamux import yamux

    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:
        done = trio.Event()
        updates: list[int] = []

        async def handler(stream) -> None:  # type: ignore[no-untyped-def]
            conn = stream.muxed_conn
            original = conn._write_frame

            async def counting(data: bytes) -> None:
                _, typ, flags, _, length = struct.unpack(yamux.YAMUX_HEADER_FORMAT, data[: yamux.HEADER_SIZE])
                if typ == yamux.TYPE_WINDOW_UPDATE and not flags:
                    updates.append(length)
                await original(data)

            conn._write_frame = counting
            for _ in range(50):
                assert await stream.read(1)
            conn._write_frame = original
            done.set()
            await stream.close()

        a.host.set_stream_handler(PROTOCOL, handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])
        with trio.fail_after(10):
            for _ in range(50):
                await stream.write(b"y")
            await done.wait()
        assert updates == []


class _Collector:
    """``streams`` streams from ``b`` to ``a``; ``a`` keeps what each sends (``size`` bytes), by its first byte."""

    def __init__(self, streams: int, size: int) -> None:
        self.streams, self.size = streams, size
        self.received: dict[int, bytes] = {}
        self.all_in = trio.Event()

    async def handler(self, stream) -> None:  # type: ignore[no-untyped-def]
        data = b""
        while len(data) < self.size:
            chunk = await stream.read(65536)
            assert chunk, "stream ended early"
            data += chunk
        self.received[data[0]] = data
        if len(self.received) == self.streams:
            self.all_in.set()
        await stream.close()

    async def open(self, a: Libp2pNode, b: Libp2pNode) -> list:  # type: ignore[type-arg]
        a.host.set_stream_handler(PROTOCOL, self.handler)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        return [await b.host.new_stream(a.host.get_id(), [PROTOCOL]) for _ in range(self.streams)]


async def test_frames_queued_behind_a_write_go_out_together(tmp_path: Path) -> None:
    """(8) 20 streams sending small messages at once: frames that waited for the connection share a send.

    Upstream encrypted and sent each yamux frame on its own, so the CPU per
    message grew with the number of messages, not with the bytes. Every byte
    must still arrive, in order, on its own stream.
    """
    streams, messages = 20, 50
    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:
        collector = _Collector(streams, 64 * messages)
        opened = await collector.open(a, b)
        secured = _yamux_of(b, a).secured_conn
        writes: list[int] = []
        original = secured.write

        async def counting(data: bytes) -> None:
            writes.append(len(data))
            await original(data)

        secured.write = counting  # type: ignore[method-assign]

        async def send(index: int, stream) -> None:  # type: ignore[no-untyped-def]
            for _ in range(messages):
                await stream.write(bytes([index]) * 64)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index, stream in enumerate(opened):
                    nursery.start_soon(send, index, stream)
            secured.write = original  # type: ignore[method-assign]
            await collector.all_in.wait()
    assert collector.received == {i: bytes([i]) * 64 * messages for i in range(streams)}
    frames = streams * messages
    assert len(writes) <= frames // 2, f"{len(writes)} secure writes for {frames} frames"


class _Steps(trio.abc.Instrument):
    """Counts task steps: each is one pass of a task through trio's scheduler."""

    def __init__(self) -> None:
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += 1


async def test_a_message_costs_few_scheduler_passes(tmp_path: Path) -> None:
    """(9) A 64-byte request and its echo over a libp2p stream take a bounded number of scheduler passes.

    Both hosts run in this process, so the count covers the writer, both
    connections' readers and the echo handler. Upstream's locks, each of
    which yields even when nobody holds it, made that 24 passes per round
    trip (6 with quick locks); the passes, not the bytes, were the CPU per
    RPC message. Every answer is still checked.
    """
    rounds = 200
    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:

        async def echo(stream) -> None:  # type: ignore[no-untyped-def]
            for _ in range(rounds + 10):
                await stream.write(await stream.read(65536))

        a.host.set_stream_handler(PROTOCOL, echo)
        assert await b._connect_direct(a.host.get_id(), a.direct_addrs()[0]) is None
        stream = await b.host.new_stream(a.host.get_id(), [PROTOCOL])

        async def round_trip(index: int) -> None:
            message = index.to_bytes(2, "big") * 32
            await stream.write(message)
            answer = b""
            while len(answer) < len(message):
                answer += await stream.read(65536)
            assert answer == message

        with trio.fail_after(30):
            for index in range(10):  # warm: negotiation, window updates
                await round_trip(index)
            steps = _Steps()
            trio.lowlevel.add_instrument(steps)
            try:
                for index in range(rounds):
                    await round_trip(index)
            finally:
                trio.lowlevel.remove_instrument(steps)
        await stream.reset()
    per_round_trip = steps.steps / rounds
    assert per_round_trip <= 12, f"{per_round_trip:.1f} scheduler passes per round trip"


async def test_quick_lock_hands_over_in_order_and_skips_cancelled_waiters() -> None:
    """(9) QuickLock keeps trio.Lock's contract where libp2p relies on it: one holder, FIFO, no lost hand-over."""
    lock = fastpath.QuickLock()
    order: list[str] = []
    inside = 0

    async def worker(name: str, hold: float) -> None:
        nonlocal inside
        async with lock:
            inside += 1
            assert inside == 1, "two holders at once"
            order.append(name)
            await trio.sleep(hold)
            inside -= 1

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker, "first", 0.05)
            await trio.sleep(0.01)
            nursery.start_soon(worker, "second", 0)
            await trio.sleep(0.01)
            cancelled = trio.CancelScope()

            async def gives_up() -> None:
                with cancelled:
                    await worker("never", 0)

            nursery.start_soon(gives_up)
            await trio.sleep(0.01)
            nursery.start_soon(worker, "third", 0)
            await trio.sleep(0.001)
            cancelled.cancel()  # a parked waiter leaves; the lock must still reach "third"
    assert order == ["first", "second", "third"]
    assert not lock.locked()
    lock.acquire_nowait()
    with pytest.raises(trio.WouldBlock):
        lock.acquire_nowait()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()


class _Passes(trio.abc.Instrument):
    """Counts passes of trio's run loop (one I/O wait each)."""

    def __init__(self) -> None:
        self.passes = 0

    def before_io_wait(self, timeout: float) -> None:
        self.passes += 1


async def test_writers_queued_on_one_connection_are_released_together(tmp_path: Path) -> None:
    """(8) 100 streams writing at once: the ones whose frames went out in a shared write return together.

    With a lock, the writer hands over to one waiter at a time; each needs a
    pass of the run loop only to find its frame already sent, so the last
    of 100 streams waited 100 passes. Every byte still arrives.
    """
    streams = 100
    a_settings, b_settings = await _pair(tmp_path)
    async with open_libp2p_node(a_settings, "node") as a, open_libp2p_node(b_settings, "node") as b:
        collector = _Collector(streams, 64)
        opened = await collector.open(a, b)
        with trio.fail_after(30):
            await trio.sleep(0.2)  # the SYNs and their ACKs are done
            passes = _Passes()
            trio.lowlevel.add_instrument(passes)
            try:
                async with trio.open_nursery() as nursery:
                    for index, stream in enumerate(opened):
                        nursery.start_soon(stream.write, bytes([index]) * 64)
            finally:
                trio.lowlevel.remove_instrument(passes)
            await collector.all_in.wait()
    assert collector.received == {i: bytes([i]) * 64 for i in range(streams)}
    assert passes.passes <= streams // 4, f"{passes.passes} run-loop passes for {streams} queued writes"
