"""Abrupt ends of a tunnel, seen from the local TCP applications (issue #11, items 4 and 5).

Real processes, each with its own home: ``peerup relay serve`` on a fixed port,
``peerup serve --service bulk=...`` and ``peerup proxy SERVER bulk 0``, the proxy's
peer authorized with ``peerup auth add``. The service is a
:class:`peerup.testing.BulkService` in threads of the test process: it streams
64 MiB of deterministic pseudo-random bytes (``D``), or receives up to 64 MiB and
answers their count and SHA-256 (``U``), or echoes (``E``); the client is a plain
socket in the test.

A broken tunnel (relay, serving node or proxy killed with SIGKILL, the peer
revoked, the remote stream reset) must reach each surviving application as a
reset (ECONNRESET), never as a clean EOF with bytes missing: for an unframed
protocol that would be silent data loss. A tunnel whose both directions finished
cleanly still ends with a FIN, and half-close keeps working.

The kill lands mid-transfer deterministically: the downloading client stops
reading after ``PAUSE`` bytes (so the sender stalls on full buffers), the
uploading client stops sending after ``PAUSE`` bytes and the test waits until the
service holds them all; only then is the process killed. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peerup.testing import (
    RELAYED_ONLY_TOML,
    BulkConnection,
    BulkService,
    CliProc,
    CliTunnel,
    MiB,
    PatternCheck,
    free_port,
    init_home,
    kill9,
    pattern_bytes,
    peerup_run,
    receive_checked,
    socket_ending,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]

SIZE = 64 * MiB
#: Where a transfer stops to let the kill land: far from both ends of SIZE.
PAUSE = 8 * MiB
PATTERN = pattern_bytes(SIZE, seed=11)
#: Bound on one bulk phase (8 MiB, or 64 MiB for the clean case) on a shared 2-core machine.
TRANSFER_BOUND = 60.0
#: After a kill or a revocation, how long an application may wait to learn its connection is gone.
#: A killed process's kernel sends FIN/RST at once; `peerup serve` polls authorized_keys every 2 s.
END_BOUND = 10.0
#: Relay restart: a new connection must get through within this long of the restart.
RESTART_BOUND = 20.0
#: Relay restart: time between the kill and starting the relay again (it then needs ~0.7 s to listen).
RELAY_DOWN = 1.5


@dataclass
class Tunnel:
    """A relay, a serving node and a proxy as processes, and the service behind them."""

    homes: dict[str, Path]
    procs: CliTunnel
    service: BulkService
    relay_listen: str
    relay_addr: str
    server_id: str
    proxy_id: str
    relay: CliProc
    server: CliProc
    proxy: CliProc
    port: int
    #: Client sockets still open: the fixture resets them before stopping the processes,
    #: so a failed test does not leave `peerup proxy` draining a half-open tunnel for 10 s.
    sockets: list[socket.socket] = field(default_factory=list)

    def start_relay(self) -> CliProc:
        home = str(self.homes["relay"])
        return self.procs.start("relay", ["--home", home, "-v", "relay", "serve", "--listen", self.relay_listen])

    def logs(self) -> str:
        return "\n" + self.procs.logs()


def abort(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: an RST, at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def tunnel(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tunnel]:
    """The three processes, started. ``request.param`` (indirect parametrization), if any:
    lines for the relay's config.toml."""
    homes = {name: tmp_path / name for name in ("relay", "server", "laptop")}
    ids = {name: init_home(home) for name, home in homes.items()}
    relay_config = getattr(request, "param", "")
    if relay_config:
        (homes["relay"] / "config.toml").write_text(relay_config)
    # These tests are about the relayed path (a relay killed mid-transfer): on 127.0.0.1
    # the peers would otherwise find a direct path (docs/nat.md).
    for name in ("server", "laptop"):
        (homes[name] / "config.toml").write_text(RELAYED_ONLY_TOML)
    added = peerup_run(["--home", str(homes["server"]), "auth", "add", ids["laptop"], "--comment", "laptop"])
    assert added.returncode == 0, added.stderr
    service = BulkService(PATTERN)
    procs = CliTunnel(tmp_path)
    sockets: list[socket.socket] = []
    try:
        relay_listen = f"/ip4/127.0.0.1/tcp/{free_port()}"
        relay = procs.start("relay", ["--home", str(homes["relay"]), "-v", "relay", "serve", "--listen", relay_listen])
        relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        service_flag = f"bulk=127.0.0.1:{service.port}"
        server = procs.start(
            "serve",
            ["--home", str(homes["server"]), "-v", "serve", "--service", service_flag, "--relay", relay_addr],
        )
        proxy = procs.start(
            "proxy",
            ["--home", str(homes["laptop"]), "-v", "proxy", ids["server"], "bulk", "0", "--relay", relay_addr],
        )
        server.wait_for(r"reachable at \S+p2p-circuit")
        port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
        yield Tunnel(
            homes,
            procs,
            service,
            relay_listen,
            relay_addr,
            ids["server"],
            ids["laptop"],
            relay,
            server,
            proxy,
            port,
            sockets,
        )
    finally:
        for sock in sockets:
            abort(sock)
        service.stop()
        procs.stop()


