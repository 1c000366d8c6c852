"""``peerup daemon`` as a separate process, driven by the real CLI and its control API (issue #14).

One relay, a serving daemon ("home", two services) and a client daemon
("laptop", one persistent tunnel in [tunnels]) for the whole module; every
test talks to them the way an operator would. Bytes that cross a tunnel are
checked by SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from peerup.testing import CliTunnel, free_port, init_home, pattern_bytes, peerup_run

pytestmark = pytest.mark.system

FAST_RETRY = "[retry]\ninitial = 0.2\nmax_delay = 1.0\n"
METRICS = '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = peerup_run(["--home", str(home), *args], timeout=60)
    return result


def cli_json(home: Path, *args: str) -> Any:
    result = cli(home, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one line on stderr, the ``peerup: error:`` line."""
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peerup: error: "), result.stderr
    return lines[0]


class EchoServer:
    """A threaded TCP echo service in the test process."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def echo_through(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to 127.0.0.1:port, half-close, read until EOF (bounded by a socket timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while data := sock.recv(262144):
            chunks.append(data)
        sender.join(30)
    return b"".join(chunks)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = sock.recv(len(payload) - len(got))
        assert data, "the long session ended"
        got += data
    return got


def api(home: Path, method: str, path: str, headers: dict[str, str], content: bytes = b"") -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(home / "control.sock"))
    with httpx.Client(transport=transport, base_url="http://peerup", timeout=30) as client:
        return client.request(method, path, headers=headers, content=content)


def cookie(home: Path) -> dict[str, str]:
    return {"Authorization": "Bearer " + (home / "control.sock.cookie").read_text().strip()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("daemon")
    homes = {name: root / name for name in ("relay", "home", "laptop")}
    ids = {name: init_home(home) for name, home in homes.items()}
    assert cli(homes["home"], "auth", "add", ids["laptop"]).returncode == 0
    echo, web = EchoServer(), EchoServer()
    procs = CliTunnel(root)
    (homes["relay"] / "config.toml").write_text(METRICS)
    try:
        relay = procs.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        )
        relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        relay_metrics = relay.wait_for(r"^metrics on (http://\S+)/metrics").group(1)
        common = f'relays = ["{relay_addr}"]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n'
        (homes["home"] / "config.toml").write_text(
            "# the home server\n" + common + METRICS + f'[services.echo]\naddress = "127.0.0.1:{echo.port}"\n'
            f'[services.web]\naddress = "127.0.0.1:{web.port}"\n' + FAST_RETRY
        )
        tunnel_port = free_port()
        laptop_config = (
            common + f'[peers]\nhome = "{ids["home"]}"\n'
            f'[tunnels.echo]\npeer = "home"\nservice = "echo"\nport = {tunnel_port}\n' + FAST_RETRY
        )
        (homes["laptop"] / "config.toml").write_text(laptop_config)
        home = procs.start("home", ["--home", str(homes["home"]), "daemon"])
        home_metrics = home.wait_for(r"^metrics on (http://\S+)/metrics").group(1)
        home.wait_for(r"^ready$")
        laptop = procs.start("laptop", ["--home", str(homes["laptop"]), "daemon"])
        laptop.wait_for(r"^ready$")
        yield {
            "homes": homes,
            "ids": ids,
            "tunnel_port": tunnel_port,
            "laptop_config": laptop_config,
            "laptop": laptop,
            "home": home,
            "procs": procs,
            "relay_metrics": relay_metrics,
            "relay_addr": relay_addr,
            "home_metrics": home_metrics,
        }
    finally:
        procs.stop()
        echo.stop()
        web.stop()


def test_persistent_tunnel_from_config_carries_bytes_and_counts_them(world: dict[str, Any]) -> None:
    homes = world["homes"]
    payload = pattern_bytes(1024 * 1024, seed=1)
    assert sha(echo_through(world["tunnel_port"], payload)) == sha(payload)
    forward = next(row for row in cli_json(homes["laptop"], "tunnels") if row["id"] == "echo")
    assert forward["kind"] == "forward" and forward["persistent"] and forward["port"] == world["tunnel_port"]
    assert forward["bytes_up"] >= len(payload) and forward["bytes_down"] >= len(payload)
    table = cli(homes["laptop"], "tunnels").stdout
    assert table.splitlines()[0].split() == ["ID", "KIND", "SERVICE", "PEER", "LOCAL", "CONNS", "UP", "DOWN", "AGE"]


def metric(url: str, name: str, **labels: str) -> float | None:
    """The value of one sample on a /metrics page, or None when it is absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def test_metrics_and_healthz_of_the_relay_and_the_serving_daemon(world: dict[str, Any]) -> None:
    payload = pattern_bytes(200_000, seed=9)
    assert sha(echo_through(world["tunnel_port"], payload)) == sha(payload)
    relay, home = world["relay_metrics"], world["home_metrics"]
    health = httpx.get(f"{relay}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["role"] == "relay"
    assert (metric(relay, "peerup_relay_reservations") or 0) >= 2  # home and laptop hold slots
    assert httpx.get(f"{home}/healthz", timeout=10).json() == {"ok": True, "ready": True, "relay_slot": True}
    assert (metric(home, "peerup_auth_decisions_total", result="allowed") or 0) >= 1
    up = metric(home, "peerup_tunnel_bytes_total", service="echo", kind="inbound", direction="up")
    assert up is not None and up >= len(payload)  # the service's replies, toward the peer
    assert metric(home, "peerup_relay_reservation", relay=world["relay_addr"]) == 1
    assert (metric(home, "peerup_tunnels_opened_total", service="echo", kind="inbound") or 0) >= 1


def test_status_and_peers_describe_the_running_node(world: dict[str, Any]) -> None:
    homes, ids = world["homes"], world["ids"]
    status = cli_json(homes["home"], "status")
    assert status["peer_id"] == ids["home"] and status["ready"] is True
    assert status["services"].keys() == {"echo", "web"}
    assert [relay["reserved"] for relay in status["relays"]] == [True]
    assert status["relays"][0]["expires_in"] > 0
    assert status["reachability"] in {"public", "nated", "unknown"}
    assert any("/p2p-circuit/" in addr for addr in status["addresses"])
    echo_through(world["tunnel_port"], b"make sure the laptop is connected to home")
    peers = cli_json(homes["laptop"], "peers")
    home_rows = [row for row in peers if row["peer_id"] == ids["home"]]
    assert home_rows and home_rows[0]["name"] == "home" and home_rows[0]["path"] in {"direct", "relayed"}
    assert any(row["rtt_ms"] is not None for row in home_rows)
    assert any(row["relay"] for row in peers)
    assert cli(homes["laptop"], "status").stdout.startswith(f"peer          {ids['laptop']}")


def test_connect_and_disconnect_at_run_time(world: dict[str, Any]) -> None:
    homes = world["homes"]
    result = cli(homes["laptop"], "connect", "home", "web", "0", "--json")
    assert result.returncode == 0, result.stderr
    tunnel = json.loads(result.stdout)
    payload = pattern_bytes(256 * 1024, seed=2)
    assert sha(echo_through(tunnel["port"], payload)) == sha(payload)
    assert tunnel["id"] in {row["id"] for row in cli_json(homes["laptop"], "tunnels")}
    assert cli(homes["laptop"], "disconnect", tunnel["id"]).stdout.strip() == f"closed {tunnel['id']}"
    assert tunnel["id"] not in {row["id"] for row in cli_json(homes["laptop"], "tunnels")}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", tunnel["port"]), timeout=5).close()


def test_disconnecting_an_inbound_connection_resets_it_at_the_client(world: dict[str, Any]) -> None:
    homes = world["homes"]
    with socket.create_connection(("127.0.0.1", world["tunnel_port"]), timeout=30) as session:
        hello = pattern_bytes(1000, seed=10)
        assert roundtrip(session, hello) == hello
        rows = cli_json(homes["home"], "tunnels")  # earlier tests' connections may still be closing
        inbound = [row for row in rows if row["kind"] == "inbound" and row["bytes_down"] == len(hello)]
        assert len(inbound) == 1 and inbound[0]["peer"] == world["ids"]["laptop"]
        assert inbound[0]["bytes_up"] == len(hello)
        assert cli(homes["home"], "disconnect", inbound[0]["id"]).returncode == 0
        with pytest.raises(ConnectionResetError):  # a cut tunnel is a reset, never a clean end (ADR 0008)
            while session.recv(65536):
                pass


def test_bad_requests_get_one_line_and_the_daemon_keeps_running(world: dict[str, Any], tmp_path: Path) -> None:
    laptop = world["homes"]["laptop"]
    assert "no tunnel or connection with ID 'nope'" in one_error(cli(laptop, "disconnect", "nope"))
    in_use = one_error(cli(laptop, "connect", "home", "web", str(world["tunnel_port"])))
    assert "already in use" in in_use
    assert "not-a-peer" in one_error(cli(laptop, "connect", "not-a-peer", "web", "0"))
    response = api(laptop, "POST", "/v1/tunnels", cookie(laptop), b'{"peer": "home", "service": ')
    assert response.status_code == 400 and response.json()["error"].startswith("request body is not valid JSON")
    response = api(laptop, "POST", "/v1/tunnels", cookie(laptop), b'{"peer": "home", "service": "web", "port": -1}')
    assert response.status_code == 400 and response.json()["error"].startswith("port: ")
    payload = pattern_bytes(64 * 1024, seed=3)
    assert sha(echo_through(world["tunnel_port"], payload)) == sha(payload)  # still serving


def test_api_refuses_clients_without_the_cookie(world: dict[str, Any]) -> None:
    laptop = world["homes"]["laptop"]
    assert api(laptop, "GET", "/v1/status", {}).status_code == 401
    wrong = api(laptop, "GET", "/v1/status", {"Authorization": "Bearer " + "0" * 64})
    assert wrong.status_code == 401 and "cookie" in wrong.json()["error"]
    assert api(laptop, "GET", "/v1/status", cookie(laptop)).status_code == 200
    for path in ("control.sock", "control.sock.cookie"):
        assert (laptop / path).stat().st_mode & 0o777 == 0o600


def test_config_edits_apply_without_dropping_a_long_session(world: dict[str, Any]) -> None:
    homes = world["homes"]
    laptop, home = homes["laptop"], homes["home"]
    with socket.create_connection(("127.0.0.1", world["tunnel_port"]), timeout=30) as session:
        first = pattern_bytes(4096, seed=4)
        assert roundtrip(session, first) == first
        # home: a service added through the CLI (atomic edit, comments kept, daemon told to reload)
        added = cli(home, "service", "add", "extra", "127.0.0.1:9")
        assert added.returncode == 0 and "the running daemon reloaded its config" in added.stdout, added.stderr
        assert (home / "config.toml").read_text().startswith("# the home server\n")
        assert "extra" in cli_json(home, "status")["services"]
        # laptop: a second persistent tunnel added by editing the file, picked up on SIGHUP
        port = free_port()
        config = world["laptop_config"] + f'[tunnels.web]\npeer = "home"\nservice = "web"\nport = {port}\n'
        (laptop / "config.toml").write_text(config)
        world["laptop"].popen.send_signal(signal.SIGHUP)
        world["laptop"].wait_for(r"reloaded .*'tunnels_opened': \['web'\]", stderr=True)
        payload = pattern_bytes(128 * 1024, seed=5)
        assert sha(echo_through(port, payload)) == sha(payload)
        # the session opened before both reloads still carries bytes both ways
        second = pattern_bytes(4096, seed=6)
        assert roundtrip(session, second) == second
    assert cli(home, "service", "remove", "extra").returncode == 0
    (laptop / "config.toml").write_text(world["laptop_config"])
    assert cli(laptop, "service", "list").returncode == 0


def test_a_config_with_three_errors_is_listed_and_refused_by_a_running_daemon(
    world: dict[str, Any], tmp_path: Path
) -> None:
    laptop = world["homes"]["laptop"]
    bad = 'log_level = "loud"\n[services.ssh]\naddress = "nowhere"\n[tunnels.x]\npeer = "home"\nservice = "web"\n'
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    result = cli(laptop, "config", "validate", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [line.split(": ")[1] for line in lines[:-1]] == ["log_level", "services.ssh.address", "tunnels.x.port"]
    assert lines[-1] == f"peerup: error: {path}: 3 error(s)"
    assert cli(laptop, "config", "validate").stdout.strip().endswith(": valid")
    stamp_before = len(world["laptop"].errors)
    (laptop / "config.toml").write_text(bad)
    try:
        world["laptop"].wait_for(r"reload refused, keeping the running config: .*log_level", stderr=True)
        assert len(world["laptop"].errors) > stamp_before
        payload = pattern_bytes(64 * 1024, seed=7)
        assert sha(echo_through(world["tunnel_port"], payload)) == sha(payload)
        assert cli_json(laptop, "status")["ready"] is True
    finally:
        (laptop / "config.toml").write_text(world["laptop_config"])


def test_ping_json_without_a_daemon(world: dict[str, Any], tmp_path: Path) -> None:
    pinger = tmp_path / "pinger"
    init_home(pinger)
    home_id = world["ids"]["home"]
    args = ["ping", home_id, "-c", "2", "--interval", "0.1", "--json", "--relay", world["relay_addr"]]
    result = cli(pinger, *args)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["peer_id"] == home_id and stats["sent"] == stats["received"] == 2
    assert len(stats["rtt_ms"]) == 2 and all(rtt > 0 for rtt in stats["rtt_ms"])
    assert stats["path"] in {"direct", "relayed"} and stats["loss_percent"] == 0
    assert stats["min_ms"] <= stats["avg_ms"] <= stats["max_ms"]


def test_commands_that_need_a_daemon_say_so(tmp_path: Path) -> None:
    home = tmp_path / "nodaemon"
    init_home(home)
    for command in (["status"], ["tunnels"], ["disconnect", "t1"]):
        assert "no peerup daemon is running" in one_error(cli(home, *command))


def test_a_control_socket_others_can_use_is_refused_at_start(tmp_path: Path) -> None:
    home = tmp_path / "loose"
    init_home(home)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(home / "control.sock"))
    stale.close()
    os.chmod(home / "control.sock", 0o666)
    error = one_error(cli(home, "daemon"))
    assert "control socket" in error and "mode 666" in error
    assert (home / "control.sock").exists()  # left for the operator to look at


def test_sd_notify_ready_only_once_the_relay_slot_is_held(tmp_path: Path) -> None:
    """READY=1 waits for the relay (started late on purpose), then WATCHDOG=1, then STOPPING=1 on SIGTERM."""
    homes = {name: tmp_path / name for name in ("relay", "node")}
    relay_id = init_home(homes["relay"])
    init_home(homes["node"])
    relay_port = free_port()
    relay_addr = f"/ip4/127.0.0.1/tcp/{relay_port}/p2p/{relay_id}"
    (homes["node"] / "config.toml").write_text(
        f'relays = ["{relay_addr}"]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n' + FAST_RETRY
    )
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    env = ["env", f"NOTIFY_SOCKET={notify_path}", "WATCHDOG_USEC=1000000"]
    procs = CliTunnel(tmp_path)
    try:
        node = procs.start("node", ["--home", str(homes["node"]), "daemon"], prefix=env)
        node.wait_for(r"^control API on ")
        status = cli_json(homes["node"], "status")
        assert status["ready"] is False and [r["reserved"] for r in status["relays"]] == [False]
        notify.setblocking(False)
        with pytest.raises(BlockingIOError):
            notify.recv(4096)  # nothing yet: no slot, no READY
        notify.setblocking(True)
        notify.settimeout(60)
        procs.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", f"/ip4/127.0.0.1/tcp/{relay_port}"]
        )
        first = notify.recv(4096).decode()
        assert first.splitlines()[0] == "READY=1", first
        assert [r["reserved"] for r in cli_json(homes["node"], "status")["relays"]] == [True]
        assert notify.recv(4096).decode() == "WATCHDOG=1"
        node.popen.send_signal(signal.SIGTERM)
        messages: list[str] = []
        while not any(m.startswith("STOPPING=1") for m in messages):
            messages.append(notify.recv(4096).decode())
        assert node.popen.wait(30) == 0
    finally:
        procs.stop()
        notify.close()


