"""The real CLI in separate processes: relay serve, serve, ping, proxy, auth.

Each process has its own home, as on three machines; only addresses are local.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerup.testing import CliProc, CliTunnel, peerup_run

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
    assert [line.split(" time=")[0] for line in lines[1:4]] == ["seq=0", "seq=1", "seq=2"]
    assert "via relayed path" in lines[4]
    assert lines[5].startswith("3 sent, 3 received, 0% loss, rtt min/avg/max/mdev = ")


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


def test_sigterm_stops_the_relay_and_frees_its_port(nodes: dict[str, object]) -> None:
    relay = nodes["relay"]
    assert isinstance(relay, CliProc)
    port = int(str(nodes["relay_addr"]).split("/tcp/")[1].split("/")[0])
    relay.popen.send_signal(signal.SIGTERM)
    assert relay.popen.wait(20) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
