"""Real nodes for integration tests: a relay, serving nodes and clients in one process.

Everything is real: libp2p hosts on 127.0.0.1, the built-in plugins loaded from
the entry points, the core runtime, and TCP services on loopback sockets. It
ships with peerup so that a plugin's own test suite, outside this repository,
can start the same relay and nodes peerup's tests use (docs/plugins.md).
Async helpers need the trio backend (``anyio_backend`` fixture returning "trio").
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ByteStream, SocketStream

from peerup.core.node import Node
from peerup.core.plugins import load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import ServiceSettings, Settings
from peerup.plugins.libp2p.identity import create_identity

LOCAL = "/ip4/127.0.0.1/tcp/0"
#: Short delays so retry tests take seconds, not minutes; the shape (doubling, cap) is the seed's.
FAST_RETRY = {"retries": 3, "initial": 0.2, "multiplier": 2.0, "max_delay": 1.0}
#: ``nat=RELAYED_ONLY`` for a test about the relayed path itself: on 127.0.0.1 every
#: node is reachable directly, so with the defaults peers find and use a direct path
#: (a dial-back confirms 127.0.0.1:PORT, hole punching upgrades relayed connections).
RELAYED_ONLY = {"hole_punching": False, "address_discovery": False, "port_mapping": False}
#: The same as config.toml lines, for a peerup home a CLI test starts a process in.
RELAYED_ONLY_TOML = "[nat]\n" + "".join(f"{key} = {str(value).lower()}\n" for key, value in RELAYED_ONLY.items())


def make_settings(home: Path, **values: Any) -> Settings:
    if not (home / "identity.key").exists():
        create_identity(home)
    values.setdefault("listen", [LOCAL])
    values.setdefault("retry", FAST_RETRY)
    return Settings(home=home, **values)


@asynccontextmanager
async def relay(tmp_path: Path, listen: str = LOCAL, **limits: Any) -> AsyncIterator[str]:
    """A relay + DHT bootstrap node; yields its dialable address. ``limits``: [relay] settings."""
    settings = make_settings(tmp_path / "relay", relay={"listen": [listen], **limits})
    runtime = Runtime(settings, load_plugins())
    async with runtime.node("relay") as node:
        yield node.listen_addrs()[0]


@asynccontextmanager
async def serving_node(
    tmp_path: Path,
    relay_addr: str,
    services: dict[str, str],
    name: str = "server",
    authorized: list[str] | None = None,
    **values: Any,
) -> AsyncIterator[tuple[Runtime, Node]]:
    """A node exposing ``services`` (name -> host:port) and holding a relay slot.

    ``authorized`` is written to its authorized_keys; ``None`` serves any peer
    (``auth.allow_all``), for tests about the tunnel rather than about who may use it.
    """
    if authorized is not None:
        keys = tmp_path / name / "authorized_keys"
        keys.parent.mkdir(parents=True, exist_ok=True)
        keys.write_text("".join(f"{peer}\n" for peer in authorized))
    else:
        values.setdefault("auth", {"allow_all": True})
    settings = make_settings(
        tmp_path / name,
        relays=[relay_addr],
        services={key: ServiceSettings(name=key, address=addr) for key, addr in services.items()},
        **values,
    )
    runtime = Runtime(settings, load_plugins())
    async with runtime.node() as node:
        runtime.expose(node, settings.services)
        yield runtime, node


@asynccontextmanager
async def client_node(
    tmp_path: Path, relay_addr: str, name: str = "client", **values: Any
) -> AsyncIterator[tuple[Runtime, Node]]:
    settings = make_settings(tmp_path / name, relays=[relay_addr], **values)
    runtime = Runtime(settings, load_plugins())
    async with runtime.node() as node:
        yield runtime, node


Handler = Callable[[SocketStream], Awaitable[None]]


@asynccontextmanager
async def tcp_service(handler: Handler) -> AsyncIterator[str]:
    """A real TCP service on 127.0.0.1; yields ``host:port``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handler)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def tcp_pair() -> tuple[SocketStream, SocketStream]:
    """The two ends of one real TCP connection on 127.0.0.1: (client, server)."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        client = await anyio.connect_tcp("127.0.0.1", port)
        inner = listener.listeners[0]
        assert isinstance(inner, anyio.abc.SocketListener)
        server = await inner.accept()
    return client, server


async def echo_handler(stream: SocketStream) -> None:
    """Echo until EOF, then half-close: the shape of a request/response service."""
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
            await stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


async def read_all(stream: Any) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(await stream.receive())
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return b"".join(chunks)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, SIGKILL after ``timeout``, then close its pipes: a real service a test started (sshd, redis)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- additions for the reliability tests (tests/test_faults.py, test_soak.py, ...) --------


@asynccontextmanager
async def relay_node(
    tmp_path: Path, listen: str = LOCAL, timeouts: dict[str, Any] | None = None, **relay_limits: Any
) -> AsyncIterator[tuple[str, Node]]:
    """Like :func:`relay`, with relay limits (``circuit_duration=...``), timeouts, and the node itself."""
    settings = make_settings(tmp_path / "relay", relay={"listen": [listen], **relay_limits}, timeouts=timeouts or {})
    runtime = Runtime(settings, load_plugins())
    async with runtime.node("relay") as node:
        yield node.listen_addrs()[0], node


async def run_relay(
    tmp_path: Path,
    listen: str,
    stop: anyio.Event,
    stopped: anyio.Event | None = None,
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A relay in a task until ``stop`` is set (a relay that can be "killed" and started again).

    ``stopped`` is set once the relay has closed its connections and listener:
    setting ``stop`` only asks it to go, and traffic can still pass meanwhile.
    """
    async with relay(tmp_path, listen) as addr:
        task_status.started(addr)
        await stop.wait()
    if stopped is not None:
        stopped.set()


