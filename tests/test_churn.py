"""Connection churn from fresh identities against real peerup processes (issue #11, item 1).

py-libp2p 0.8.1 kept a slot of its 250-slot inbound limiter for the life of
the swarm, not of the connection: after about 250 connect-and-close cycles a
relay, or a serving node's direct port, refused every new peer, forever, with
no connection open. Tests that reuse one connection never see it.

Each cycle here is a real dial from a new ed25519 identity: TCP, multistream,
Noise XX, yamux, one yamux PING round trip (the target's muxer answered), then
GO_AWAY and close (:func:`peerup.hostile.churn`). A whole libp2p host per
cycle costs about 200 ms (fixed sleeps in its close path); the bare upgrader
path costs about 4 ms, which is what makes 2,000 cycles fit in a test.

The targets run as separate processes (:class:`peerup.hostile.Lab`); their
open file descriptors (/proc/PID/fd) and resident memory (VmRSS) are compared
before and after the churn.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from peerup.hostile import Lab, churn, probe, process_fds, process_rss, tracebacks

pytestmark = [pytest.mark.anyio, pytest.mark.system, pytest.mark.usefixtures("quiet_attacker")]

MiB = 1024 * 1024
CYCLES = int(os.environ.get("PEERUP_CHURN_CYCLES", "2000"))
#: Connections in flight at once: well under any sane per-source handshake limit.
CONCURRENCY = 8
#: After the churn the target may keep this many more descriptors (a log file rotated, a DHT socket) ...
FD_SLACK = 8
#: ... and this much more resident memory (allocator arenas do not shrink back).
RSS_SLACK = 64 * MiB


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with Lab.running(tmp_path) as lab:
        yield lab


async def legit_peers(lab: Lab, which: str) -> list[str]:
    """What went wrong for new, well-behaved peers afterwards: a ``peerup ping`` through the relay and,
    for the serving node, a direct connection to the churned port. Empty if all worked."""
    problems = []
    addr, _ = lab.pick(which)
    outcome = await probe(addr)
    if outcome:
        problems.append(f"new peer on {which}'s port: {outcome}")
    result = await trio.to_thread.run_sync(lab.ping)
    if result.returncode != 0:
        problems.append(f"peerup ping exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    return problems


@pytest.mark.parametrize("which", ["relay", "server"])
async def test_300_connect_and_close_cycles_do_not_lock_the_listener(lab: Lab, which: str) -> None:
    """The '250 forever' bug, fast: 300 fresh peers connect and leave, then a new one must still get in."""
    addr, proc = lab.pick(which)
    stats = await churn(addr, 300, concurrency=CONCURRENCY, deadline=60)
    problems = await legit_peers(lab, which)
    report = f"300 cycles at the {which}: {stats.summary()}; afterwards: {problems or 'new peers ok'}"
    print("\n" + report)
    assert stats.ok == 300, report
    assert not problems, f"{report}\n{lab.logs()}"
    assert proc.popen.poll() is None and not tracebacks(proc), f"{report}\n{lab.logs()}"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["relay", "server"])
async def test_2000_fresh_peers_come_and_go_and_leave_nothing_behind(lab: Lab, which: str) -> None:
    """2,000 connect-and-close cycles, 8 at a time; then FDs and memory are back near the baseline
    and a new peer still gets in."""
    addr, proc = lab.pick(which)
    pid = proc.popen.pid
    warm = await churn(addr, 40, concurrency=CONCURRENCY, deadline=30)  # caches, arenas, first-use imports
    assert warm.ok == 40, f"warm-up: {warm.summary()}\n{lab.logs()}"
    await trio.sleep(2.0)
    base_fds, base_rss = process_fds(pid), process_rss(pid)

    stats = await churn(addr, CYCLES, concurrency=CONCURRENCY, deadline=75)
    with trio.move_on_after(10):  # connections closed a moment ago finish closing
        while process_fds(pid) > base_fds:
            await trio.sleep(0.2)
    fds, rss = process_fds(pid), process_rss(pid)
    problems = await legit_peers(lab, which)
    report = (
        f"{CYCLES} cycles at the {which}: {stats.summary()}; fds {base_fds} -> {fds}, "
        f"RSS {base_rss / MiB:.0f} -> {rss / MiB:.0f} MiB; afterwards: {problems or 'new peers ok'}"
    )
    print("\n" + report)
    assert stats.ok == CYCLES, report
    assert fds <= base_fds + FD_SLACK, f"file descriptors left behind: {report}"
    assert rss - base_rss < RSS_SLACK, f"memory left behind: {report}"
    assert not problems, f"{report}\n{lab.logs()}"
    assert proc.popen.poll() is None and not tracebacks(proc), f"{report}\n{lab.logs()}"
