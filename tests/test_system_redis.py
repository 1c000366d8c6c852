"""A real Redis through the tunnel: relay, ``peerup serve`` and ``peerup proxy`` as separate
processes, a throwaway ``redis-server`` on 127.0.0.1 as the service.

What a Redis user relies on: ``redis-benchmark`` runs clean through the tunnel and
every request reaches the server; binary values of every size come back byte for byte
over another connection; many short connections in a row all work; and a reply cut
off by a crash of the serving node reaches the client as a reset, never as a reply
that parses as complete. The clients are ``redis-benchmark``, ``redis-cli`` and a
minimal RESP client in this file (binary-safe, so values are compared exactly).

Needs the ``redis-server`` and ``redis-tools`` packages; skipped with the reason when
their binaries are absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from peerup.testing import (
    CliProc,
    CliTunnel,
    MiB,
    free_port,
    kill9,
    socket_ending,
    stop_process,
)

pytestmark = [pytest.mark.system]

REDIS_SERVER, REDIS_CLI, REDIS_BENCHMARK = (shutil.which(n) for n in ("redis-server", "redis-cli", "redis-benchmark"))
missing = [
    n
    for n, b in (("redis-server", REDIS_SERVER), ("redis-cli", REDIS_CLI), ("redis-benchmark", REDIS_BENCHMARK))
    if b is None
]
if missing:
    pytestmark = [
        pytest.mark.system,
        pytest.mark.skip(
            reason=f"Redis binaries not found: {', '.join(missing)} (apt-get install -y redis-server redis-tools)"
        ),
    ]

KiB = 1024
#: Bound on one client operation (a command, a benchmark run) on a shared 2-core machine.
OP_BOUND = 60.0
#: After the serving node is killed, how long the client may wait to learn its connection is gone.
END_BOUND = 10.0


# -- a minimal binary-safe RESP client -----------------------------------------------------


class RespError(Exception):
    """A ``-ERR ...`` reply."""


class Resp:
    """One connection to a Redis server (or to a proxy in front of one), RESP2."""

    def __init__(self, port: int, timeout: float = OP_BOUND) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def encode(*args: bytes | str | int) -> bytes:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
        return b"".join(parts)

    def send(self, *args: bytes | str | int) -> None:
        self.sock.sendall(self.encode(*args))

    def reply(self) -> object:
        return read_reply(self.file)

    def command(self, *args: bytes | str | int) -> object:
        self.send(*args)
        return self.reply()


def read_reply(file: BinaryIO) -> object:
    """One RESP2 reply from ``file``; ``ConnectionError`` if it ends before the reply does."""

    def exact(count: int) -> bytes:
        data = file.read(count)
        if len(data) != count:
            raise ConnectionError(f"short read: {len(data)} of {count} bytes, then EOF")
        return data

    line = file.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection ended inside a reply line: {line[:80]!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = exact(size + 2)
        if data[-2:] != b"\r\n":
            raise ConnectionError("bulk string not followed by CRLF")
        return data[:-2]
    if kind == b"*":
        return [read_reply(file) for _ in range(int(rest))]
    raise ConnectionError(f"not a RESP reply: {line[:80]!r}")


def commands_processed(port: int) -> int:
    """``INFO stats`` total_commands_processed, asked of the server directly (not through the tunnel)."""
    with Resp(port, 10) as conn:
        info = conn.command("INFO", "stats")
    assert isinstance(info, bytes)
    match = re.search(rb"^total_commands_processed:(\d+)\r?$", info, re.MULTILINE)
    assert match, info
    return int(match.group(1))


# -- the service and the tunnel ------------------------------------------------------------


def _start_redis(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    """redis-server on a free port; a few attempts, in case another process took the port first."""
    assert REDIS_SERVER
    errors = []
    for _ in range(3):
        port = free_port()
        proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(tmp_path), "--loglevel", "warning", "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with Resp(port, 1) as conn:
                    if conn.command("PING") == "PONG":
                        return proc, port
            except (OSError, RespError):
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        errors.append(proc.stdout.read().decode(errors="replace") if proc.stdout else "")
    raise AssertionError("redis-server did not answer PING within 10 s (3 attempts):\n" + "\n".join(errors))


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A throwaway redis-server on 127.0.0.1 (no persistence); yields its port."""
    proc, port = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield port
    finally:
        stop_process(proc)