@asynccontextmanager
async def proxy_listener(runtime: Runtime, node: Node, peer: str, service: str = "svc") -> AsyncIterator[int]:
    """``peerup proxy``'s listener in-process: yields the local port; tunnels end with it."""
    from peerup.core.settings import ProxySettings

    async with anyio.create_task_group() as tg:
        port = await tg.start(runtime.serve_proxy, node, ProxySettings(peer=peer, service=service, port=0), tg)
        try:
            yield port
        finally:
            tg.cancel_scope.cancel()


async def exchange(stream: ByteStream, payload: bytes) -> bytes:
    """Send ``payload``, half-close, read everything back, close: one request/response."""
    async with stream:
        await stream.send(payload)
        await stream.send_eof()
        return await read_all(stream)


async def echo_roundtrip(port: int, payload: bytes) -> bytes:
    """:func:`exchange` over a new TCP connection to 127.0.0.1:port."""
    return await exchange(await anyio.connect_tcp("127.0.0.1", port), payload)


class Cable:
    """A TCP forwarder standing in for the network between a node and the relay.

    ``cut()`` makes the peer behind it vanish without closing anything: bytes stop
    flowing both ways and no FIN or RST is ever sent (a pulled cable, a laptop lid,
    a NAT mapping dropped). ``yank()`` closes every socket at once, as the kernel
    does for a process that was killed.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._cut = anyio.Event()
        self._streams: list[SocketStream] = []
        self._tg: anyio.abc.TaskGroup | None = None

    async def _pump(self, source: SocketStream, sink: SocketStream) -> None:
        with anyio.CancelScope() as scope:
            self._scopes.append(scope)
            try:
                async for chunk in source:
                    await sink.send(chunk)
                await sink.send_eof()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def _handle(self, downstream: SocketStream) -> None:
        # Every socket is closed when the cable is taken down (its task group
        # cancelled), also those a cut keeps open until then.
        async with downstream:
            if self._cut.is_set():
                await anyio.sleep_forever()  # a black hole also swallows new connections
            upstream = await anyio.connect_tcp(*self.target)
            async with upstream:
                self.connections += 1
                self._streams += [downstream, upstream]
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, downstream, upstream)
                    tg.start_soon(self._pump, upstream, downstream)
                # Both directions ended (not cut): close like a forwarder would.
                if self._cut.is_set():
                    await anyio.sleep_forever()

    async def run(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        self._scopes: list[anyio.CancelScope] = []
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = int(listener.extra(anyio.abc.SocketAttribute.local_port))
        async with listener, anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started(self.port)
            await listener.serve(self._handle, task_group=tg)

    def cut(self) -> None:
        """Stop every byte, both ways, keep every socket open."""
        self._cut.set()
        for scope in self._scopes:
            scope.cancel()

    async def yank(self) -> None:
        """Close every socket abruptly (RST), like the kernel after ``kill -9``."""
        import contextlib
        import socket
        import struct

        self.cut()
        for stream in self._streams:
            sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await anyio.aclose_forcefully(stream)


def open_fds() -> int:
    """Open file descriptors of this process."""
    import os

    return len(os.listdir("/proc/self/fd"))


def trio_task_count() -> int:
    """Tasks alive in this trio run: a walk from the root task through every nursery."""
    import trio

    count = 0
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            todo.extend(nursery.child_tasks)
    return count


async def settle(measure: Callable[[], int], target: int, timeout: float, slack: int = 0) -> int:
    """Poll ``measure()`` until it is at most ``target + slack`` or ``timeout`` passes; return the last value."""
    value = measure()
    with anyio.move_on_after(timeout):
        while value > target + slack:
            await anyio.sleep(0.1)
            value = measure()
    return value


# -- the real CLI in separate processes (tests/test_system_ssh.py, tests/test_netns.py) ----

PEERUP_CMD = [sys.executable, "-m", "peerup"]


def clean_env() -> dict[str, str]:
    """This process's environment without PEERUP_* (a developer's shell must not leak in).

    ``PEERUP_PATCHES_OFF`` stays: tests/test_libp2p_patches.py switches a libp2p
    patch off with it, in every process of the test it runs.
    """
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PEERUP_") or k == "PEERUP_PATCHES_OFF"}


class OutputLines:
    """A child process's stdout and stderr lines, collected by two threads as they arrive.

    Each reader closes its pipe at EOF, so a finished process leaves none open.
    """

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        import threading

        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True)
            for stream, sink in ((popen.stdout, self.lines), (popen.stderr, self.errors))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _collect(stream: Any, sink: list[str]) -> None:
        with stream:
            for line in stream:
                sink.append(line.rstrip("\n"))

    def join(self, timeout: float = 5.0) -> None:
        """Wait, bounded, for both pipes to reach EOF (after the process is gone)."""
        for reader in self._readers:
            reader.join(timeout)


class CliProc:
    """A running ``peerup`` command (optionally under a prefix like ``ip netns exec A``).

    Its stdout and stderr lines are collected as they arrive; :meth:`wait_for`
    waits, bounded, for a line; :meth:`stop` sends SIGTERM, then SIGKILL after 15 s.
    """

    def __init__(
        self, name: str, args: list[str], prefix: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            [*prefix, *PEERUP_CMD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env={**clean_env(), **(env or {})},
        )
        self.output = OutputLines(self.popen)
        self.lines = self.output.lines
        self.errors = self.output.errors

    def wait_for(self, pattern: str, timeout: float = 30.0, stderr: bool = False) -> re.Match[str]:
        import time

        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            for line in list(self.errors if stderr else self.lines):
                match = regex.search(line)
                if match:
                    return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"{self.name} did not print /{pattern}/ within {timeout:g} s (exit code {self.popen.poll()});\n"
            f"stdout: {self.lines[-10:]}\nstderr tail:\n" + "\n".join(self.errors[-20:])
        )

    def stop(self) -> int:
        import contextlib

        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self.output.join(5)  # the process is gone: its pipes reach EOF
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    pipe.close()
        return self.popen.returncode


def peerup_run(
    args: list[str], prefix: Sequence[str] = (), timeout: float = 60.0, env: Mapping[str, str] | None = None
) -> Any:
    """Run a short ``peerup`` command to completion (bounded); returns the CompletedProcess.

    ``env`` adds to (or overrides) a copy of this process's environment without
    ``PEERUP_*``, e.g. ``{"PEERUP_HOME": str(home), "PEERUP_PLUGIN__HELLO__DELAY": "-1"}``.
    """
    return subprocess.run(
        [*prefix, *PEERUP_CMD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**clean_env(), **(env or {})},
    )


def init_home(home: Path, prefix: Sequence[str] = ()) -> str:
    """``peerup --home HOME init``; returns the new peer ID."""
    result = peerup_run(["--home", str(home), "init"], prefix)
    assert result.returncode == 0, result.stderr
    return str(result.stdout).strip().splitlines()[-1]


class CliTunnel:
    """relay + ``peerup serve`` + ``peerup proxy`` as real processes (prefixes for namespaces)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[CliProc] = []

    def start(self, name: str, args: list[str], prefix: Sequence[str] = ()) -> CliProc:
        proc = CliProc(name, args, prefix)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> str:
        return "\n".join(f"-- {p.name} (exit {p.popen.poll()}):\n" + "\n".join(p.errors[-25:]) for p in self.procs)

    def start_stack(self, service: str, target: str, path: str) -> CliStack:
        """A relay, ``peerup serve --service SERVICE=TARGET`` and ``peerup proxy`` to it, in homes under root.

        The laptop's peer ID is authorized on the serving node. ``path="relayed"``:
        neither node confirms its address nor punches (on 127.0.0.1 they could),
        so the connection stays on the relay. ``"direct"``: the defaults; the proxy
        starts once the serving node advertises its confirmed address, so its
        first lookup already finds the direct one.
        """
        homes = {name: self.root / name for name in ("relay", "home", "laptop")}
        ids = {name: init_home(home) for name, home in homes.items()}
        if path == "relayed":
            for name in ("home", "laptop"):
                (homes[name] / "config.toml").write_text(RELAYED_ONLY_TOML)
        added = peerup_run(["--home", str(homes["home"]), "auth", "add", ids["laptop"], "--comment", "laptop"])
        assert added.returncode == 0, added.stderr
        relay = self.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        )
        relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        server = self.start(
            "serve",
            ["--home", str(homes["home"]), "-v", "serve", "--service", f"{service}={target}", "--relay", relay_addr],
        )
        server.wait_for(r"reachable at \S+p2p-circuit")
        if path == "direct":
            server.wait_for(r"advertising /ip4/127\.0\.0\.1/tcp/", stderr=True)
        proxy = self.start(
            "proxy",
            ["--home", str(homes["laptop"]), "-v", "proxy", ids["home"], service, "0", "--relay", relay_addr],
        )
        port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
        return CliStack(homes, relay_addr, server, proxy, port)


