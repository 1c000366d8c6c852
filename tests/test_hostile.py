"""Attacks from outside (issue #11): a stranger misbehaving on the wire against real peerup processes.

The targets, a relay (``peerup relay serve``) and a serving node (``peerup
serve`` with an echo service), run as separate processes with their own homes
(:class:`peerup.hostile.Lab`); the relay admits only the lab's two peers
(``relay.allow``) and the serving node serves only the client
(``authorized_keys``). The attacker is this test process: real libp2p
connections from fresh identities that then ignore flow control or break the
protocol (:mod:`peerup.hostile`), and plain sockets for the slowloris, from
127.0.0.2 and up, so a legitimate peer on 127.0.0.1 is a different source.

What must hold, whatever the implementation:

* a peer that sends DATA beyond a stream's receive window is disconnected,
  logged a few times (not once per frame), and the target's memory stays
  bounded while 512 MiB are thrown at it;
* slow handshakes cannot keep a new, fast peer out;
* garbage after the handshake closes that connection only, without a traceback;
* thousands of streams on one connection cost bounded memory.

Memory is the target's VmRSS (/proc/PID/status), sampled every 0.1 s during
the attack; bounds are generous (150 MiB), timing bounds are liveness only.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from libp2p.stream_muxer.yamux.yamux import FLAG_ACK

from peerup.hostile import (
    GARBAGE_KINDS,
    IDENTIFY,
    INITIAL_WINDOW,
    PEERUP_PING,
    FloodResult,
    Lab,
    Slowloris,
    Target,
    Watch,
    connect,
    probe,
    process_fds,
    process_rss,
    tracebacks,
)

pytestmark = [pytest.mark.anyio, pytest.mark.system, pytest.mark.usefixtures("quiet_attacker")]

MiB = 1024 * 1024
#: Thrown at the target by each flood: twice what it would take to notice without /proc.
FLOOD = 512 * MiB
#: The target's resident memory may grow this much during an attack (peak over the pre-attack sample).
RSS_SLACK = 150 * MiB
#: Log lines about one attacker's window violations (one per peer is the goal; a few are fine).
MAX_WINDOW_LINES = 10
#: Where attackers come from; the lab's own peers use 127.0.0.1.
ATTACKER = "127.0.0.2"
SPREAD = [f"127.0.0.{n}" for n in range(2, 32)]
SLOWLORIS_SOCKETS = 300
#: Streams opened on one connection by the SYN flood.
SYN_FLOOD = 5_000
WINDOW_LINE = re.compile(r"window", re.IGNORECASE)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A fresh relay + serving node per test: an attack that works must not leak into the next test."""
    with Lab.running(tmp_path) as lab:
        yield lab


@pytest.fixture(scope="module")
def shared_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """One relay + serving node for the garbage cases, which each end one connection."""
    with Lab.running(tmp_path_factory.mktemp("garbage")) as lab:
        yield lab


async def legit_ping(lab: Lab) -> str:
    """``peerup ping`` through the relay from a new process (a new peer on 127.0.0.1); '' if it worked."""
    result = await trio.to_thread.run_sync(lab.ping)
    if result.returncode == 0:
        return ""
    return f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:] or result.stdout[-200:]}"


