"""The network lab (peerup.netlab) behaves like the real internet, shown with plain sockets (no libp2p).

One lab per module: a relay and a second public host, cone homes c1, c2, c3 and
symmetric homes s1, s2 (each one router and one host); the tests that change a
router (miniupnpd, breaking a path) add their own homes to it. Needs root and
iproute2 + iptables (+ conntrack, nftables, miniupnpd-nftables for the last tests);
anything missing makes the tests skip with the reason. Run with ``-s`` to see the
measurements each test prints.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peerup import netlab
from peerup.netlab import (
    Home,
    Host,
    NatKind,
    NetLab,
    NetLabUnavailable,
    Process,
    netns_list,
    sweep_stale,
    unavailable_reason,
)

pytestmark = pytest.mark.system

RENDEZVOUS, RENDEZVOUS_2, ECHO = 7000, 7001, 7100


@dataclass
class World:
    lab: NetLab
    relay: Host
    other: Host
    homes: dict[str, Home]

    @property
    def rendezvous(self) -> str:
        return f"{self.relay.ip}:{RENDEZVOUS}"


def _skip_unless_possible() -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    _skip_unless_possible()
    lab = NetLab()
    try:
        lab.start()
        relay, other = lab.public_host("relay"), lab.public_host("other")
        homes = {name: lab.home(name, nat="cone") for name in ("c1", "c2", "c3")}
        homes.update({name: lab.home(name, nat="symmetric") for name in ("s1", "s2")})
        for host, port in ((relay, RENDEZVOUS), (relay, RENDEZVOUS_2), (other, RENDEZVOUS)):
            host.tool("rendezvous", "--port", str(port), ready="^ready")
        relay.tool("echo", "--port", str(ECHO), ready="^ready")
    except NetLabUnavailable as exc:
        lab.close()
        pytest.skip(str(exc))
    except BaseException:
        lab.close()
        raise
    try:
        yield World(lab, relay, other, homes)
    finally:
        lab.close()


def _results(procs: list[Process]) -> list[Any]:
    return [proc.json(timeout=30) for proc in procs]


# -- the lab itself -------------------------------------------------------------------


def test_unavailable_reason_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs anywhere: the skip reasons name the missing privilege or package."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (unavailable_reason() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "iptables-restore" else "/bin/x")
    assert "apt-get install -y iptables" in (unavailable_reason() or "")


def _root_state() -> tuple[str, str]:
    link = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    route = subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout
    return "\n".join(sorted(line.split(":", 2)[1] for line in link.splitlines())), route


def test_lab_builds_fast_touches_nothing_outside_and_leaves_nothing_behind() -> None:
    _skip_unless_possible()
    root_before = _root_state()
    started = time.monotonic()
    try:
        with NetLab() as lab:
            lab.public_host("relay")
            kinds: list[tuple[str, NatKind]] = [("a", "cone"), ("b", "symmetric"), ("c", "cone")]
            for name, nat in kinds:
                lab.home(name, nat=nat)
            built = time.monotonic() - started
            mine = [ns for ns in netns_list() if ns.startswith(lab.prefix)]
            assert sorted(mine) == sorted(lab.namespaces), lab.describe()
            assert len(mine) == 1 + 1 + 3 * 2  # the internet, the relay, three routers and hosts
            assert _root_state() == root_before, "the lab changed the root namespace"
            lab.homes["a"].host.tool("echo", "--port", "9", ready="^ready")  # a process left running
            raise KeyError("boom")
    except NetLabUnavailable as exc:
        pytest.skip(str(exc))
    except KeyError:
        pass
    assert not [ns for ns in netns_list() if ns.startswith(lab.prefix)], "namespaces left behind after an error"
    assert _root_state() == root_before
    assert all(p.poll() is not None for p in lab._popens)
    print(f"\nlab of 1 public host + 3 homes: built in {built:.3f} s, torn down in {lab.timings['close']:.3f} s")
    print({k: round(v, 4) for k, v in lab.timings.items()})


def test_namespaces_of_a_killed_run_are_swept() -> None:
    """A run killed with SIGKILL never reaches its cleanup: the next lab deletes what it left."""
    _skip_unless_possible()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netlab.NS_PREFIX}-{dead.pid}-abcd-x"
    if subprocess.run(["ip", "netns", "add", stale], capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    workdir = Path(tempfile.mkdtemp(prefix=f"{netlab.NS_PREFIX}-{dead.pid}-abcd-"))
    try:
        assert stale in sweep_stale()
        assert stale not in netns_list()
        assert not workdir.exists()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)


# -- 1. reachability --------------------------------------------------------------------


def test_nated_hosts_reach_out_but_nothing_reaches_in(world: World) -> None:
    c1, c2, s1 = world.homes["c1"], world.homes["c2"], world.homes["s1"]
    port = "7200"
    for home in (c1, s1):
        home.host.tool("echo", "--port", port, ready="^ready")
    # The attacker next door: a public host with a route into c1's LAN through c1's router.
    attacker = world.other
    attacker.run(["ip", "route", "replace", str(c1.router.lan_net), "via", c1.router.wan_ip])
    try:
        # All at once, so the timeouts overlap.
        out_p = [h.host.tool("probe", "--to", f"{world.relay.ip}:{ECHO}") for h in (c1, s1)]
        seen_p = [h.host.tool("observe", "--to", world.rendezvous) for h in (c1, s1)]
        in_p = world.relay.tool("probe", "--to", f"{c1.public_ip}:{port}", "--to", f"{s1.public_ip}:{port}")
        routed_p = attacker.tool("probe", "--to", f"{c1.host.ip}:{port}")
        lan_p = [h.host.tool("probe", "--to", f"{c1.host.ip}:{port}") for h in (c2, s1)]
        control_p = c1.router.tool("probe", "--to", f"{c1.host.ip}:{port}")
        out = [r[0] for r in _results(out_p)]
        seen = _results(seen_p)
        inbound = in_p.json()
        routed = routed_p.json()[0]
        lan = [r[0] for r in _results(lan_p)]
        control = control_p.json()[0]
    finally:
        attacker.run(["ip", "route", "del", str(c1.router.lan_net)], check=False)

    assert all(r["ok"] for r in out), out
    # The public side sees the router's address, never the LAN address.
    assert [s["observed"][0][0] for s in seen] == [c1.public_ip, s1.public_ip]
    assert control["ok"], control  # the listener is there: what follows is the NAT's doing
    # Unsolicited inbound is dropped silently (a timeout, not a refusal), on the router and through it.
    assert [r["error"] for r in inbound] == ["timeout", "timeout"], inbound
    assert routed["error"] == "timeout", routed
    # Another home's LAN address is not on the internet at all.
    assert all(r["error"] == "unreachable" for r in lan), lan


# -- 2. mapping behaviour -----------------------------------------------------------------


def test_mapped_port_is_preserved_by_cone_and_new_per_destination_by_symmetric(world: World) -> None:
    destinations = [world.rendezvous, f"{world.relay.ip}:{RENDEZVOUS_2}", f"{world.other.ip}:{RENDEZVOUS}"]
    args = [arg for dest in destinations for arg in ("--to", dest)]
    cone, symmetric = _results([world.homes[h].host.tool("observe", *args) for h in ("c1", "s1")])
    cone_ports = [port for _, port in cone["observed"]]
    symmetric_ports = [port for _, port in symmetric["observed"]]
    print(f"\nlocal port {cone['local_port']} behind cone -> {cone_ports}")
    print(f"local port {symmetric['local_port']} behind symmetric -> {symmetric_ports}")
    assert cone_ports == [cone["local_port"]] * 3
    # Random per flow: three equal ports would be a 1 in 4e9 coincidence.
    assert len(set(symmetric_ports)) >= 2, symmetric_ports


# -- 3. TCP hole punching ---------------------------------------------------------------


def _punch(world: World, a: Home, b: Home, session: str, window: float, size: int) -> tuple[Process, Process]:
    args = ("punch", "--rendezvous", world.rendezvous, "--session", session, "--window", str(window),
            "--bytes", str(size))  # fmt: skip
    return a.host.tool(*args), b.host.tool(*args)


def _crossed(r1: dict[str, Any], r2: dict[str, Any]) -> bool:
    return bool(
        r1["ok"] and r2["ok"] and r1["sent_sha256"] == r2["recv_sha256"] and r2["sent_sha256"] == r1["recv_sha256"]
    )


def test_tcp_hole_punching_works_cone_to_cone_and_fails_with_symmetric(world: World) -> None:
    h = world.homes
    tries, failing_tries, window = 10, 3, 2.0
    # The pairs expected to fail run meanwhile (their windows are what takes time).
    failing = {
        pair: [_punch(world, h[pair[0]], h[pair[1]], f"{pair[0]}{pair[1]}-{i}", window, 1024)
               for i in range(failing_tries)]
        for pair in (("s1", "s2"), ("c3", "s1"))
    }  # fmt: skip
    cone: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for i in range(tries):
        p1, p2 = _punch(world, h["c1"], h["c2"], f"cc-{i}", 5.0, 1 << 20)
        cone.append((p1.json(), p2.json()))
    failed = {pair: [(p1.json(), p2.json()) for p1, p2 in procs] for pair, procs in failing.items()}

    good = [(r1, r2) for r1, r2 in cone if _crossed(r1, r2)]
    times = [max(r1["punch_s"], r2["punch_s"]) for r1, r2 in good]
    print(f"\ncone<->cone: {len(good)}/{tries} punched, 1 MiB each way, SHA-256 equal both ways;"
          f" attempts {sorted({r['attempts'] for pair in cone for r in pair})};"
          f" connect after PEER: median {statistics.median(times) * 1000:.2f} ms, max {max(times) * 1000:.2f} ms;"
          f" rendezvous {statistics.median(r1['rendezvous_s'] for r1, _ in cone) * 1000:.1f} ms")  # fmt: skip
    for (a, b), results in failed.items():
        ok = sum(_crossed(r1, r2) for r1, r2 in results)
        sample = results[0][0]
        print(
            f"{h[a].nat}<->{h[b].nat} ({a}-{b}): {ok}/{failing_tries} punched within {window:g} s;"
            f" {a} observed {sample.get('observed')}, told peer {sample.get('peer')}; errors {sample.get('errors')}"
        )
    assert len(good) == tries, json.dumps(cone[0], indent=1)
    # The address each side connected to is the one the rendezvous server observed for the other.
    assert all(r1["connected_to"] == r2["observed"] and r2["connected_to"] == r1["observed"] for r1, r2 in good)
    for pair, results in failed.items():
        assert not any(r1["ok"] or r2["ok"] for r1, r2 in results), (pair, results[0])
        assert all(r["error"] for r1, r2 in results for r in (r1, r2))


# -- 4. miniupnpd -------------------------------------------------------------------------


def test_miniupnpd_forwards_ports_mapped_by_natpmp_and_upnp(world: World) -> None:
    if shutil.which("miniupnpd") is None:
        pytest.skip("miniupnpd is not installed: apt-get install -y miniupnpd-nftables nftables")
    try:
        home = world.lab.home("u", nat="cone", upnp=True)
    except NetLabUnavailable as exc:
        pytest.skip(str(exc))
    assert home.upnp is not None
    host, relay = home.host, world.relay
    host.tool("echo", "--port", "5000", ready="^ready")
    host.tool("echo", "--port", "5001", ready="^ready")
    before = relay.tool_json("probe", "--to", f"{home.public_ip}:5000")[0]
    assert before["error"] == "timeout", before

    started = time.monotonic()
    natpmp = host.tool_json("natpmp", "--gateway", str(host.gateway), "--port", "5000", "--external", "15000")
    natpmp_s = time.monotonic() - started
    assert natpmp["ok"], natpmp
    assert natpmp["external_ip"] == world.lab.addr_of(home) == home.public_ip
    started = time.monotonic()
    upnp = host.tool_json("upnp", "--port", "5001", "--external", "16001")
    upnp_s = time.monotonic() - started
    assert upnp["ok"] and upnp["external_ip"] == home.public_ip, upnp

    after = relay.tool_json("probe", "--to", f"{home.public_ip}:{natpmp['external_port']}",
                            "--to", f"{home.public_ip}:16001")  # fmt: skip
    assert [r["ok"] for r in after] == [True, True], (after, home.upnp.forwards(), home.upnp.log[-20:])
    print(
        f"\nminiupnpd ({home.upnp.backend} build): NAT-PMP map {natpmp_s:.3f} s, UPnP (miniupnpc) map {upnp_s:.3f} s"
        f" (process start included); forwards:\n{home.upnp.forwards()}"
    )


# -- breaking a path mid-session ----------------------------------------------------------


def test_cut_silences_a_path_and_nat_flush_breaks_it_only_when_the_mapping_changes(world: World) -> None:
    if shutil.which("conntrack") is None:
        pytest.skip("conntrack is not installed: apt-get install -y conntrack")
    home = world.lab.home("brk", nat="cone")
    chat = home.host.tool("session", "--to", f"{world.relay.ip}:{ECHO}", stdin=True)
    chat.wait_for('"local"')

    def say(text: str, wait: float = 2.0) -> Any:
        assert json.loads(chat.ask(f"send {text}")) == {"ok": True}
        return json.loads(chat.ask(f"recv {wait}", timeout=wait + 5))

    assert say("one") == {"ok": True, "line": "one"}
    home.router.cut()
    assert say("two", wait=1.0) == {"ok": False, "error": "timeout"}  # silence: no RST, no ICMP
    home.router.restore()
    started = time.monotonic()
    assert json.loads(chat.ask("recv 5", timeout=10)) == {"ok": True, "line": "two"}  # TCP retransmitted it
    recovered = time.monotonic() - started
    # Cone router loses its NAT table: the next packet is picked up again on the same port.
    home.router.flush_conntrack()
    assert say("three") == {"ok": True, "line": "three"}
    # The mapping changes (symmetric from now on, table flushed): the server sees a stranger and resets.
    home.router.set_nat("symmetric")
    home.router.flush_conntrack()
    assert say("four") == {"ok": False, "error": "reset"}
    print(f"\nafter restore(), the retransmitted line arrived in {recovered:.2f} s")
