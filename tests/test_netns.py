"""Real network separation: the serving node and the client in two network namespaces
that cannot reach each other, only the relay.

The test builds, as root, with ``ip netns`` and veth pairs::

    netns A (peerup serve, web service on A's 127.0.0.1)
        vethA 10.231.1.2/30 ── 10.231.1.1/30 ┐
                                             root namespace: peerup relay serve (0.0.0.0)
        vethB 10.231.2.2/30 ── 10.231.2.1/30 ┘
    netns B (peerup proxy, peerup ping, the HTTP client)

Neither namespace has a default route, so A has no route to B nor B to A (the
test checks both: "Network is unreachable"); each reaches the relay's address on
its own link only. Skipped, with the reason, where namespaces cannot be created
(not root, no ``ip``, no CAP_NET_ADMIN in a container).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerup.testing import CliTunnel, free_port, init_home, peerup_run

pytestmark = pytest.mark.system

NET_A, NET_B = "10.231.1", "10.231.2"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces, each with one veth to the root namespace; yields their names."""
    if sys.platform != "linux":
        pytest.skip("network namespaces are Linux only")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed: apt-get install -y iproute2")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CAP_NET_ADMIN)")
    in_use = _ip("-o", "addr", check=False).stdout
    if f" {NET_A}." in in_use or f" {NET_B}." in in_use:
        pytest.skip(f"{NET_A}.0/30 or {NET_B}.0/30 is already in use on this machine")
    tag = secrets.token_hex(3)
    ns_a, ns_b = f"peerup-a-{tag}", f"peerup-b-{tag}"
    links = {ns_a: (f"pua{tag}", f"pua{tag}n", NET_A), ns_b: (f"pub{tag}", f"pub{tag}n", NET_B)}
    created: list[str] = []
    try:
        try:
            for ns, (outside, inside, net) in links.items():
                _ip("netns", "add", ns)
                created.append(ns)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", inside, "netns", ns)
                _ip("addr", "add", f"{net}.1/30", "dev", outside)
                _ip("link", "set", outside, "up")
                _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", inside)
                _ip("-n", ns, "link", "set", inside, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except RuntimeError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        yield ns_a, ns_b
    finally:
        for ns in created:
            _ip("netns", "del", ns, check=False)  # takes the inside ends, and so both ends, of its veth
        for outside, _, _ in links.values():
            _ip("link", "del", outside, check=False)


def _in_ns(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def _py(ns: str, code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_in_ns(ns), sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


CONNECT = "import socket, sys\nsocket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
FETCH = "import sys, urllib.request\nprint(urllib.request.urlopen(sys.argv[1], timeout=60).read().decode())\n"


def test_server_and_client_in_separate_namespaces_meet_through_the_relay(
    tmp_path: Path, namespaces: tuple[str, str]
) -> None:
    ns_a, ns_b = namespaces
    homes = {name: tmp_path / name for name in ("relay", "home", "laptop")}
    for home in homes.values():
        init_home(home)
    laptop_id = peerup_run(["--home", str(homes["laptop"]), "whoami"]).stdout.strip()
    assert peerup_run(["--home", str(homes["home"]), "auth", "add", laptop_id]).returncode == 0
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from namespace A\n")
    web_port, relay_port = free_port(), free_port()

    cli = CliTunnel(tmp_path)
    web = subprocess.Popen(
        [*_in_ns(ns_a), sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(site),
         str(web_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        relay = cli.start(
            "relay", ["--home", str(homes["relay"]), "relay", "serve", "--listen", f"/ip4/0.0.0.0/tcp/{relay_port}"]
        )
        relay_id = relay.wait_for(r"/p2p/(\S+)").group(1)
        relay_for_a = f"/ip4/{NET_A}.1/tcp/{relay_port}/p2p/{relay_id}"
        relay_for_b = f"/ip4/{NET_B}.1/tcp/{relay_port}/p2p/{relay_id}"

        # No route between the namespaces, in either direction.
        for ns, peer_net in ((ns_a, NET_B), (ns_b, NET_A)):
            probe = _py(ns, CONNECT, f"{peer_net}.2", "9")
            assert probe.returncode != 0 and "Network is unreachable" in probe.stderr, probe.stderr
        # Each one reaches the relay.
        for ns, net in ((ns_a, NET_A), (ns_b, NET_B)):
            probe = _py(ns, CONNECT, f"{net}.1", str(relay_port))
            assert probe.returncode == 0, probe.stderr

        server = cli.start(
            "serve (netns A)",
            ["--home", str(homes["home"]), "-v", "serve", "--service", f"web=127.0.0.1:{web_port}",
             "--relay", relay_for_a],
            prefix=_in_ns(ns_a),
        )  # fmt: skip
        server_id = server.wait_for(r"^peer (\S+)").group(1)
        server.wait_for(r"reachable at \S+p2p-circuit", timeout=30)
        proxy = cli.start(
            "proxy (netns B)",
            ["--home", str(homes["laptop"]), "-v", "proxy", server_id, "web", "0", "--relay", relay_for_b],
            prefix=_in_ns(ns_b),
        )
        port = int(proxy.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))

        page = _py(ns_b, FETCH, f"http://127.0.0.1:{port}/index.html", timeout=90)
        assert page.returncode == 0, page.stderr + cli.logs()
        assert page.stdout.strip() == "hello from namespace A"
        proxy.wait_for(r"connection from .* relayed path", stderr=True)

        ping = peerup_run(
            ["--home", str(homes["laptop"]), "ping", server_id, "-c", "3", "--interval", "0.2", "--relay", relay_for_b],
            prefix=_in_ns(ns_b),
            timeout=90,
        )
        assert ping.returncode == 0, ping.stdout + ping.stderr + cli.logs()
        assert "via relayed path" in ping.stdout, ping.stdout
        assert "3 sent, 3 received, 0% loss" in ping.stdout, ping.stdout
        print("\n" + ping.stdout)
    finally:
        cli.stop()
        web.terminate()
        try:
            web.wait(10)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait(5)
    for proc in cli.procs:
        assert proc.popen.returncode == 0, f"{proc.name} exited with {proc.popen.returncode}\n" + cli.logs()