# -- 1. receive windows --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "how"),
    [("relay", "data"), ("relay", "data+ack"), ("relay", "syn+data"), ("server", "data")],
)
async def test_window_ignoring_flood_is_cut_off_and_memory_stays_bounded(lab: Lab, target: str, how: str) -> None:
    """512 MiB of DATA that ignores the receive window: the target must drop the sender, not buffer it.

    ``data``: frames on an open identify stream (the target answered and never
    reads it again); ``data+ack``: the same with the ACK flag (a separate
    branch upstream); ``syn+data``: new streams whose SYN frame already carries
    4 MiB. After the flood a yamux PING on the same connection tells when the
    target has read everything (unless it dropped us); the connection is held
    open a second longer, so memory the target kept shows in the peak.
    """
    addr, proc = lab.pick(target)
    pid = proc.popen.pid
    await trio.sleep(1.0)  # startup allocations settle
    base_rss = process_rss(pid)
    first_line = len(proc.errors)
    watch = Watch(pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        async with connect(addr, source_ip=ATTACKER) as conn:
            result: FloodResult
            if how == "syn+data":
                result = await conn.flood_new_streams(FLOOD, deadline=120)
            else:
                stream = await conn.open_stream(IDENTIFY)
                flags = FLAG_ACK if how == "data+ack" else 0
                result = await conn.flood_stream(stream.stream_id, FLOOD, flags=flags, deadline=120)
            # The target has read it all (a PING after the flood is answered) or has dropped us.
            dropped = result.dropped or await conn.settle(60) == "dropped"
            await trio.sleep(1.0)  # a sample or ten of the target holding everything it kept
        nursery.cancel_scope.cancel()
    ping = await legit_ping(lab)
    window_lines = [line for line in proc.errors[first_line:] if WINDOW_LINE.search(line)]
    growth = watch.peak_rss - base_rss
    report = (
        f"{target}/{how}: sent {result.sent / MiB:.1f} MiB in {result.frames} frames, {result.seconds:.1f} s, "
        f"dropped={dropped} ({result.error or 'no write error'}); RSS {base_rss / MiB:.0f} MiB -> peak "
        f"{watch.peak_rss / MiB:.0f} MiB (+{growth / MiB:.0f}); {len(window_lines)} window log lines; "
        f"legit ping afterwards: {ping or 'ok'}"
    )
    print("\n" + report)
    assert result.sent > INITIAL_WINDOW, f"the flood never got past the first window: {report}"
    assert growth < RSS_SLACK, f"target buffered the flood: {report}"
    assert dropped, f"target kept the connection of a peer that ignores its receive window: {report}"
    assert len(window_lines) < MAX_WINDOW_LINES, f"{report}; first lines: {window_lines[:3]}"
    assert not ping, f"a legitimate peer could not ping after the flood: {report}\n{lab.logs()}"
    assert proc.popen.poll() is None, f"target died: {report}\n{lab.logs()}"
    assert not tracebacks(proc), f"traceback in the target's log: {report}\n{lab.logs()}"


# -- 2. slow handshakes ---------------------------------------------------------------------


async def _start_slowloris(nursery: trio.Nursery, addr: str, sources: list[str]) -> Slowloris:
    """300 dribbling sockets, all connected at least once before this returns."""
    target = Target.parse(addr)
    attack = Slowloris(target.host, target.port, sockets=SLOWLORIS_SOCKETS, source_ips=sources, duration=60)
    await nursery.start(attack.run)
    with trio.fail_after(20):
        while attack.stats.connects + attack.stats.connect_errors < SLOWLORIS_SOCKETS:
            await trio.sleep(0.05)
    await trio.sleep(1.0)  # every socket has dribbled a byte or two: all in the pre-handshake phase
    return attack


@pytest.mark.parametrize("sources", ["one-ip", "30-ips"])
async def test_slowloris_on_the_relay_does_not_keep_a_new_peer_out(lab: Lab, sources: str) -> None:
    """300 sockets sending a multistream header a byte a second; meanwhile a new peer pings through the relay.

    ``one-ip``: all from 127.0.0.2 (a per-source limit's case); ``30-ips``:
    10 each from 127.0.0.2-31 (the global pending limit's case). The
    legitimate peer comes from 127.0.0.1 while the attack is at full strength.
    """
    assert lab.relay is not None
    pid = lab.relay.popen.pid
    base_fds = process_fds(pid)
    async with trio.open_nursery() as nursery:
        attack = await _start_slowloris(nursery, lab.relay_addr, [ATTACKER] if sources == "one-ip" else SPREAD)
        open_at_ping = attack.stats.open_now
        ping = await legit_ping(lab)
        attack.stop()
    with trio.move_on_after(20):
        while process_fds(pid) > base_fds + 10:
            await trio.sleep(0.2)
    fds = process_fds(pid)
    report = (
        f"slowloris ({sources}) on the relay: {attack.stats.summary()}; {open_at_ping} open when the ping started; "
        f"legit ping: {ping or 'ok'}; relay fds {base_fds} before, {fds} after"
    )
    print("\n" + report)
    assert not ping, f"a new peer could not reach the relay during the attack: {report}\n{lab.logs()}"
    assert fds <= base_fds + 10, f"relay kept sockets of the attack: {report}"
    assert lab.relay.popen.poll() is None and not tracebacks(lab.relay), f"{report}\n{lab.logs()}"


async def test_slowloris_on_a_direct_port_does_not_keep_a_new_peer_out(lab: Lab) -> None:
    """The same attack (30 source addresses) on the serving node's own listener; 5 new peers connect meanwhile."""
    assert lab.server is not None
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        attack = await _start_slowloris(nursery, lab.server_direct, SPREAD)
        for n in range(5):
            outcome = await probe(lab.server_direct)
            if outcome:
                failures.append(f"#{n}: {outcome}")
            await trio.sleep(1.0)
        attack.stop()
    report = f"slowloris (30 ips) on the serving node: {attack.stats.summary()}; legit failures: {failures or 'none'}"
    print("\n" + report)
    assert not failures, report
    assert lab.server.popen.poll() is None and not tracebacks(lab.server), f"{report}\n{lab.logs()}"


# -- 3. garbage after the handshake ------------------------------------------------------------


@pytest.mark.parametrize("target", ["relay", "server"])
@pytest.mark.parametrize("kind", GARBAGE_KINDS)
async def test_garbage_after_the_handshake_closes_that_connection_only(shared_lab: Lab, target: str, kind: str) -> None:
    """Random frames, a bad yamux version, a 4 GiB frame header, or bytes that break Noise.

    The target must end that connection (bounded wait), go on serving a new
    peer, and log no traceback.
    """
    addr, proc = shared_lab.pick(target)
    async with connect(addr, source_ip=ATTACKER) as conn:
        await conn.yamux_ping()  # a working session before the garbage
        await conn.send_garbage(kind)
        closed = await conn.wait_closed(10)
    other = await probe(addr)
    report = f"{kind} at the {target}: connection closed={closed}; a new peer afterwards: {other or 'ok'}"
    print("\n" + report)
    assert closed, f"target kept a connection after garbage: {report}"
    assert not other, report
    assert proc.popen.poll() is None, f"{report}\n{shared_lab.logs()}"
    assert not tracebacks(proc), f"traceback in the {target}'s log: {report}\n{shared_lab.logs()}"


# -- 4. stream floods ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["relay", "server"])
async def test_thousands_of_streams_on_one_connection_are_bounded(lab: Lab, target: str) -> None:
    """5,000 stream SYNs on one connection, each selecting /peerup/ping (a handler that waits for data).

    Whether the target resets streams over a limit or drops the connection is
    its choice; its memory must stay bounded, it must keep serving others, and
    the flooded connection must not be left in limbo: within 30 s a PING sent
    after the flood is answered, or the connection is closed.
    """
    addr, proc = lab.pick(target)
    pid = proc.popen.pid
    await trio.sleep(1.0)
    base_rss = process_rss(pid)
    watch = Watch(pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.run)
        async with connect(addr, source_ip=ATTACKER) as conn:
            result = await conn.syn_flood(SYN_FLOOD, protocol=PEERUP_PING, deadline=60)
            state = "dropped" if result.dropped else await conn.settle(30)
            await trio.sleep(2.0)  # the handlers it started are running now
        nursery.cancel_scope.cancel()
    ping = await legit_ping(lab)
    growth = watch.peak_rss - base_rss
    report = (
        f"SYN flood at the {target}: {result.streams} streams in {result.seconds:.1f} s, then the connection "
        f"was {state}; "
        f"RSS {base_rss / MiB:.0f} MiB -> peak {watch.peak_rss / MiB:.0f} MiB (+{growth / MiB:.0f}); "
        f"legit ping afterwards: {ping or 'ok'}"
    )
    print("\n" + report)
    assert growth < RSS_SLACK, report
    assert state != "stuck", f"the target neither answers nor closes the flooded connection: {report}"
    assert not ping, f"{report}\n{lab.logs()}"
    assert proc.popen.poll() is None, f"{report}\n{lab.logs()}"
    assert not tracebacks(proc), f"traceback in the {target}'s log: {report}\n{lab.logs()}"