@dataclass
class Tunnel:
    path: str
    procs: CliTunnel
    server: CliProc
    proxy: CliProc
    #: The proxy's local port: Redis as the client sees it.
    port: int
    #: The redis-server's own port, for checks that must not go through the tunnel.
    redis_port: int

    def logs(self) -> str:
        return "\n" + self.procs.logs()


@contextlib.contextmanager
def start_tunnel(root: Path, redis_port: int, path: str) -> Iterator[Tunnel]:
    """relay, ``peerup serve --service redis=127.0.0.1:P`` and ``peerup proxy home redis 0``, on ``path``."""
    procs = CliTunnel(root)
    try:
        stack = procs.start_stack("redis", f"127.0.0.1:{redis_port}", path)
        tunnel = Tunnel(path, procs, stack.server, stack.proxy, stack.port, redis_port)
        with Resp(stack.port) as conn:
            assert conn.command("PING") == "PONG", tunnel.logs()
        stack.proxy.wait_for(rf"connection from .* {path} path", stderr=True)
        yield tunnel
    finally:
        procs.stop()


@pytest.fixture(scope="module", params=["relayed", "direct"])
def tunnel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis: int) -> Iterator[Tunnel]:
    """One tunnel per path for the module's tests (starting three processes costs seconds)."""
    path = str(request.param)
    with start_tunnel(tmp_path_factory.mktemp(f"peerup-{path}"), redis, path) as tunnel:
        yield tunnel
    for proc in tunnel.procs.procs:  # SIGTERM is a clean stop, not a crash
        assert proc.popen.returncode == 0, f"{proc.name} exited with {proc.popen.returncode}" + tunnel.logs()


# -- the cases -------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_through_the_tunnel(tunnel: Tunnel, pipeline: int) -> None:
    """``redis-benchmark -t set,get -n 2000 -c 20 -q [-P 16]``: exit 0, no error, and every
    request reached the server (its own count of commands, read directly)."""
    assert REDIS_BENCHMARK
    requests = 2000
    before = commands_processed(tunnel.redis_port)
    result = subprocess.run(
        [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(tunnel.port), "-t", "set,get", "-n", str(requests),
         "-c", "20", "-P", str(pipeline), "-q"],
        capture_output=True, text=True, timeout=OP_BOUND, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    after = commands_processed(tunnel.redis_port)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output + tunnel.logs()
    assert not re.search(r"error|could not|reset|timeout", result.stdout + result.stderr, re.IGNORECASE), output
    # -q prints one "TEST: N requests per second" line per test (after \r progress lines).
    done = re.findall(r"(SET|GET): ([\d.]+) requests per second", result.stdout)
    assert sorted(test for test, _ in done) == ["GET", "SET"], output
    assert after - before >= 2 * requests, f"the server processed {after - before} commands, sent {2 * requests}"
    print(f"\n{tunnel.path} -P {pipeline}: " + ", ".join(f"{test} {rate} req/s" for test, rate in done))


def test_binary_values_1_byte_to_512_kib_read_back_intact_over_a_fresh_connection(tunnel: Tunnel) -> None:
    """200 random binary values (sizes spread log-uniformly over 1 B .. 512 KiB, both ends
    included, bytes CR/LF and NUL among them) SET over one tunnel connection, GET over
    another, compared by SHA-256; the server's own copy is checked too, to tell a
    corrupted write from a corrupted read."""
    rng = random.Random(f"redis-integrity-{tunnel.path}")
    sizes = [1, 512 * KiB, *(int(2 ** rng.uniform(0, 19)) for _ in range(198))]
    values = {f"integrity:{tunnel.path}:{i}".encode(): rng.randbytes(size) for i, size in enumerate(sizes)}
    values[f"integrity:{tunnel.path}:crlf".encode()] = b"\r\n$-1\r\n*3\r\n\x00" * 100  # RESP look-alikes
    digests = {key: hashlib.sha256(value).hexdigest() for key, value in values.items()}

    with Resp(tunnel.port) as writer:
        for key, value in values.items():
            assert writer.command("SET", key, value) == "OK"
    with Resp(tunnel.port) as reader:
        keys = list(values)  # GETs pipelined 20 at a time, as a client library's pipeline sends them
        back: dict[bytes, str] = {}
        for start in range(0, len(keys), 20):
            batch = keys[start : start + 20]
            reader.sock.sendall(b"".join(Resp.encode("GET", key) for key in batch))
            for key in batch:
                data = reader.reply()
                assert isinstance(data, bytes), f"GET {key!r} through the tunnel returned {data!r}"
                back[key] = hashlib.sha256(data).hexdigest()
    wrong_read = [key for key in keys if back[key] != digests[key]]
    with Resp(tunnel.redis_port) as direct:
        stored = {key: direct.command("GET", key) for key in keys}
    wrong_write = [key for key in keys if not isinstance(stored[key], bytes) or stored[key] != values[key]]
    assert not wrong_write, f"{len(wrong_write)} values stored wrong through the tunnel: {wrong_write[:5]}"
    assert not wrong_read, f"{len(wrong_read)} values read back wrong through the tunnel: {wrong_read[:5]}"
    total = sum(len(value) for value in values.values())
    print(f"\n{tunnel.path}: {len(values)} values, {total / MiB:.1f} MiB each way, intact")


def test_200_short_connections_in_a_row_all_answer(tunnel: Tunnel) -> None:
    """200 sequential connections, each PING -> +PONG and close: 150 with the raw RESP client,
    50 with ``redis-cli ping`` (a process per connection, as a script would)."""
    assert REDIS_CLI
    failures: list[str] = []
    deadline = time.monotonic() + OP_BOUND
    for i in range(150):
        assert time.monotonic() < deadline, f"150 connections took over {OP_BOUND:g} s ({i} done)" + tunnel.logs()
        try:
            with socket.create_connection(("127.0.0.1", tunnel.port), timeout=10) as sock:
                sock.sendall(b"PING\r\n")  # the inline form, as `nc` or telnet would send it
                reply = b""
                while not reply.endswith(b"\r\n") and len(reply) < 64:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as exc:
            reply = repr(exc).encode()
        if reply != b"+PONG\r\n":
            failures.append(f"#{i}: {reply!r}")
    for i in range(150, 200):
        assert time.monotonic() < deadline, f"200 connections took over {OP_BOUND:g} s ({i} done)" + tunnel.logs()
        result = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(tunnel.port), "ping"],
            capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if result.returncode != 0 or result.stdout.strip() != "PONG":
            failures.append(f"#{i} redis-cli: exit {result.returncode}, {result.stdout!r} {result.stderr!r}")
    assert not failures, f"{len(failures)} of 200 connections failed: {failures[:5]}" + tunnel.logs()