@dataclass
class CliStack:
    """What :meth:`CliTunnel.start_stack` started."""

    homes: dict[str, Path]
    relay_addr: str
    server: CliProc
    proxy: CliProc
    #: The proxy's local port: the service as the client sees it.
    port: int


# -- bulk transfers that can end abruptly (tests/test_kill.py) -----------------------------
# Added for the kill tests; generic enough for any test that must tell a clean end (FIN)
# from a reset (RST) at the local application and check the bytes that arrived.

MiB = 1024 * 1024


def pattern_bytes(size: int, seed: int = 0) -> bytes:
    """``size`` deterministic pseudo-random bytes: the same ``seed`` gives the same bytes."""
    import random

    return random.Random(seed).randbytes(size)


def socket_ending(exc: BaseException | None) -> str:
    """How a socket's reading ended: ``"eof"`` (a FIN: ``recv`` gave b""), ``"reset"``
    (ECONNRESET: an RST, e.g. the other end closed with SO_LINGER 0), ``"timeout"``,
    else ``"error: ..."``."""
    if exc is None:
        return "eof"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"error: {exc!r}"


class PatternCheck:
    """Bytes received so far: how many, whether they are a prefix of ``pattern``, their SHA-256."""

    def __init__(self, pattern: bytes) -> None:
        import hashlib

        self._pattern = memoryview(pattern)
        self._sha = hashlib.sha256()
        self.count = 0
        self.intact = True

    def feed(self, data: bytes) -> None:
        end = self.count + len(data)
        if self.intact and (end > len(self._pattern) or self._pattern[self.count : end] != data):
            self.intact = False
        self._sha.update(data)
        self.count = end

    @property
    def digest(self) -> str:
        return self._sha.hexdigest()