@pytest.mark.slow
def test_prometheus_scrapes_the_tunnel_byte_counter(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("Debian's prometheus package is not installed (apt-get install prometheus)")
    homes = {name: tmp_path / name for name in ("relay", "home", "laptop")}
    ids = {name: init_home(home) for name, home in homes.items()}
    assert cli(homes["home"], "auth", "add", ids["laptop"]).returncode == 0
    echo = EchoServer()
    procs = CliTunnel(tmp_path)
    try:
        relay = procs.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0"]
        )
        relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        common = f'relays = ["{relay_addr}"]\nlisten = ["/ip4/127.0.0.1/tcp/0"]\n' + FAST_RETRY
        (homes["home"] / "config.toml").write_text(common + f'[services.echo]\naddress = "127.0.0.1:{echo.port}"\n')
        port = free_port()
        (homes["laptop"] / "config.toml").write_text(
            common + f'[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n'
            f'[tunnels.echo]\npeer = "{ids["home"]}"\nservice = "echo"\nport = {port}\n'
        )
        procs.start("home", ["--home", str(homes["home"]), "daemon"]).wait_for(r"^ready$")
        laptop = procs.start("laptop", ["--home", str(homes["laptop"]), "daemon"])
        metrics_url = laptop.wait_for(r"^metrics on (http://\S+)/metrics").group(1)
        laptop.wait_for(r"^ready$")
        assert httpx.get(f"{metrics_url}/healthz", timeout=10).json()["ok"] is True
        payload = pattern_bytes(300_000, seed=8)
        assert sha(echo_through(port, payload)) == sha(payload)
        web = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: peerup\n    static_configs:\n"
            f"      - targets: ['{metrics_url.removeprefix('http://')}']\n"
        )
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            query = 'peerup_tunnel_bytes_total{service="echo",kind="outbound",direction="up"}'
            value = None
            deadline = time.monotonic() + 60
            while value is None and time.monotonic() < deadline:  # until the first scrapes landed
                try:
                    answer = httpx.get(f"http://127.0.0.1:{web}/api/v1/query", params={"query": query}, timeout=5)
                    result = answer.json()["data"]["result"]
                    value = float(result[0]["value"][1]) if result else None
                except (httpx.HTTPError, ValueError, KeyError):
                    value = None
                if value is None:
                    time.sleep(0.5)
            assert value == len(payload)
            # every query of the Grafana dashboard in deploy/ is valid PromQL over these names
            dashboard = json.loads((Path(__file__).parent.parent / "deploy" / "grafana-dashboard.json").read_text())
            for panel in dashboard["panels"]:
                for target in panel["targets"]:
                    expr = target["expr"].replace("$instance", ".*")
                    answer = httpx.get(f"http://127.0.0.1:{web}/api/v1/query", params={"query": expr}, timeout=5)
                    assert answer.json()["status"] == "success", (panel["title"], answer.text)
        finally:
            server.terminate()
            server.wait(30)
    finally:
        procs.stop()
        echo.stop()


