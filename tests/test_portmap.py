"""Port mapping (issue #12 item 4): a node behind a router that offers NAT-PMP or UPnP IGD
gets its TCP listen port forwarded, and the internet reaches it there.

The router is a real miniupnpd in the network lab (peerup.netlab; ``upnp=True``);
the node runs in the home's host namespace as a separate process (a short script
below), the dialer on a public host. Skipped, with the reason, where the lab
cannot be built (not root, no iproute2/iptables) or miniupnpd is missing. The
first tests need no lab.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.abc
import pytest
import trio

from peerup.plugins.libp2p import portmap
from peerup.pytest_fixtures import netlab_or_skip

MAPPER = """
import json, logging, sys, time, trio
from peerup.plugins.libp2p import portmap
port, methods, hold = int(sys.argv[1]), tuple(sys.argv[2].split(",")), float(sys.argv[3])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
started = time.monotonic()

async def echo(stream):
    async with stream:
        async for chunk in stream:
            await stream.send_all(chunk)

async def main():
    listeners = await trio.open_tcp_listeners(port)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, echo, listeners)
        def on_change(addr):
            print(json.dumps({"mapped": addr, "after": round(time.monotonic() - started, 3)}), flush=True)
        with trio.move_on_after(hold):
            await portmap.keep_port_mapped(port, on_change, methods=methods)
        nursery.cancel_scope.cancel()
    print(json.dumps({"done": round(time.monotonic() - started, 3)}), flush=True)

trio.run(main)
"""

#: A peerup node (the libp2p plugin, role "node", no relays) listening on a fixed TCP port.
NODE = """
import json, sys, time, trio
from pathlib import Path
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.node import open_libp2p_node
from peerup.core.settings import Settings
home, port, hold = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
create_identity(home)
settings = Settings(home=home, listen=[f"/ip4/0.0.0.0/tcp/{port}"],
                    nat={"hole_punching": False, "address_discovery": False, "port_mapping": True})

async def main():
    async with open_libp2p_node(settings, "node") as node:
        print(json.dumps({"peer": node.peer_id}), flush=True)
        last = None
        with trio.move_on_after(hold):
            while True:
                mapped = sorted(node.addresses.mapped)
                if mapped != last:
                    print(json.dumps({"mapped": mapped}), flush=True)
                    last = mapped
                await trio.sleep(0.05)
    print(json.dumps({"done": True}), flush=True)

trio.run(main)
"""

#: A peerup node on a public host that dials ADDR (a full /p2p/ address) and pings.
DIALER = """
import json, sys, time, trio
from pathlib import Path
from libp2p.peer.id import ID
from peerup.plugins.libp2p.identity import create_identity
from peerup.plugins.libp2p.keepalive import answers_ping
from peerup.plugins.libp2p.node import open_libp2p_node
from peerup.core.settings import Settings
home, addr = Path(sys.argv[1]), sys.argv[2]
create_identity(home)
settings = Settings(home=home, listen=[], nat={"hole_punching": False, "address_discovery": False})

async def main():
    async with open_libp2p_node(settings, "node") as node:
        peer = ID.from_base58(addr.rsplit("/p2p/", 1)[1])
        started = time.monotonic()
        error = await node._connect_direct(peer, addr)
        result = {"error": error, "connect_s": round(time.monotonic() - started, 3)}
        if error is None:  # a libp2p ping over the connection: Noise and yamux work end to end
            started = time.monotonic()
            result["ping"] = await answers_ping(node.host, peer, 5)
            result["ping_ms"] = round((time.monotonic() - started) * 1000, 2)
        print(json.dumps(result), flush=True)