def receive_checked(sock: Any, check: PatternCheck, until: int | None, timeout: float) -> str | None:
    """Read ``sock`` into ``check`` until it holds ``until`` bytes (returns ``None``: paused,
    nothing more is read, so the sender stalls) or the connection ends (returns
    :func:`socket_ending`); ``timeout`` bounds the whole call."""
    import time

    deadline = time.monotonic() + timeout
    while until is None or check.count < until:
        remaining = deadline - time.monotonic()
        want = MiB if until is None else min(MiB, until - check.count)
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            data = sock.recv(want)
        except OSError as exc:
            return socket_ending(exc)
        if not data:
            return socket_ending(None)
        check.feed(data)
    return None


class BulkConnection:
    """One connection as :class:`BulkService` saw it."""

    def __init__(self, mode: str, pattern: bytes) -> None:
        import threading

        self.mode = mode
        self.check = PatternCheck(pattern)  # what the service received (mode "U")
        self.sent = 0
        self.send_ended = ""  # "complete", or how sending failed
        self.ended = ""  # how the service's reading ended: "eof", "reset", "timeout", "error: ..."
        self.done = threading.Event()

    def __repr__(self) -> str:
        return (
            f"<{self.mode}: received {self.check.count} (intact={self.check.intact}), sent {self.sent} "
            f"({self.send_ended or '-'}), reading ended: {self.ended or 'not yet'}>"
        )