def test_invite_while_the_daemon_runs_is_held_by_the_daemon_and_the_joiner_is_served(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """``peerup invite`` on a home whose daemon runs must not start a second node with the same ID."""
    homes, procs = world["homes"], world["procs"]
    phone = tmp_path / "phone"
    init_home(phone)
    inviter = procs.start("invite", ["--home", str(homes["home"]), "invite", "--name", "phone", "--ttl", "2m"])
    code = inviter.wait_for(r"^\s+([0-9A-Z]{5}(?:-[0-9A-Z]{1,5})+)$", timeout=30).group(1)
    inviter.wait_for(r"^held by the running daemon \(invite i\d+\)")
    joined = cli(phone, "join", code, "--name", "homebox")
    assert joined.returncode == 0, joined.stderr
    inviter.wait_for(r"^paired with phone \(", timeout=30)
    assert inviter.popen.wait(30) == 0
    assert "phone" in (homes["home"] / "authorized_keys").read_text()
    # The daemon that held the invite serves the new peer at once, by names only.
    proxy = procs.start("phone proxy", ["--home", str(phone), "proxy", "homebox", "echo", "0"])
    port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))
    payload = pattern_bytes(256 * 1024, seed=7)
    assert sha(echo_through(port, payload)) == sha(payload)
    # Used: the same code again is refused by the daemon, and nothing changes.
    keys = (homes["home"] / "authorized_keys").read_bytes()
    again = cli(tmp_path / "stranger", "join", code)
    assert again.returncode == 1
    assert (homes["home"] / "authorized_keys").read_bytes() == keys
