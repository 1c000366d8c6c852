"""Bad input through the real CLI: one ``peerup: error:`` line, a non-zero exit, nothing changed.

Each case runs ``peerup`` as a separate process (what a user types), and checks
the whole of stderr: exactly one line, no traceback, no libp2p log noise before
it, and every file already in the home byte for byte as it was. Commands that
would start a node are run with a short timeout: the bugs these cases pin made
them start and run (listening on nothing, on a port another relay holds, or
serving a service named with a newline).
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from peerup.testing import CliProc, free_port, init_home, peerup_run

pytestmark = pytest.mark.system

#: A command that should fail at once gets this long before the test calls it a hang.
QUICK = 15.0
#: A well-formed relay address where no relay runs (nothing may be dialled anyway).
NO_RELAY = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWH1Ak9ur81AMg8UR6hCsJyxgdDpu2fGp8MNytuy7MdmJL"


def snapshot(home: Path) -> dict[str, bytes]:
    """Every file under ``home`` with its bytes, to show a failed command wrote nothing."""
    return {str(p.relative_to(home)): p.read_bytes() for p in sorted(home.rglob("*")) if p.is_file()}


def run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``peerup --home HOME ARGS`` with ``env`` added to a clean environment (via ``env(1)``)."""
    prefix = ["env", *(f"{k}={v}" for k, v in (env or {}).items())]
    try:
        result: subprocess.CompletedProcess[str] = peerup_run(["--home", str(home), *args], prefix, timeout=QUICK)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`peerup {' '.join(args)}` did not stop within {QUICK:g} s: bad input accepted") from exc
    return result


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``peerup: error:`` line that is all of stderr; fails on anything else."""
    assert result.returncode != 0, f"exit 0; stdout: {result.stdout!r}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n{result.stderr}"
    assert lines[0].startswith("peerup: error: "), lines[0]
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with an identity, a config and an authorized_keys file.

    (Replaces conftest's empty ``home`` here: these commands need an identity.)
    """
    path = tmp_path / "home"
    init_home(path)
    (path / "authorized_keys").write_text("12D3KooWH1Ak9ur81AMg8UR6hCsJyxgdDpu2fGp8MNytuy7MdmJL laptop\n")
    (path / "config.toml").write_text('log_level = "warning"\n')
    return path