trio.run(main)
"""


# -- without the lab ---------------------------------------------------------------------------------


def test_mappable_ports_are_ipv4_tcp_not_loopback_not_websocket() -> None:
    addrs = [
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/192.168.1.2/tcp/4001",  # same port once
        "/ip4/127.0.0.1/tcp/4002",
        "/ip4/0.0.0.0/tcp/4003/ws",
        "/ip6/::/tcp/4004",
        "/ip4/10.0.0.2/tcp/4005",
    ]
    assert portmap.mappable_ports(addrs) == [4001, 4005]


@pytest.mark.anyio
async def test_no_gateway_is_one_line_and_the_task_keeps_trying(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing answers NAT-PMP on 127.0.0.1: one INFO line, then quiet retries; bounded."""
    caplog.set_level(logging.DEBUG, "peerup.libp2p.portmap")
    changes: list[str | None] = []
    started = time.monotonic()
    with trio.move_on_after(1.0):
        await portmap.keep_port_mapped(
            4001, changes.append, methods=("nat-pmp",), gateway="127.0.0.1", retry_delays=(0.1,)
        )
    assert changes == []
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "not mapped (nat-pmp: nothing answers NAT-PMP on 127.0.0.1)" in infos[0], infos
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) >= 2  # later failures: DEBUG only
    assert time.monotonic() - started < 2


class ScriptedGateway:
    """A NAT-PMP gateway on 127.0.0.1 that grants ``lifetime`` and answers with ``external_ip``
    (changeable), counting the mapping requests: enough to watch renewals and an address change."""

    def __init__(self, lifetime: int) -> None:
        self.lifetime = lifetime
        self.external_ip = "11.0.0.99"
        self.requests: list[tuple[int, int, int]] = []  # (internal, suggested external, lifetime)
        self.port = 0

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        import socket
        import struct

        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            task_status.started(sock.getsockname()[1])
            while True:  # until cancelled by the test
                data, peer = await sock.recvfrom(64)
                if data[:2] == b"\x00\x00":
                    answer = struct.pack("!BBHI", 0, 128, 0, 1) + socket.inet_aton(self.external_ip)
                else:
                    _, op, _, internal, external, lifetime = struct.unpack("!BBHHHI", data[:12])
                    self.requests.append((internal, external, lifetime))
                    granted = self.lifetime if lifetime else 0
                    answer = struct.pack("!BBHIHHI", 0, op | 0x80, 0, 1, internal, external or internal, granted)
                await sock.sendto(answer, peer)


@pytest.mark.anyio
async def test_mapping_is_renewed_at_half_its_lifetime_and_an_address_change_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway = ScriptedGateway(lifetime=2)
    changes: list[str | None] = []
    async with anyio.create_task_group() as gateways:
        monkeypatch.setattr(portmap, "NATPMP_PORT", await gateways.start(gateway.serve))
        async with anyio.create_task_group() as mapper:  # ended first: its removal must reach the gateway
            mapper.start_soon(
                lambda: portmap.keep_port_mapped(4001, changes.append, methods=("nat-pmp",), gateway="127.0.0.1")
            )
            with anyio.fail_after(5):
                while len(gateway.requests) < 3:  # the first mapping, then a renewal every 1 s
                    await anyio.sleep(0.05)
                gateway.external_ip = "11.0.0.98"
                while len(changes) < 2:
                    await anyio.sleep(0.05)
            mapper.cancel_scope.cancel()
        gateways.cancel_scope.cancel()
    assert changes[:2] == ["/ip4/11.0.0.99/tcp/4001", "/ip4/11.0.0.98/tcp/4001"]
    assert changes[-1] is None  # and the task's end is reported
    assert gateway.requests[0] == (4001, 4001, portmap.LIFETIME)
    assert gateway.requests[-1] == (4001, 0, 0)  # removed at exit: lifetime 0
    assert all(r == (4001, 4001, portmap.LIFETIME) for r in gateway.requests[1:-1])  # renewals keep the port


# -- in the lab: a real miniupnpd -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab() -> Iterator[Any]:
    if shutil.which("miniupnpd") is None:
        pytest.skip("miniupnpd is not installed: apt-get install -y miniupnpd-nftables nftables")
    with netlab_or_skip() as lab:
        lab.public_host("pub")
        yield lab


def _home(lab: Any, name: str, upnp: bool = True) -> Any:
    from peerup.netlab import NetLabUnavailable

    try:
        return lab.home(name, nat="cone", upnp=upnp)
    except NetLabUnavailable as exc:
        pytest.skip(str(exc))


