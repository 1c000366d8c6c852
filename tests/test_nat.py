"""Direct paths across real NATs, and the way back to the relay when there is none.

Each test builds a small internet in network namespaces (peerup/netlab.py: a
public segment with the relay, homes behind Linux NAT routers that drop
unsolicited inbound, as home routers do) and runs the real CLI in it
(peerup/natworld.py): ``peerup relay serve`` on the public side, ``peerup
serve`` next to an echo service, ``peerup proxy`` next to a client application
that sends 16 MiB, reads the echo and compares SHA-256 both ways. The path of
each connection is read from the proxy's log, as a user would.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip``
or ``iptables``). One case per NAT pair here; 20 tries per pair, timings and
throughput are in ``python -m benchmarks.nat`` (docs/performance.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerup.natworld import PeerupWorld, Place
from peerup.netlab import NetLab
from peerup.pytest_fixtures import netlab_or_skip

pytestmark = [pytest.mark.system, pytest.mark.slow]

MiB = 1 << 20
SIZE = 16 * MiB


@pytest.fixture
def lab() -> Iterator[NetLab]:
    with netlab_or_skip() as lab:
        yield lab


def world(lab: NetLab, tmp_path: Path, server: Place, client: Place, server_config: str = "") -> PeerupWorld:
    return PeerupWorld(lab, tmp_path, server, client, server_config=server_config).start()


def check_intact(w: PeerupWorld, expect_path: str | None = None) -> None:
    moved = w.transfer(SIZE)
    assert moved.intact, f"{moved} {w.logs()}"
    if expect_path is not None:
        assert moved.path == expect_path, f"{moved.path} != {expect_path}\n{w.logs()}"


def test_cone_to_cone_becomes_direct_and_stays_correct(lab: NetLab, tmp_path: Path) -> None:
    w = world(lab, tmp_path, "cone", "cone")
    try:
        first = w.transfer(SIZE)
        assert first.intact, f"{first}\n{w.logs()}"  # the first tunnel: relayed (or direct already), intact
        assert w.wait_for_path("direct", timeout=15) is not None, w.logs()
        check_intact(w, "direct")
        assert w.server is not None
        w.server.wait_for(r"direct path to \S+: punch succeeded", stderr=True, timeout=5)
        # A new peer (a third identity) starts relayed and sees the path change.
        out = w.ping(count=6, interval=0.5)
        assert "via direct path" in out, out
        assert "path changed: relayed -> direct" in out or ("seq=0" in out and "path=relayed" not in out), out
    finally:
        w.stop()


@pytest.mark.parametrize(("server", "client"), [("symmetric", "cone"), ("symmetric", "symmetric")])
def test_symmetric_nat_stays_relayed_and_loses_nothing(
    lab: NetLab, tmp_path: Path, server: Place, client: Place
) -> None:
    w = world(lab, tmp_path, server, client)
    try:
        check_intact(w, "relayed")
        assert w.server is not None
        w.server.wait_for(r"direct path to \S+: punch failed", stderr=True, timeout=20)
        # Still relayed after a failed punch, and still byte-exact.
        check_intact(w, "relayed")
    finally:
        w.stop()


@pytest.mark.parametrize(("server", "client"), [("public", "cone"), ("cone", "public")])
def test_public_host_and_nated_host_reach_each_other_directly(
    lab: NetLab, tmp_path: Path, server: Place, client: Place
) -> None:
    w = world(lab, tmp_path, server, client)
    try:
        if server == "public":
            # The server confirmed its address with a dial-back and advertises it:
            # the NATed client dials it directly from the first connection on.
            assert w.server is not None
            w.server.wait_for(r"address \S+ is reachable from outside", stderr=True, timeout=15)
            assert w.wait_for_path("direct", timeout=10) is not None, w.logs()
        else:
            # The NATed server cannot be dialed; it reaches the public client back.
            assert w.wait_for_path("direct", timeout=15) is not None, w.logs()
        check_intact(w, "direct")
    finally:
        w.stop()


def test_direct_path_breaks_then_relay_carries_then_direct_returns(lab: NetLab, tmp_path: Path) -> None:
    w = world(lab, tmp_path, "cone", "cone", server_config="[retry]\ninitial = 0.5\nmax_delay = 2.0\n")
    try:
        assert w.wait_for_path("direct", timeout=15) is not None, w.logs()
        router = w.server_host.home.router if w.server_host.home else None
        assert router is not None
        # The server's NAT changes its mapping (symmetric now) and forgets its table:
        # the direct connection's packets now leave from another port and are reset.
        router.set_nat("symmetric")
        router.flush_conntrack()
        # Every connection of the server's NAT died, the relay connection too: the
        # server notices within seconds (its relay probe) and reserves again, and
        # new tunnels go through the relay. None may end short without an error.
        recovered = recover(w)
        assert recovered is not None, w.logs()
        # The NAT goes back to its usual self: the path returns to direct by itself.
        router.set_nat("cone")
        router.flush_conntrack()
        assert recover(w) is not None, w.logs()
        assert w.wait_for_path("direct", timeout=40) is not None, w.logs()
        check_intact(w, "direct")

    finally:
        w.stop()


def recover(w: PeerupWorld, timeout: float = 30.0) -> float | None:
    """Seconds until a full transfer is intact again; every failure before must be an error, not a short EOF."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        moved = w.transfer(SIZE)
        if moved.intact:
            return time.monotonic() - started
        assert moved.ending != "eof", f"a broken transfer looked finished: {moved}\n{w.logs()}"
        time.sleep(0.5)
    return None


def test_a_port_mapped_server_is_direct_even_for_a_symmetric_client(lab: NetLab, tmp_path: Path) -> None:
    """The server's router runs miniupnpd: the node maps its port, the relay confirms the mapped
    address, and a client behind a symmetric NAT (which cannot punch) dials it directly."""
    w = PeerupWorld(lab, tmp_path, "cone", "symmetric", upnp=True).start()
    try:
        assert w.server is not None
        w.server.wait_for(r"port mapping: TCP \d+ is reachable at", stderr=True, timeout=20)
        w.server.wait_for(r"address /ip4/\S+ is reachable from outside", stderr=True, timeout=20)
        assert w.wait_for_path("direct", timeout=15) is not None, w.logs()
        check_intact(w, "direct")
    finally:
        w.stop()


def test_a_relay_that_limits_circuits_still_carries_the_punch(lab: NetLab, tmp_path: Path) -> None:
    """A relay allowing 256 KiB per relayed connection (as go/js relays do, 128 KiB): enough to
    coordinate the punch; the 16 MiB transfers then run on the direct path. A tunnel the limit
    cuts is reset, never ended short."""
    w = world_with_relay(lab, tmp_path, "[relay]\ncircuit_data = 262144\n")
    try:
        cut = w.transfer(SIZE)  # the first tunnel starts relayed: the relay cuts it at its limit...
        assert cut.intact or cut.ending != "eof", f"a cut tunnel looked finished: {cut}\n{w.logs()}"
        assert w.wait_for_path("direct", timeout=15) is not None, w.logs()
        check_intact(w, "direct")  # ...and the ones after the punch are direct and whole
    finally:
        w.stop()


def world_with_relay(lab: NetLab, tmp_path: Path, relay_config: str) -> PeerupWorld:
    return PeerupWorld(lab, tmp_path, "cone", "cone", relay_config=relay_config).start()
