"""The three small-message clients: ``redis-benchmark``, a 64-byte echo, and opening tunnels.

Why these three: a real Redis (its own protocol, pipelining, its own client
measuring percentiles) is the workload the issue names; the 64-byte echo on
``benchmarks/service.py`` is the same shape with every answer verified and no
third-party client; and opening a tunnel per request is what short-lived
clients (HTTP/1.0, many CLIs) do. Every call is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
import subprocess
import threading
import time
from typing import Any

from benchmarks.common import PATTERN
from benchmarks.latency import round_trips
from benchmarks.runner import percentile

REDIS_BENCHMARK = shutil.which("redis-benchmark")
#: redis-benchmark 7's --csv columns, as we name them in the results.
_CSV = {"rps": "rps", "avg_latency_ms": "avg_ms", "p50_latency_ms": "p50_ms", "p99_latency_ms": "p99_ms"}


def redis_benchmark(port: int, clients: int, pipeline: int, requests: int, timeout: float = 120.0) -> dict[str, Any]:
    """``redis-benchmark -t get`` through ``port``: req/s and latency percentiles from its CSV line."""
    if REDIS_BENCHMARK is None:
        raise RuntimeError("redis-benchmark is not installed (apt-get install redis-tools)")
    argv = [REDIS_BENCHMARK, "-h", "127.0.0.1", "-p", str(port), "-t", "get"]
    argv += ["-n", str(requests), "-c", str(clients), "-P", str(pipeline), "-q", "--csv"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    rows = list(csv.reader(line for line in done.stdout.splitlines() if line.startswith('"')))
    header = next((r for r in rows if r and r[0] == "test"), None)
    values = next((r for r in rows if r and r[0] == "GET"), None)
    if done.returncode != 0 or header is None or values is None:
        raise RuntimeError(f"redis-benchmark exit {done.returncode}: {(done.stderr or done.stdout).strip()[-300:]}")
    got = dict(zip(header, values, strict=False))
    missing = [k for k in _CSV if k not in got]
    if missing:  # an older redis-benchmark prints only rps
        raise RuntimeError(f"redis-benchmark CSV lacks {missing}: {header}")
    out: dict[str, Any] = {name: float(got[key]) for key, name in _CSV.items()}
    out["requests"] = requests
    return out


def echo_rate(port: int, clients: int, each: int, timeout: float = 120.0) -> dict[str, Any]:
    """``clients`` threads, ``each`` 64-byte round trips apiece on their own connection: req/s, p50/p99 ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one() -> None:
        try:
            mine = round_trips(port, each, 64)
        except BaseException as exc:  # noqa: BLE001 - reported below, the run must not hang
            errors.append(exc)
            return
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.perf_counter() - started
    if errors or len(latencies) != clients * each:
        raise RuntimeError(f"round trips failed ({len(latencies)}/{clients * each} done): {errors[:1]}")
    latencies.sort()
    return {
        "rps": round(clients * each / elapsed, 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 3),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
        "requests": clients * each,
    }


async def _open_tunnels(port: int, n: int, at_once: int, each_timeout: float) -> dict[str, Any]:
    """``at_once`` workers open ``n`` connections in all: connect, ask 64 bytes, check them, close."""
    todo = iter(range(n))
    ok = 0
    failures: list[str] = []
    expected = PATTERN[:64]

    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"64\n")
            if await reader.readexactly(64) != expected:
                raise RuntimeError("wrong answer")
        finally:
            writer.close()
            await writer.wait_closed()

    async def worker() -> None:
        nonlocal ok
        for i in todo:
            if time.monotonic() > deadline:
                failures.append(f"tunnel {i} and later: not tried, the phase took over {limit:g} s")
                break
            try:
                await asyncio.wait_for(one(), each_timeout)
                ok += 1
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                failures.append(f"tunnel {i}: {type(exc).__name__}: {exc}")

    limit = 60 + n * 0.05
    deadline = time.monotonic() + limit
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(at_once)))
    elapsed = time.perf_counter() - started
    return {
        "tunnels": n,
        "at_once": at_once,
        "ok": ok,
        "failures": n - ok,
        "failure_examples": failures[:3],
        "seconds": round(elapsed, 3),
        "tunnels_per_s": round(ok / elapsed, 1) if elapsed > 0 else None,
    }


def open_tunnels(port: int, n: int, at_once: int, each_timeout: float = 20.0) -> dict[str, Any]:
    """Tunnels opened per second on an already connected proxy (stops starting new ones after 60 s + 50 ms each)."""
    return asyncio.run(_open_tunnels(port, n, at_once, each_timeout))
