"""Soak: thousands of connections through one relayed tunnel, and nothing left behind.

Relay, serving node and proxy run in this process (peerup/testing.py), so the
process's open file descriptors (/proc/self/fd) and its trio task count (a walk
of the task tree from the root task) cover all three. Both are measured after a
warm-up (connections to the relay and the circuit exist, caches are filled) and
must come back to exactly that baseline once the load is over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest

from peerup.core.node import PeerAttribute
from peerup.testing import (
    RELAYED_ONLY,
    client_node,
    echo_handler,
    echo_roundtrip,
    open_fds,
    proxy_listener,
    relay,
    serving_node,
    settle,
    tcp_service,
    trio_task_count,
)

pytestmark = [pytest.mark.anyio, pytest.mark.system]

SEQUENTIAL = int(os.environ.get("PEERUP_SOAK_SEQUENTIAL", "5000"))
CONCURRENT = int(os.environ.get("PEERUP_SOAK_CONCURRENT", "200"))
#: Time for connections torn down a moment ago to finish closing (yamux FIN/ACK, TIME_WAIT is not an fd).
SETTLE = 20.0


async def test_sequential_and_concurrent_connections_leave_nothing_behind(tmp_path: Path) -> None:
    async with (
        tcp_service(echo_handler) as addr,
        relay(tmp_path) as relay_addr,
        # 200 concurrent connections from one peer: above the default per-peer cap of 64.
        serving_node(
            tmp_path,
            relay_addr,
            {"svc": addr},
            auth={"allow_all": True, "max_streams_per_peer": CONCURRENT + 8},
            nat=RELAYED_ONLY,
        ) as (server_rt, server),
        client_node(tmp_path, relay_addr) as (client_rt, client),
        proxy_listener(client_rt, client, server.peer_id) as port,
    ):
        with anyio.fail_after(30):
            stream = await client_rt.open_service_stream(client, server.peer_id, "svc")
            assert stream.extra(PeerAttribute.path) == "relayed"
            await stream.aclose()
            for n in range(50):  # warm-up
                assert await echo_roundtrip(port, b"warm %d" % n) == b"warm %d" % n
        await anyio.sleep(1.0)
        base_fds, base_tasks = open_fds(), trio_task_count()

        started = time.monotonic()
        failures: list[str] = []
        for n in range(SEQUENTIAL):
            payload = b"seq %d " % n + os.urandom(64)
            try:
                with anyio.fail_after(15):
                    got = await echo_roundtrip(port, payload)
            except (TimeoutError, OSError, anyio.BrokenResourceError) as exc:
                failures.append(f"#{n}: {exc!r}")
                continue
            if got != payload:
                failures.append(f"#{n}: got {len(got)} bytes back instead of {len(payload)}")
        sequential_s = time.monotonic() - started

        results: dict[int, bool] = {}

        async def one(n: int) -> None:
            payload = b"par %d " % n + os.urandom(4096)
            try:
                results[n] = await echo_roundtrip(port, payload) == payload
            except (OSError, anyio.BrokenResourceError) as exc:
                failures.append(f"concurrent #{n}: {exc!r}")

        started = time.monotonic()
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for n in range(CONCURRENT):
                    tg.start_soon(one, n)
        concurrent_s = time.monotonic() - started

        fds = await settle(open_fds, base_fds, SETTLE)
        tasks = await settle(trio_task_count, base_tasks, SETTLE)
        print(
            f"\nsoak: {SEQUENTIAL} sequential in {sequential_s:.1f} s "
            f"({sequential_s / SEQUENTIAL * 1000:.1f} ms each), "
            f"{CONCURRENT} concurrent in {concurrent_s:.1f} s; fds {base_fds} -> {fds}, tasks {base_tasks} -> {tasks}; "
            f"open tunnels: server {server_rt.open_tunnels}, proxy {client_rt.open_tunnels}"
        )
        assert not failures, f"{len(failures)} failed connections, first: {failures[:5]}"
        assert results == {n: True for n in range(CONCURRENT)}
        assert server_rt.open_tunnels == 0 and client_rt.open_tunnels == 0
        assert fds == base_fds, f"file descriptors leaked: {base_fds} before, {fds} after"
        assert tasks == base_tasks, f"tasks leaked: {base_tasks} before, {tasks} after"
