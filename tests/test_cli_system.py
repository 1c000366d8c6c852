"""The real CLI in separate processes: relay serve, serve, ping, proxy, auth.

Each process has its own home, as on three machines; only addresses are local.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from peerup.plugins.libp2p.node import Libp2pNode
from peerup.testing import CliProc, CliTunnel, client_node, init_home, peerup_run

pytestmark = pytest.mark.system


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = peerup_run(["--home", str(home), *args], timeout=120)
    return result


def start_proxy(nodes: dict[str, object], who: str, name: str) -> CliProc:
    """``peerup proxy <server> echo 0`` from ``who``'s home, through the module's relay."""
    homes = nodes["homes"]
    assert isinstance(homes, dict)
    args = ["--home", str(homes[who]), "proxy", str(nodes["peer_id"]), "echo", "0", "--relay", str(nodes["relay_addr"])]
    return CliProc(name, args)


@pytest.fixture(scope="module")
def echo_server() -> Iterator[int]:
    """A real TCP echo service in a thread of the test process."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, echo_server: int) -> Iterator[dict[str, object]]:
    """One relay and one serving node for the whole module (starting processes costs seconds).

    The SIGTERM test stops the relay, so it is the last test of the module.
    """
    tmp_path = tmp_path_factory.mktemp("cli")
    homes = {name: tmp_path / name for name in ("relay", "home", "laptop", "stranger")}
    for home in homes.values():
        assert cli(home, "init").returncode == 0
    laptop_id = cli(homes["laptop"], "whoami").stdout.strip()
    assert cli(homes["home"], "auth", "add", laptop_id, "--comment", "laptop").returncode == 0
    procs = CliTunnel(tmp_path)
    try:
        relay = procs.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        )
        relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        relay_flag = ["--relay", relay_addr]
        server = procs.start(
            "serve",
            ["--home", str(homes["home"]), "serve", "--service", f"echo=127.0.0.1:{echo_server}", *relay_flag],
        )
        peer_id = server.wait_for(r"^peer (\S+)").group(1)
        server.wait_for(r"reachable at \S+p2p-circuit")
        yield {"homes": homes, "relay": relay, "relay_addr": relay_addr, "server": server, "peer_id": peer_id}
    finally:
        procs.stop()


def test_ping_through_discovery_reports_rtts_and_path(nodes: dict[str, object]) -> None:
    homes = nodes["homes"]
    assert isinstance(homes, dict)
    result = cli(
        homes["laptop"],
        "ping",
        str(nodes["peer_id"]),
        "-c",
        "3",
        "--interval",
        "0.1",
        "--relay",
        str(nodes["relay_addr"]),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    replies = [line for line in lines if line.startswith("seq=")]
    assert [line.split(" time=")[0] for line in replies] == ["seq=0", "seq=1", "seq=2"]
    # Each reply names its path. On 127.0.0.1 the node is also reachable directly, so the
    # path is relayed or, once the node's address is confirmed or punched, direct;
    # a change is announced on a line of its own (tests/test_nat.py covers real NATs).
    assert all(re.search(r" path=(direct|relayed)$", line) for line in replies), lines
    assert all(line.startswith(("seq=", "path changed: ")) for line in lines[1:-2]), lines
    assert re.search(r"via (direct|relayed) path", lines[-2]), lines
    assert lines[-1].startswith("3 sent, 3 received, 0% loss, rtt min/avg/max/mdev = ")


def test_ping_unknown_peer_is_a_one_line_error(nodes: dict[str, object]) -> None:
    homes = nodes["homes"]
    assert isinstance(homes, dict)
    nobody = cli(homes["stranger"], "whoami").stdout.strip()  # a valid ID nobody serves
    result = cli(homes["laptop"], "ping", nobody, "-c", "1", "--relay", str(nodes["relay_addr"]))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("peerup: error:")]
    assert len(errors) == 1 and "not found" in errors[0]
    bad = cli(homes["laptop"], "ping", "not-a-peer", "--relay", str(nodes["relay_addr"]))
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("peerup: error: peer 'not-a-peer' is neither a name in [peers]")


def test_proxy_carries_bytes_and_unauthorized_peer_gets_a_clear_line(nodes: dict[str, object]) -> None:
    homes = nodes["homes"]
    assert isinstance(homes, dict)
    results = {}
    for who in ("laptop", "stranger"):
        proxy = start_proxy(nodes, who, who)
        try:
            port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
            with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
                conn.sendall(b"ping through the tunnel")
                conn.shutdown(socket.SHUT_WR)
                received = b""
                try:
                    while chunk := conn.recv(65536):
                        received += chunk
                except ConnectionResetError:
                    pass  # refused tunnels close without reading what the app sent: a reset
            results[who] = received
            if who == "stranger":
                proxy.wait_for(r"not authorized for service 'echo'", stderr=True)
        finally:
            proxy.stop()
        assert proxy.popen.returncode == 0  # SIGTERM is a clean stop, not a crash
    assert results == {"laptop": b"ping through the tunnel", "stranger": b""}


def test_sigterm_drains_open_connections_and_refuses_new_ones(nodes: dict[str, object]) -> None:
    homes = nodes["homes"]
    assert isinstance(homes, dict)
    proxy = start_proxy(nodes, "laptop", "drain")
    try:
        port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(b"before")
            assert conn.recv(100) == b"before"
            proxy.popen.send_signal(signal.SIGTERM)
            proxy.wait_for(r"waiting up to 10 s for 1 open connections", stderr=True)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            conn.sendall(b"during the drain")  # the open tunnel still carries bytes
            assert conn.recv(100) == b"during the drain"
        assert proxy.popen.wait(10) == 0  # exits as soon as the last tunnel closed
    finally:
        proxy.stop()


@pytest.mark.anyio
async def test_relay_sigterm_with_peers_connected_is_quick_and_quiet(tmp_path: Path) -> None:
    """SIGTERM to a relay holding six peers, who reconnect as it goes: exit 0 at once, no traceback.

    It used to close the connections one at a time (about 0.2 s each, fixed
    sleeps upstream) with its listener still open, and every peer that
    reconnected meanwhile was logged as a LifecycleError traceback
    (workarounds.close_host): 2 s and 21 tracebacks with ten peers.
    """
    init_home(tmp_path / "relay")
    relay = CliProc("relay", ["--home", str(tmp_path / "relay"), "relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"])
    try:
        found = await anyio.to_thread.run_sync(relay.wait_for, r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)")
        async with contextlib.AsyncExitStack() as peers:
            for i in range(6):
                _, node = await peers.enter_async_context(client_node(tmp_path, found.group(1), f"peer{i}"))
                assert isinstance(node, Libp2pNode) and node.relays[0].reserved
            started = time.monotonic()
            relay.popen.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(relay.popen.wait, 20)
            took = time.monotonic() - started
        await anyio.sleep(0.5)  # the collector thread reads the last stderr lines
    finally:
        relay.stop()
    print(f"relay with 6 peers stopped {took:.2f} s after SIGTERM")
    assert code == 0
    assert not [line for line in relay.errors if "Traceback" in line], "\n".join(relay.errors)
    assert len(relay.errors) <= 2, "\n".join(relay.errors)  # the 'received SIGTERM' line, and at most one more
    assert took < 5


def test_sigterm_stops_the_relay_and_frees_its_port(nodes: dict[str, object]) -> None:
    relay = nodes["relay"]
    assert isinstance(relay, CliProc)
    port = int(str(nodes["relay_addr"]).split("/tcp/")[1].split("/")[0])
    relay.popen.send_signal(signal.SIGTERM)
    assert relay.popen.wait(20) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
