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
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
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
    async with anyio.create_task_group() as tg:
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
    *,
    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """A relay in a task until ``stop`` is set (a relay that can be "killed" and started again)."""
    async with relay(tmp_path, listen) as addr:
        task_status.started(addr)
        await stop.wait()


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
        if self._cut.is_set():
            await anyio.sleep_forever()  # a black hole also swallows new connections
        upstream = await anyio.connect_tcp(*self.target)
        self.connections += 1
        self._streams += [downstream, upstream]
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pump, downstream, upstream)
            tg.start_soon(self._pump, upstream, downstream)
        # Both directions ended (not cut): close like a forwarder would.
        if not self._cut.is_set():
            await upstream.aclose()
            await downstream.aclose()
        else:
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
    """This process's environment without PEERUP_* (a developer's shell must not leak in)."""
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PEERUP_")}


class CliProc:
    """A running ``peerup`` command (optionally under a prefix like ``ip netns exec A``).

    Its stdout and stderr lines are collected as they arrive; :meth:`wait_for`
    waits, bounded, for a line; :meth:`stop` sends SIGTERM, then SIGKILL after 15 s.
    """

    def __init__(self, name: str, args: list[str], prefix: Sequence[str] = ()) -> None:
        import subprocess
        import threading

        self.name = name
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.popen = subprocess.Popen(
            [*prefix, *PEERUP_CMD, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            env=clean_env(),
        )
        for stream, sink in ((self.popen.stdout, self.lines), (self.popen.stderr, self.errors)):
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _collect(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

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
        import subprocess

        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def peerup_run(args: list[str], prefix: Sequence[str] = (), timeout: float = 60.0) -> Any:
    """Run a short ``peerup`` command to completion (bounded); returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [*prefix, *PEERUP_CMD, *args], capture_output=True, text=True, timeout=timeout, check=False, env=clean_env()
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