# -- the two applications ----------------------------------------------------------------


def connect(tunnel: Tunnel, mode: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", tunnel.port), timeout=30)
    tunnel.sockets.append(sock)
    sock.sendall(mode)
    return sock


def start_download(tunnel: Tunnel, pause: int = PAUSE) -> tuple[socket.socket, PatternCheck]:
    """A client that read ``pause`` bytes of the service's 64 MiB and then stopped reading."""
    sock = connect(tunnel, b"D")
    check = PatternCheck(PATTERN)
    ending = receive_checked(sock, check, pause, TRANSFER_BOUND)
    assert ending is None, f"the download ended ({ending}) after {check.count} bytes, before the kill" + tunnel.logs()
    assert check.intact
    return sock, check


def start_upload(tunnel: Tunnel, pause: int = PAUSE) -> tuple[socket.socket, BulkConnection]:
    """A client that sent ``pause`` bytes of 64 MiB, all received by the service, then stopped sending."""
    sock = connect(tunnel, b"U")
    sock.sendall(PATTERN[:pause])
    record = tunnel.service.connection("U", TRANSFER_BOUND)
    deadline = time.monotonic() + TRANSFER_BOUND
    while record.check.count < pause and not record.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert record.check.count == pause and not record.done.is_set(), f"before the kill: {record!r}" + tunnel.logs()
    return sock, record


def download_problem(sock: socket.socket, check: PatternCheck, what: str) -> str | None:
    """The downloading client reads on; what is wrong with how it ended, if anything.

    Right: a reset (ECONNRESET), after a strict prefix of the stream.
    """
    started = time.monotonic()
    ending = receive_checked(sock, check, None, END_BOUND)
    took = time.monotonic() - started
    print(f"{what}: the client received {check.count / MiB:.2f} MiB, then {ending} ({took:.2f} s after the fault)")
    if ending != "reset":
        return f"{what}: the client app saw {ending!r}, not a reset, after {check.count} of {SIZE} bytes"
    if not check.intact:
        return f"{what}: the {check.count} bytes the client received are not a prefix of the stream"
    if check.count >= SIZE:
        return f"{what}: the client received all {check.count} bytes: the fault landed too late"
    return None


def upload_problem(record: BulkConnection, what: str) -> str | None:
    """The service was receiving an upload; what is wrong with how its side ended, if anything.

    Right: a reset within END_BOUND, after a strict prefix of the stream.
    """
    started = time.monotonic()
    finished = record.done.wait(END_BOUND)
    took = time.monotonic() - started
    ended = record.ended or "nothing"
    print(f"{what}: the service received {record.check.count / MiB:.2f} MiB, then {ended} ({took:.2f} s)")
    if not finished:
        return f"{what}: the service's connection is still open {END_BOUND:g} s later: {record!r}"
    if record.ended != "reset":
        return f"{what}: the service saw {record.ended!r}, not a reset, after {record.check.count} of {SIZE} bytes"
    if not record.check.intact or record.check.count >= SIZE:
        return f"{what}: the service's bytes are wrong: {record!r}"
    return None


def assert_no_problems(tunnel: Tunnel, *problems: str | None) -> None:
    found = [problem for problem in problems if problem]
    assert not found, "\n".join(found) + tunnel.logs()


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything ``sock`` still delivers, and how it ended (``"eof"``, ``"reset"``, ...)."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            data = sock.recv(65536)
        except OSError as exc:
            return b"".join(chunks), socket_ending(exc)
        if not data:
            return b"".join(chunks), socket_ending(None)
        chunks.append(data)


def echo(port: int, payload: bytes, timeout: float) -> bytes | None:
    """One request through the proxy: the echo, or ``None`` when the connection failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=max(timeout, 0.1)) as sock:
            sock.sendall(b"E" + payload)
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            while data := sock.recv(65536):
                chunks.append(data)
            return b"".join(chunks)
    except OSError:
        return None


# -- the cases ---------------------------------------------------------------------------


def test_relay_killed_mid_transfer_resets_both_applications(tunnel: Tunnel) -> None:
    down, check = start_download(tunnel)
    _, record = start_upload(tunnel)
    tunnel.proxy.wait_for(r"connection from .* relayed path", stderr=True)
    kill9(tunnel.relay)
    assert_no_problems(
        tunnel,
        download_problem(down, check, "relay killed, download"),
        upload_problem(record, "relay killed, upload"),
    )


def test_serving_node_killed_mid_download_resets_the_client(tunnel: Tunnel) -> None:
    down, check = start_download(tunnel)
    kill9(tunnel.server)
    assert_no_problems(tunnel, download_problem(down, check, "serving node killed"))


def test_proxy_killed_mid_upload_resets_the_service(tunnel: Tunnel) -> None:
    """The serving node must reset its local connection when the peer's connection dies."""
    _, record = start_upload(tunnel)
    kill9(tunnel.proxy)
    assert_no_problems(tunnel, upload_problem(record, "proxy killed"))


def test_revoked_peer_mid_transfer_resets_both_applications(tunnel: Tunnel) -> None:
    """`peerup auth remove` on the serving node, which polls authorized_keys every 2 s.

    The revocation's moment is seen from outside as the end of the service's upload
    connection, so the paused download resumes only then (else it could finish first).
    """
    down, check = start_download(tunnel)
    _, record = start_upload(tunnel)
    removed = peerup_run(["--home", str(tunnel.homes["server"]), "auth", "remove", tunnel.proxy_id])
    assert removed.returncode == 0, removed.stderr
    upload = upload_problem(record, "peer revoked, upload")
    assert_no_problems(tunnel, upload, download_problem(down, check, "peer revoked, download"))


#: The relay's circuit data budget for the next test: above what the two paused transfers
#: and the bytes in flight take (measured: under 20 MiB), far below 64 MiB.
CIRCUIT_DATA = 32 * MiB


@pytest.mark.parametrize("tunnel", [f"[relay]\ncircuit_data = {CIRCUIT_DATA}\n"], ids=["circuit_data"], indirect=True)
def test_relay_resetting_the_circuit_resets_both_applications(tunnel: Tunnel) -> None:
    """A reset from the middle while every process lives: the relay resets the circuit
    when its data budget (``relay.circuit_data``) runs out mid-transfer."""
    _, record = start_upload(tunnel, PAUSE // 2)
    down, check = start_download(tunnel, PAUSE // 2)
    assert_no_problems(
        tunnel,
        download_problem(down, check, "relay's circuit budget ran out, download"),
        upload_problem(record, "relay's circuit budget ran out, upload"),
    )
    assert check.count < CIRCUIT_DATA, f"the relay carried {check.count} bytes, over its budget"


def test_complete_transfers_both_ways_end_with_a_clean_eof(tunnel: Tunnel) -> None:
    """The control case: 64 MiB each way arrive whole, and both tunnels end with a FIN."""
    started = time.monotonic()
    with connect(tunnel, b"D") as down:
        check = PatternCheck(PATTERN)
        ending = receive_checked(down, check, None, TRANSFER_BOUND)
    down_s = time.monotonic() - started
    tunnel.proxy.wait_for(r"connection from .* relayed path", stderr=True)
    assert ending == "eof", f"download: {ending} after {check.count} bytes" + tunnel.logs()
    assert check.count == SIZE and check.intact
    served = tunnel.service.connection("D")
    assert served.done.wait(END_BOUND), f"download, service side: {served!r}"
    assert (served.send_ended, served.ended) == ("complete", "eof"), f"download, service side: {served!r}"

    # Upload with a half-close: the client shuts its write side and still gets the whole answer.
    started = time.monotonic()
    with connect(tunnel, b"U") as up:
        up.settimeout(TRANSFER_BOUND)
        up.sendall(PATTERN)
        up.shutdown(socket.SHUT_WR)
        answer, ending = read_to_end(up, TRANSFER_BOUND)
    up_s = time.monotonic() - started
    record = tunnel.service.connection("U")
    assert record.done.wait(END_BOUND), f"upload, service side: {record!r}"
    assert record.ended == "eof", f"upload, service side: {record!r}" + tunnel.logs()
    assert record.check.count == SIZE and record.check.intact
    assert ending == "eof", f"upload: the answer ended with {ending}" + tunnel.logs()
    expected = hashlib.sha256(PATTERN).hexdigest()
    assert answer == f"{SIZE} {expected}\n".encode(), f"upload: the service answered {answer!r}"
    assert check.digest == record.check.digest == expected
    print(f"64 MiB down {down_s:.2f} s, up {up_s:.2f} s (incl. connection set-up)")


def test_relay_restarted_on_the_same_address_carries_new_connections_within_seconds(tunnel: Tunnel) -> None:
    """The relay is down about 2 s: long enough for the nodes' reconnect dials to fail
    (libp2p's own dial retries span ~0.7 s), as in a real restart."""
    assert echo(tunnel.port, b"before", 30) == b"before", tunnel.logs()
    kill9(tunnel.relay)
    killed = time.monotonic()
    time.sleep(RELAY_DOWN)
    relay = tunnel.start_relay()  # same home (same peer ID), same port
    relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)")
    restarted = time.monotonic()
    deadline = restarted + RESTART_BOUND
    attempts = 0
    while True:
        attempts += 1
        reply = echo(tunnel.port, b"after restart", deadline - time.monotonic())
        now = time.monotonic()
        if reply == b"after restart":
            break
        assert now < deadline, (
            f"no connection through the restarted relay within {RESTART_BOUND:g} s of the restart "
            f"({attempts} attempts; the relay was down {restarted - killed:.1f} s)" + tunnel.logs()
        )
        time.sleep(0.2)
    recovered = time.monotonic() - restarted
    print(
        f"relay down {restarted - killed:.2f} s (kill to listening again); "
        f"first new connection through {recovered:.2f} s after the restart, attempt {attempts}"
    )