#: The value the next test GETs, and where its reader pauses so the kill lands mid-reply.
BIG = 32 * MiB
PAUSE = 4 * MiB


def test_serving_node_killed_mid_get_is_a_reset_never_a_complete_reply(tmp_path: Path, redis: int) -> None:
    """A 32 MiB GET through its own relayed tunnel: the client reads 4 MiB of the reply and
    stops (the senders stall on full buffers), the serving node is killed with SIGKILL,
    the client reads on. It must see a reset after a strict prefix of the exact reply,
    and the RESP client must not return a value."""
    value = random.Random("redis-big").randbytes(BIG)
    expected = b"$%d\r\n" % BIG + value + b"\r\n"
    with Resp(redis) as direct:  # stored directly: this test is about the reply's way back
        assert direct.command("SET", "big", value) == "OK"
    with start_tunnel(tmp_path, redis, "relayed") as tunnel:
        sock = socket.create_connection(("127.0.0.1", tunnel.port), timeout=OP_BOUND)
        try:
            sock.sendall(Resp.encode("GET", "big"))
            received = bytearray()
            deadline = time.monotonic() + OP_BOUND
            while len(received) < PAUSE:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(min(MiB, PAUSE - len(received)))
                assert chunk, f"EOF after {len(received)} bytes, before the kill" + tunnel.logs()
                received += chunk
            kill9(tunnel.server)
            deadline = time.monotonic() + END_BOUND
            ending = None
            while ending is None:
                try:
                    sock.settimeout(max(deadline - time.monotonic(), 0.001))
                    chunk = sock.recv(MiB)
                except OSError as exc:
                    ending = socket_ending(exc)
                else:
                    if chunk:
                        received += chunk
                    else:
                        ending = socket_ending(None)
        finally:
            with contextlib.suppress(OSError):
                sock.close()
        print(f"\nserving node killed: the client received {len(received) / MiB:.2f} MiB, then {ending}")
        assert bytes(received) == expected[: len(received)], "the bytes received are not a prefix of the reply"
        assert len(received) < len(expected), "the whole reply arrived: the kill landed too late" + tunnel.logs()
        assert ending == "reset", f"the client saw {ending!r}, not a reset, after {len(received)} bytes" + tunnel.logs()

        with pytest.raises(ConnectionError):  # what a RESP client makes of it: an error, never a value
            read_reply(io.BytesIO(bytes(received)))
