"""Latency: time to the first byte of a new tunnel (warm and cold) and round trips on an open one.

Why both: *warm* is what every new TCP connection to a running proxy pays (a
new stream on the existing libp2p connection), *cold* is what a fresh proxy
pays once (lookup, dial, Noise, yamux, maybe a circuit). Round trips show the
per-message cost of the hops once the tunnel is up; ``peerup ping`` is the same
through peerup's own echo protocol.
"""

from __future__ import annotations

import contextlib
import re
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import PATTERN, Verifier
from benchmarks.context import Context
from benchmarks.fmt import cell
from benchmarks.runner import LOOPBACK_ANY, PEERUP, ROOT, STATIC, Proc, log
from benchmarks.topology import ALL_PATHS, Bench


def first_byte(port: int, timeout: float = 40.0) -> float:
    """Seconds from connect() to the first byte of a one-byte answer, on a new connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"1\n")
        if sock.recv(1) != PATTERN[:1]:
            raise RuntimeError("wrong first byte")
        return time.perf_counter() - started


def round_trips(port: int, count: int, size: int = 32, timeout: float = 30.0) -> list[float]:
    """Request/response round trips of ``size`` bytes on one established connection (seconds)."""
    verifier = Verifier()
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(b"%d\n" % size)
            got = 0
            while got < size:
                data = sock.recv(size - got)
                if not data:
                    raise RuntimeError("closed")
                verifier.feed(data)
                got += len(data)
            out.append(time.perf_counter() - started)
    if not verifier.ok:
        raise RuntimeError("corrupt round trip bytes")
    return out


def measure_ping(bench: Bench, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, argv in (
        ("peerup-direct", [*STATIC, bench.direct_addr, "--", "--home", bench.home("ping-direct"), "ping", bench.peer]),
        ("peerup-relayed", [*PEERUP, "--home", bench.home("ping"), "ping", bench.peer, "--relay", bench.relay_addr]),
    ):
        argv = [*argv, "-c", str(count), "--interval", "0.02", "--listen", LOOPBACK_ANY]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False, env=bench.env
            )
            match = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", done.stdout)
            via = re.search(r"via (\w+) path", done.stdout)
            if not match:
                raise RuntimeError((done.stdout + done.stderr).strip()[-300:])
            times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
            out[name] = {
                "min_ms": float(match.group(1)),
                "avg_ms": float(match.group(2)),
                "p50_ms": round(statistics.median(times), 3) if times else None,
                "max_ms": float(match.group(3)),
                "path": via.group(1) if via else None,
                "count": count,
            }
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc)}
        log(f"  ping {name}: {out[name]}")
    # Baselines: the same 32-byte request/answer on one established TCP connection.
    for path in ALL_PATHS:
        port = bench.ports.get(path)
        if port is None:
            out[f"rtt32-{path}"] = {"unavailable": True}
            continue
        try:
            ms = sorted(r * 1000 for r in round_trips(port, count))
            out[f"rtt32-{path}"] = {
                "p50_ms": round(statistics.median(ms), 3),
                "min_ms": round(ms[0], 3),
                "avg_ms": round(statistics.fmean(ms), 3),
                "count": count,
            }
        except Exception as exc:  # noqa: BLE001
            out[f"rtt32-{path}"] = {"error": str(exc)}
    return out


def measure_warm(bench: Bench, samples: int, paths: list[str] = ALL_PATHS) -> dict[str, Any]:
    """A new TCP connection on a proxy that already holds the libp2p connection."""
    out: dict[str, Any] = {}
    for path in paths:
        port = bench.ports.get(path)
        if port is None:
            out[f"warm-{path}"] = {"unavailable": True}
            continue
        try:
            first_byte(port)
            got = sorted(first_byte(port) * 1000 for _ in range(samples))
            out[f"warm-{path}"] = {
                "p50_ms": round(statistics.median(got), 2),
                "min_ms": round(got[0], 2),
                "max_ms": round(got[-1], 2),
                "samples": samples,
            }
        except Exception as exc:  # noqa: BLE001
            out[f"warm-{path}"] = {"error": str(exc)}
    return out


def _cold_argv(bench: Bench, relayed: bool) -> list[str]:
    tail = ["proxy", bench.peer, "bench", "0", "--listen", LOOPBACK_ANY]
    if relayed:
        return [*PEERUP, "--home", bench.home("cold"), *tail, "--relay", bench.relay_addr]
    return [*STATIC, bench.direct_addr, "--", "--home", bench.home("cold-direct"), *tail]


def measure_cold(bench: Bench, samples: int) -> dict[str, Any]:
    """A fresh proxy process each time; first connection = lookup + dial (+ circuit) + stream."""
    out: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], list[str]]]] = [
        ("cold-peerup-relayed", lambda: _cold_argv(bench, True)),
        ("cold-peerup-direct", lambda: _cold_argv(bench, False)),
    ]
    for name, make in cases:
        got: list[float] = []
        errors = []
        for _ in range(samples):
            proc = Proc(name, make(), bench.env)
            try:
                port = Bench._forwarding(proc)
                time.sleep(0.3)  # let the relay reservation settle: we time the tunnel, not process start-up
                got.append(first_byte(port) * 1000)
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc)[:200])
            finally:
                proc.stop()
        got.sort()
        out[name] = {
            "p50_ms": round(statistics.median(got), 2) if got else None,
            "min_ms": round(got[0], 2) if got else None,
            "max_ms": round(got[-1], 2) if got else None,
            "samples": len(got),
            "errors": errors,
        }
        log(f"  first byte {name}: {out[name]}")
    return out


def measure_first_byte(bench: Bench, cold_samples: int, warm_samples: int) -> dict[str, Any]:
    return {**measure_warm(bench, warm_samples), **measure_cold(bench, cold_samples)}


def run(ctx: Context) -> dict[str, Any]:
    """``first_byte`` (warm and cold) and ``ping`` (peerup ping and 32-byte round trips)."""
    bench = ctx.shared()
    log("first byte")
    first = measure_first_byte(bench, ctx.cfg.cold_samples, ctx.cfg.warm_samples)
    log("round trips")
    return {"first_byte": first, "ping": measure_ping(bench, ctx.cfg.ping_count)}


def smoke(tmp: Path | None = None, path: str = "peerup-relayed", samples: int = 3) -> dict[str, Any]:
    """Warm first byte and ``samples`` 32-byte round trips on ``path`` through fresh processes."""
    with contextlib.ExitStack() as stack:
        where = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peerup-bench-")))
        bench = stack.enter_context(Bench(where, True, paths=[path], clients=[]))
        bench.setup()
        port = bench.ports[path]
        assert port is not None
        warm = measure_warm(bench, samples, [path])[f"warm-{path}"]
        rtt = sorted(r * 1000 for r in round_trips(port, samples))
        return {"warm": warm, "rtt32_p50_ms": round(statistics.median(rtt), 3)}


def tables(results: dict[str, Any]) -> list[str]:
    out = []
    if "first_byte" in results:
        lines = [
            "### Time to first byte of a new connection (ms)",
            "",
            "| case | p50 | min | max | samples |",
            "|---|---|---|---|---|",
        ]
        for name, row in results["first_byte"].items():
            if row.get("unavailable"):
                lines.append(f"| {name} | unavailable | | | |")
                continue
            lines.append(
                f"| {name} | {cell(row.get('p50_ms'))} | {cell(row.get('min_ms'))} | "
                f"{cell(row.get('max_ms'))} | {cell(row.get('samples'))} |"
            )
        out.append("\n".join(lines))
    if "ping" in results:
        lines = [
            "### Round trips (ms)",
            "",
            "`peerup ping` (its own echo protocol), and a 32-byte request/answer "
            "on an established connection through each path.",
            "",
            "| case | p50 | min | avg |",
            "|---|---|---|---|",
        ]
        for name, row in results["ping"].items():
            if row.get("unavailable"):
                lines.append(f"| {name} | unavailable | | |")
                continue
            lines.append(
                f"| {name} | {cell(row.get('p50_ms'))} | {cell(row.get('min_ms'))} | {cell(row.get('avg_ms'))} |"
            )
        out.append("\n".join(lines))
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    fb = results.get("first_byte")
    if fb is None:
        return []
    out = []

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": met})

    cold = fb.get("cold-peerup-relayed", {}).get("p50_ms")
    add("cold first byte (relayed, DHT + circuit)", f"{cold} ms", "< 100 ms", cold is not None and cold < 100)
    warm = fb.get("warm-peerup-relayed", {}).get("p50_ms")
    add("warm first byte (relayed)", f"{warm} ms", "< 10 ms", warm is not None and warm < 10)
    warm_direct = fb.get("warm-peerup-direct", {}).get("p50_ms")
    add("warm first byte (direct)", f"{warm_direct} ms", "< 10 ms", warm_direct is not None and warm_direct < 10)
    return out