def refused(home: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run a command that must fail: returns its one error line, after checking it changed no file."""
    before = snapshot(home)
    line = one_error(run(home, *args, env=env))
    assert snapshot(home) == before, f"`peerup {' '.join(args)}` failed but changed the home"
    return line


def own_id(home: Path) -> str:
    return str(peerup_run(["--home", str(home), "whoami"]).stdout.strip())


# -- the config file and the environment ---------------------------------------------


def test_a_config_file_that_is_not_utf8_is_one_line_naming_it(home: Path) -> None:
    me = own_id(home)
    (home / "config.toml").write_bytes(b'log_level = "info"\n\xff\xfe = 1\n')
    for args in (["config", "show"], ["auth", "add", me]):
        line = refused(home, *args)
        assert str(home / "config.toml") in line and "UTF-8" in line, line


def test_a_fresh_home_with_a_bad_config_gets_no_identity(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.toml").write_bytes(b"\xff\xfe")
    one_error(run(fresh, "init"))
    assert snapshot(fresh) == {"config.toml": b"\xff\xfe"}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PEERUP_RELAYS", "not json"),
        ("PEERUP_PEERS", "{home: 12D3KooW}"),
        ("PEERUP_LISTEN", "/ip4/0.0.0.0/tcp/4001"),
        ("PEERUP_RELAY__LISTEN", "/ip4/0.0.0.0/tcp/7777"),
        ("PEERUP_PROXIES", "[{"),
    ],
)
def test_an_environment_variable_that_needs_json_says_so(home: Path, name: str, value: str) -> None:
    line = refused(home, "auth", "add", own_id(home), env={name: value})
    assert f"environment variable {name}" in line and "expects JSON" in line, line
    assert f"e.g. {name}='" in line, line  # an example to copy


# -- listen addresses ------------------------------------------------------------------


UDP = "/ip4/127.0.0.1/udp/5"
QUIC = "/ip4/127.0.0.1/udp/5/quic-v1"
WS = "/ip6/::1/tcp/0/ws"  # only with transports = ["tcp", "ws"]
DNS = "/dns4/localhost/tcp/0"  # libp2p 0.8.1 would listen on every interface
WITH_ID = "/ip4/127.0.0.1/tcp/0/p2p/12D3KooWH1Ak9ur81AMg8UR6hCsJyxgdDpu2fGp8MNytuy7MdmJL"


@pytest.mark.parametrize(
    ("bad", "args"),
    [
        (UDP, ["relay", "serve", "--listen", UDP]),
        (QUIC, ["relay", "serve", "--listen", "/ip4/127.0.0.1/tcp/0", "--listen", QUIC]),
        (UDP, ["serve", "--listen", UDP, "--service", "web=127.0.0.1:80"]),
        (WS, ["run", "--listen", WS]),
        (DNS, ["serve", "--listen", DNS]),
        (WITH_ID, ["run", "--listen", WITH_ID]),
    ],
)
def test_a_listen_address_that_is_not_tcp_is_refused_at_start(home: Path, bad: str, args: list[str]) -> None:
    line = refused(home, *args)
    assert line.startswith(("peerup: error: listen: ", "peerup: error: relay.listen: ")) and repr(bad) in line, line


def test_a_non_tcp_listen_address_for_proxy_is_refused(home: Path) -> None:
    line = refused(home, "proxy", own_id(home), "web", "0", "--listen", "/ip4/127.0.0.1/udp/5")
    assert "/ip4/127.0.0.1/udp/5" in line


def test_a_relay_listen_address_from_the_config_file_is_checked_too(home: Path) -> None:
    (home / "config.toml").write_text('[relay]\nlisten = ["/ip4/127.0.0.1/udp/5"]\n')
    line = refused(home, "relay", "serve")
    assert "/ip4/127.0.0.1/udp/5" in line


def test_a_second_relay_on_the_same_port_is_refused(home: Path, tmp_path: Path) -> None:
    """libp2p listens with SO_REUSEPORT: without the check both relays run and split the traffic."""
    port = free_port()
    first_home = tmp_path / "first"
    init_home(first_home)
    first = CliProc(
        "first relay", ["--home", str(first_home), "relay", "serve", "--listen", f"/ip4/127.0.0.1/tcp/{port}"]
    )
    try:
        first.wait_for(rf"/ip4/127\.0\.0\.1/tcp/{port}/p2p/")
        line = refused(home, "relay", "serve", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert f"port {port} is already in use (another peerup relay?)" in line, line
        line = refused(home, "relay", "serve", "--listen", f"/ip4/0.0.0.0/tcp/{port}")
        assert f"port {port} is already in use" in line, line
        line = refused(home, "serve", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        assert f"port {port} is already in use" in line, line
        assert first.popen.poll() is None  # the first relay is untouched
    finally:
        assert first.stop() == 0


def test_a_port_held_by_another_program_is_refused(home: Path) -> None:
    """A plain listener (no SO_REUSEPORT) made libp2p's bind fail, and the relay ran on nothing."""
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        line = refused(home, "relay", "serve", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert f"port {port} is already in use" in line, line


# -- service and peer names -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--service", "a b=127.0.0.1:80"],
        ["serve", "--service", "ssh\n=127.0.0.1:22"],
        ["run", "--service", "Web=127.0.0.1:80"],
        ["run", "--proxy", "{me}:a b:2222"],
        ["run", "--proxy", "{me}:ssh\n:2222"],
        ["proxy", "{me}", "a b", "0"],
        ["proxy", "{me}", "ssh\n", "0"],
    ],
)
def test_a_bad_service_name_from_the_command_line_is_refused(home: Path, args: list[str]) -> None:
    me = own_id(home)
    line = refused(home, *[arg.format(me=me) for arg in args], "--relay", NO_RELAY)
    assert "expected lowercase letters, digits, '-' or '_'" in line, line


@pytest.mark.parametrize(
    "text",
    [
        '[services."ssh\\n"]\naddress = "127.0.0.1:22"\n',
        '[[proxies]]\npeer = "12D3KooWH1Ak9ur81AMg8UR6hCsJyxgdDpu2fGp8MNytuy7MdmJL"\nservice = "a b"\nport = 2222\n',
    ],
)
def test_a_bad_service_name_in_the_config_file_is_refused(home: Path, text: str) -> None:
    (home / "config.toml").write_text(text)
    line = refused(home, "run")
    assert str(home / "config.toml") in line and "expected lowercase letters" in line, line


@pytest.mark.parametrize(
    ("peer", "args"),
    [
        ("not-a-peer", ["proxy", "not-a-peer", "ssh", "0"]),
        ("not-a-peer", ["ping", "not-a-peer", "-c", "1"]),
        ("not-a-peer", ["run", "--proxy", "not-a-peer:ssh:2222"]),
        ("abc", ["proxy", "abc", "ssh", "0"]),  # base58, but not a peer ID
    ],
)
def test_a_bad_peer_name_is_refused_before_the_node_starts(home: Path, peer: str, args: list[str]) -> None:
    started = time.monotonic()
    line = refused(home, *args, "--relay", NO_RELAY)
    took = time.monotonic() - started
    assert f"peer {peer!r} is neither a name in [peers]" in line, line
    assert took < 5, f"took {took:.1f} s: the node was started first"


def test_a_peers_entry_that_is_not_a_peer_id_is_refused_by_name(home: Path) -> None:
    (home / "config.toml").write_text('[peers]\nhome = "not-an-id"\n')
    line = refused(home, "proxy", "home", "ssh", "0", "--relay", NO_RELAY)
    assert "peer 'home'" in line and "'not-an-id' is not a peer ID" in line, line