def _json_lines(proc: Any, key: str, timeout: float) -> dict[str, Any]:
    """The first stdout JSON line with ``key``, waiting up to ``timeout``."""
    match = proc.wait_for(rf'^\{{"{key}"', timeout=timeout)
    line = next(line for line in proc.lines if line.startswith(match.group(0)))
    result: dict[str, Any] = json.loads(line)
    return result


@pytest.mark.system
@pytest.mark.parametrize("method", ["nat-pmp", "upnp"])
def test_router_forwards_the_mapped_port_until_the_node_stops(lab: Any, method: str) -> None:
    home = _home(lab, "np" if method == "nat-pmp" else "up")
    public = lab.nodes["pub"]
    port = 4100
    mapper = home.host.spawn([sys.executable, "-c", MAPPER, str(port), method, "6"])
    mapped = _json_lines(mapper, "mapped", timeout=15)
    assert mapped["mapped"] == f"/ip4/{home.public_ip}/tcp/{port}", (mapped, mapper.errors)
    assert mapped["after"] < 5, mapped  # one round trip to the router (UPnP: + 1 s SSDP)
    reached = public.tool_json("probe", "--to", f"{home.public_ip}:{port}")[0]
    assert reached["ok"], (reached, home.upnp.forwards(), home.upnp.log[-10:])
    logged = [line for line in mapper.errors if "port mapping" in line]
    assert len(logged) == 1 and f"reachable at /ip4/{home.public_ip}/tcp/{port} ({method}" in logged[0], logged

    done = _json_lines(mapper, "done", timeout=15)
    assert done["done"] < 9, done  # removal is bounded
    gone = public.tool_json("probe", "--to", f"{home.public_ip}:{port}")[0]
    assert gone["error"] == "timeout", (gone, home.upnp.forwards())
    print(f"\n{method}: mapped after {mapped['after']} s; removed at exit; {logged[0]}")


@pytest.mark.system
def test_no_gateway_in_the_lab_is_one_line(lab: Any) -> None:
    home = _home(lab, "plain", upnp=False)
    mapper = home.host.spawn([sys.executable, "-c", MAPPER, "4200", "nat-pmp,upnp", "5"])
    done = _json_lines(mapper, "done", timeout=20)
    assert not [line for line in mapper.lines if '"mapped"' in line], mapper.lines
    logged = [line for line in mapper.errors if "port mapping" in line]
    assert len(logged) == 1 and "not mapped (nat-pmp: nothing answers NAT-PMP" in logged[0], mapper.errors
    assert "upnp: no UPnP gateway answered" in logged[0], logged
    print(f"\nno gateway: {logged[0]} (task ran {done['done']} s)")


@pytest.mark.system
def test_a_libp2p_dial_from_the_internet_reaches_a_node_behind_the_mapping(lab: Any, tmp_path: Any) -> None:
    home = _home(lab, "p2p")
    public = lab.nodes["pub"]
    port = 4300
    closed = public.tool_json("probe", "--to", f"{home.public_ip}:{port}")[0]
    assert closed["error"] == "timeout", closed  # the router lets nothing in unasked
    node = home.host.spawn([sys.executable, "-c", NODE, str(tmp_path / "node"), str(port), "8"])
    peer = _json_lines(node, "peer", timeout=20)["peer"]
    node.wait_for(rf'"mapped": \["/ip4/{home.public_ip}/tcp/{port}"\]', timeout=15)
    addr = f"/ip4/{home.public_ip}/tcp/{port}/p2p/{peer}"
    dialer = public.spawn([sys.executable, "-c", DIALER, str(tmp_path / "dialer"), addr])
    result = dialer.json(timeout=40)
    assert result["error"] is None and result["ping"], (result, dialer.errors[-10:], node.errors[-10:])
    _json_lines(node, "done", timeout=20)  # the node stopped: its mapping is removed (bounded)
    gone = public.tool_json("probe", "--to", f"{home.public_ip}:{port}")[0]
    assert gone["error"] == "timeout", (gone, home.upnp.forwards())
    print(f"\nlibp2p dial from the internet to {addr}: {result}")