class BulkService:
    """A real TCP service in threads for bulk transfers; the client's first byte picks the mode.

    - ``D`` (download): send ``pattern[:size]``, half-close, then read until the client ends.
    - ``U`` (upload): read until the client ends, checking the bytes against ``pattern``;
      after a clean EOF answer ``"COUNT SHA256\\n"`` and close (a half-close round trip).
    - ``E`` (echo): echo until EOF, then half-close.

    Each connection's :class:`BulkConnection` records how the service's side ended,
    so a test can tell a reset from a clean EOF at the service too. Every socket
    operation is bounded by ``timeout``; :meth:`stop` ends every thread.
    """

    def __init__(self, pattern: bytes, size: int | None = None, timeout: float = 60.0) -> None:
        import socket
        import threading

        self.pattern = pattern
        self.size = len(pattern) if size is None else size
        self.timeout = timeout
        self.connections: list[BulkConnection] = []
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        import threading

        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._sockets.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: Any) -> None:
        import socket

        with sock:
            sock.settimeout(self.timeout)
            try:
                mode = sock.recv(1).decode(errors="replace")
            except OSError as exc:
                record = BulkConnection("?", self.pattern)
                record.ended = socket_ending(exc)
                self.connections.append(record)
                record.done.set()
                return
            record = BulkConnection(mode or "-", self.pattern)
            self.connections.append(record)
            try:
                if mode == "D":
                    view = memoryview(self.pattern)[: self.size]
                    try:
                        while record.sent < self.size:
                            record.sent += sock.send(view[record.sent : record.sent + MiB])
                        sock.shutdown(socket.SHUT_WR)
                        record.send_ended = "complete"
                    except OSError as exc:
                        record.send_ended = socket_ending(exc)
                        record.ended = "not read: sending failed"
                        return
                    record.ended = self._drain(sock, None)
                elif mode == "U":
                    record.ended = self._drain(sock, record)
                    if record.ended == "eof":
                        sock.sendall(f"{record.check.count} {record.check.digest}\n".encode())
                        record.send_ended = "complete"
                elif mode == "E":
                    while data := sock.recv(MiB):
                        sock.sendall(data)
                        record.sent += len(data)
                    record.ended = "eof"
                    sock.shutdown(socket.SHUT_WR)
                else:
                    record.ended = "eof" if not mode else f"error: unknown mode {mode!r}"
            except OSError as exc:
                record.ended = record.ended or socket_ending(exc)
            finally:
                record.done.set()

    def _drain(self, sock: Any, record: BulkConnection | None) -> str:
        while True:
            try:
                data = sock.recv(MiB)
            except OSError as exc:
                return socket_ending(exc)
            if not data:
                return "eof"
            if record is not None:
                record.check.feed(data)

    def connection(self, mode: str, timeout: float = 30.0, index: int = 0) -> BulkConnection:
        """The ``index``-th connection in ``mode``, waiting for it (bounded)."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [c for c in list(self.connections) if c.mode == mode]
            if len(found) > index:
                return found[index]
            time.sleep(0.02)
        raise AssertionError(f"no {mode!r} connection #{index} reached the service within {timeout:g} s")

    def stop(self) -> None:
        import contextlib
        import socket

        self._stop.set()
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


def kill9(proc: CliProc, timeout: float = 10.0) -> None:
    """SIGKILL a :class:`CliProc` and reap it (bounded): the kernel closes its sockets as after a crash."""
    if proc.popen.poll() is None:
        proc.popen.kill()
    proc.popen.wait(timeout)
