"""peerup benchmarks: throughput, latency and scale, each next to its baseline.

    python -m benchmarks.run            # full run (< 15 min on 2 cores)
    python -m benchmarks.run --quick    # smoke run (< 2 min)

Starts, as separate processes on 127.0.0.1: a test service, a socat forwarder,
a ``peerup relay serve``, a ``peerup serve`` and ``peerup proxy`` processes
(relayed and direct), and the bare-libp2p baseline (``benchmarks/bare_libp2p.py``)
over the same paths. Prints tables, writes ``benchmarks/results/latest.json``
(``latest-quick.json`` with --quick) and, on a full run, ``docs/performance.md``
and ``docs/performance-throughput.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import PATTERN, Verifier  # noqa: E402

PY = sys.executable
PEERUP = [PY, "-m", "peerup"]
STATIC = [PY, "-m", "benchmarks.static_peer"]
BARE = [PY, "-m", "benchmarks.bare_libp2p"]
MB = 1_000_000
MiB = 1 << 20
LOOPBACK_ANY = "/ip4/127.0.0.1/tcp/0"

# -- processes ----------------------------------------------------------------------


class Proc:
    """A child process whose stdout/stderr lines are collected as they arrive."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[str] = []
        self.errors: list[str] = []
        self.popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
            start_new_session=True,
        )
        for stream, sink in ((self.popen.stdout, self.lines), (self.popen.stderr, self.errors)):
            threading.Thread(target=self._collect, args=(stream, sink), daemon=True).start()

    @staticmethod
    def _collect(stream: Any, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(self, pattern: str, timeout: float = 30.0, all_matches: bool = False) -> Any:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            found = [m for m in (regex.search(line) for line in list(self.lines)) if m]
            if found:
                return found if all_matches else found[0]
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        tail = "\n".join(self.errors[-8:])
        raise RuntimeError(f"{self.name} did not print /{pattern}/ (exit {self.popen.poll()}): {tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes (Linux /proc)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class RssMeter:
    """Peak VmRSS of some processes during a ``with`` block (sampled every 20 ms)."""

    def __init__(self, procs: dict[str, Proc]) -> None:
        self.procs = procs
        self.before: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.established: dict[str, int] = {}
        self._stop = threading.Event()

    def mark_established(self) -> None:
        """RSS now: all connections are up and idle, before any of them transfers."""
        self.established = {n: proc_status(p.pid).get("VmRSS", 0) for n, p in self.procs.items()}

    def __enter__(self) -> RssMeter:
        self.before = {n: proc_status(p.pid).get("VmRSS", 0) for n, p in self.procs.items()}
        self.peak = dict(self.before)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            for n, p in self.procs.items():
                self.peak[n] = max(self.peak[n], proc_status(p.pid).get("VmRSS", 0))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, connections: int) -> dict[str, Any]:
        out = {}
        for n in self.procs:
            grown = max(self.peak[n] - self.before[n], 0)
            held = max(self.established.get(n, 0) - self.before[n], 0) if self.established else None
            out[n] = {
                "rss_before_mib": round(self.before[n] / MiB, 1),
                "rss_peak_mib": round(self.peak[n] / MiB, 1),
                # peak during the phase, which includes every connection's 64 KiB in flight at once
                "per_connection_kib": round(grown / connections / 1024, 1) if connections else None,
                # with all connections established and idle (what holding a tunnel costs)
                "held_per_connection_kib": round(held / connections / 1024, 1)
                if connections and held is not None
                else None,
            }
        return out


# -- clients ------------------------------------------------------------------------


def bulk(port: int, size: int, timeout: float) -> dict[str, Any]:
    """One connection: ask for ``size`` pattern bytes, verify them all; MB/s from request to last byte."""
    verifier = Verifier()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        started = time.perf_counter()
        deadline = started + timeout
        sock.sendall(b"%d\n" % size)
        while got < size and time.perf_counter() < deadline:
            n = sock.recv_into(buf)
            if not n:
                break
            verifier.feed(view[:n])
            got += n
        elapsed = time.perf_counter() - started
    ok = got == size and verifier.ok
    return {
        "bytes": got,
        "seconds": round(elapsed, 3),
        "mb_per_s": round(got / MB / elapsed, 1) if ok else None,
        "verified": ok,
    }


def first_byte(port: int, timeout: float = 40.0) -> float:
    """Seconds from connect() to the first byte of a one-byte answer, on a new connection."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(b"1\n")
        if sock.recv(1) != PATTERN[:1]:
            raise RuntimeError("wrong first byte")
        return time.perf_counter() - started


def round_trips(port: int, count: int, size: int = 32) -> list[float]:
    """Request/response round trips of ``size`` bytes on one established connection (seconds)."""
    verifier = Verifier()
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.settimeout(30)
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


async def _concurrent(
    port: int, n: int, each: int, timeout: float, on_established: Callable[[], None] | None = None
) -> dict[str, Any]:
    """``n`` simultaneous connections: all established (1-byte answer), then each pulls ``each`` bytes."""
    gate = asyncio.Event()
    established = 0
    all_up = asyncio.Event()
    ttfb: list[float] = []
    failures: list[str] = []
    done_bytes = 0

    async def one(i: int) -> None:
        nonlocal established, done_bytes
        writer = None
        try:
            started = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            writer.write(b"1\n")
            first = await reader.readexactly(1)
            ttfb.append(time.perf_counter() - started)
            verifier = Verifier()
            verifier.feed(first)
            established += 1
            if established == n:
                all_up.set()
            await gate.wait()
            writer.write(b"%d\n" % each)
            got = 0
            while got < each:
                data = await reader.read(min(each - got, 1 << 20))
                if not data:
                    break
                verifier.feed(data)
                got += len(data)
            if got != each or not verifier.ok:
                failures.append(f"conn {i}: {got}/{each} bytes, verified={verifier.ok}")
            done_bytes += got
        except Exception as exc:  # noqa: BLE001 - counted as a failure
            failures.append(f"conn {i}: {type(exc).__name__}: {exc}")
            if established + len(failures) >= n:
                all_up.set()
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.wait_for(all_up.wait(), timeout)
    except TimeoutError:
        failures.append(f"only {established}/{n} established within {timeout:g} s")
    setup = time.perf_counter() - t0
    if on_established is not None:
        await asyncio.sleep(0.3)  # let the last stream's set-up garbage settle
        on_established()
    t1 = time.perf_counter()
    gate.set()
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
        failures.append("transfer did not finish in time")
    transfer = time.perf_counter() - t1
    await asyncio.gather(*pending, return_exceptions=True)
    ttfb.sort()
    return {
        "connections": n,
        "bytes_each": each,
        "failures": len(failures),
        "failure_examples": failures[:3],
        "established_s": round(setup, 3),
        "ttfb_p50_ms": round(ttfb[len(ttfb) // 2] * 1000, 1) if ttfb else None,
        "ttfb_p99_ms": round(ttfb[min(len(ttfb) - 1, int(len(ttfb) * 0.99))] * 1000, 1) if ttfb else None,
        "transfer_s": round(transfer, 3),
        "aggregate_mb_per_s": round(done_bytes / MB / transfer, 1) if transfer > 0 else None,
    }


def concurrent(
    port: int, n: int, each: int, timeout: float, on_established: Callable[[], None] | None = None
) -> dict[str, Any]:
    return asyncio.run(_concurrent(port, n, each, timeout, on_established))


# -- the setup ----------------------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path, quick: bool) -> None:
        self.tmp = tmp
        self.quick = quick
        self.procs: list[Proc] = []
        self.ids: dict[str, str] = {}
        self.notes: list[str] = []

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = Proc(name, argv)
        self.procs.append(proc)
        return proc

    def home(self, name: str) -> str:
        home = self.tmp / name
        if not home.exists():
            done = subprocess.run(
                [*PEERUP, "--home", str(home), "init"], check=True, capture_output=True, text=True, cwd=ROOT
            )
            self.ids[name] = done.stdout.split()[-1]
        return str(home)

    def authorize(self, server: str, clients: list[str]) -> None:
        """``peerup auth add`` each client's peer ID on the serving node (only authorized peers get through)."""
        for client in clients:
            self.home(client)
            subprocess.run(
                [*PEERUP, "--home", self.home(server), "auth", "add", self.ids[client], "--comment", client],
                check=True,
                capture_output=True,
                cwd=ROOT,
            )

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def setup(self) -> dict[str, Any]:
        ports: dict[str, Any] = {}
        svc = self.start("service", [PY, "-m", "benchmarks.service"])
        ports["raw"] = int(svc.wait_for(r"listening (\d+)").group(1))
        self.svc = svc
        socat = shutil.which("socat")
        if socat:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.start(
                "socat",
                [
                    socat,
                    f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                    f"TCP:127.0.0.1:{ports['raw']}",
                ],
            )
            _wait_port(port)
            ports["socat"] = port
        else:
            ports["socat"] = None
            self.notes.append("socat not installed: the socat baseline is unavailable")
        target = f"127.0.0.1:{ports['raw']}"

        # The benchmark's 1000 simultaneous tunnels come from one peer: lift the
        # per-peer stream cap (auth.max_streams_per_peer, default 256) on the serving node.
        # Everything is on 127.0.0.1, where every node is reachable directly: the
        # relayed rows keep the serving node from advertising a confirmed address
        # and from hole punching, so "relayed" stays relayed (the direct rows dial
        # its address explicitly; benchmarks/nat.py measures the upgrade itself).
        (Path(self.home("serve")) / "config.toml").write_text(
            "[auth]\nmax_streams_per_peer = 4096\n\n[nat]\nhole_punching = false\naddress_discovery = false\n"
        )
        self.authorize("serve", ["proxy", "proxy-direct", "cold", "cold-direct", "ping", "ping-direct"])
        relay = self.start("relay", [*PEERUP, "--home", self.home("relay"), "relay", "serve", "--listen", LOOPBACK_ANY])
        self.relay = relay
        self.relay_addr = relay.wait_for(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\S+)").group(1)
        serve = self.start(
            "serve",
            [
                *PEERUP,
                "--home",
                self.home("serve"),
                "serve",
                "--service",
                f"bench={target}",
                "--relay",
                self.relay_addr,
                "--listen",
                LOOPBACK_ANY,
            ],
        )
        self.serve = serve
        self.peer = serve.wait_for(r"^peer (\S+)").group(1)
        serve.wait_for(r"reachable at (\S+p2p-circuit\S+)")
        self.direct_addr = serve.wait_for(r"reachable at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^/\s]+)$").group(1)

        self.proxy_relayed = self.start(
            "proxy-relayed",
            [
                *PEERUP,
                "--home",
                self.home("proxy"),
                "proxy",
                self.peer,
                "bench",
                "0",
                "--relay",
                self.relay_addr,
                "--listen",
                LOOPBACK_ANY,
            ],
        )
        self.proxy_direct = self.start(
            "proxy-direct",
            [
                *STATIC,
                self.direct_addr,
                "--",
                "--home",
                self.home("proxy-direct"),
                "proxy",
                self.peer,
                "bench",
                "0",
                "--listen",
                LOOPBACK_ANY,
            ],
        )
        ports["peerup-relayed"] = self._forwarding(self.proxy_relayed)
        ports["peerup-direct"] = self._forwarding(self.proxy_direct)

        bare_serve = self.start(
            "bare-serve",
            [*BARE, "serve", "--home", self.home("bare-serve"), "--target", target, "--relay", self.relay_addr],
        )
        self.bare_serve = bare_serve
        bare_peer = bare_serve.wait_for(r"^peer (\S+)").group(1)
        bare_circuit = f"{self.relay_addr}/p2p-circuit/p2p/{bare_peer}"
        bare_direct = bare_serve.wait_for(r"reachable at (/ip4/127\.0\.0\.1/tcp/\d+/p2p/[^/\s]+)$").group(1)
        self.bare_relayed = self.start(
            "bare-proxy-relayed",
            [
                *BARE,
                "proxy",
                "--home",
                self.home("bare-proxy"),
                "--relay",
                self.relay_addr,
                "--peer-addr",
                bare_circuit,
            ],
        )
        self.bare_direct = self.start(
            "bare-proxy-direct", [*BARE, "proxy", "--home", self.home("bare-proxy-direct"), "--peer-addr", bare_direct]
        )
        ports["bare-libp2p-relayed"] = self._forwarding(self.bare_relayed)
        ports["bare-libp2p-direct"] = self._forwarding(self.bare_direct)
        self.ports = ports
        return ports

    @staticmethod
    def _forwarding(proc: Proc) -> int:
        return int(proc.wait_for(r"forwarding 127\.0\.0\.1:(\d+)").group(1))

    def path_of(self, proc: Proc) -> str:
        return proc.name


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# -- measurements -------------------------------------------------------------------

PATHS = ["raw", "socat", "bare-libp2p-direct", "peerup-direct", "bare-libp2p-relayed", "peerup-relayed"]


def measure_bulk(bench: Bench, size: int, paths: list[str] = PATHS, repeat: int = 1) -> dict[str, Any]:
    """One transfer per path, or ``repeat`` rounds over all paths (interleaved) reported as the median."""
    runs: dict[str, list[dict[str, Any]]] = {path: [] for path in paths}
    for _ in range(repeat):
        for path in paths:
            port = bench.ports.get(path)
            if port is None:
                continue
            with contextlib.suppress(Exception):
                bulk(port, 1 * MiB, 30)  # warm the connection and the windows
            try:
                runs[path].append(bulk(port, size, timeout=240))
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                runs[path].append({"error": f"{type(exc).__name__}: {exc}", "verified": False, "mb_per_s": None})
    out: dict[str, Any] = {}
    for path in paths:
        if bench.ports.get(path) is None:
            out[path] = {"unavailable": True}
            continue
        rows = runs[path]
        good = sorted((r for r in rows if r.get("mb_per_s")), key=lambda r: r["mb_per_s"])
        row = dict(good[len(good) // 2]) if good else dict(rows[-1])
        row["verified"] = all(r.get("verified") for r in rows)
        if len(rows) > 1:
            row["samples_mb_per_s"] = [r.get("mb_per_s") for r in rows]
        out[path] = row
        log(
            f"  bulk {size // MiB} MiB {path}: {row.get('mb_per_s')} MB/s (of {row.get('samples_mb_per_s')}) "
            f"verified={row.get('verified')}"
        )
    return out


def measure_ping(bench: Bench, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, argv in (
        ("peerup-direct", [*STATIC, bench.direct_addr, "--", "--home", bench.home("ping-direct"), "ping", bench.peer]),
        ("peerup-relayed", [*PEERUP, "--home", bench.home("ping"), "ping", bench.peer, "--relay", bench.relay_addr]),
    ):
        argv = [*argv, "-c", str(count), "--interval", "0.02", "--listen", LOOPBACK_ANY]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
            match = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms", done.stdout)
            path = re.search(r"via (\w+) path", done.stdout)
            if not match:
                raise RuntimeError((done.stdout + done.stderr).strip()[-300:])
            times = [float(t) for t in re.findall(r"time=([\d.]+) ms", done.stdout)]
            out[name] = {
                "min_ms": float(match.group(1)),
                "avg_ms": float(match.group(2)),
                "p50_ms": round(statistics.median(times), 3) if times else None,
                "max_ms": float(match.group(3)),
                "path": path.group(1) if path else None,
                "count": count,
            }
        except Exception as exc:  # noqa: BLE001
            out[name] = {"error": str(exc)}
        log(f"  ping {name}: {out[name]}")
    # Baselines: the same 32-byte request/answer on one established TCP connection.
    for path in PATHS:
        port = bench.ports.get(path)
        if port is None:
            out[f"rtt32-{path}"] = {"unavailable": True}
            continue
        try:
            rtts = round_trips(port, count)
            ms = sorted(r * 1000 for r in rtts)
            out[f"rtt32-{path}"] = {
                "p50_ms": round(statistics.median(ms), 3),
                "min_ms": round(ms[0], 3),
                "avg_ms": round(statistics.fmean(ms), 3),
                "count": count,
            }
        except Exception as exc:  # noqa: BLE001
            out[f"rtt32-{path}"] = {"error": str(exc)}
    return out


def measure_first_byte(bench: Bench, cold_samples: int, warm_samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # Warm: a new TCP connection on a proxy that already holds the libp2p connection.
    for path in PATHS:
        port = bench.ports.get(path)
        if port is None:
            out[f"warm-{path}"] = {"unavailable": True}
            continue
        try:
            first_byte(port)
            samples = sorted(first_byte(port) * 1000 for _ in range(warm_samples))
            out[f"warm-{path}"] = {
                "p50_ms": round(statistics.median(samples), 2),
                "min_ms": round(samples[0], 2),
                "max_ms": round(samples[-1], 2),
                "samples": warm_samples,
            }
        except Exception as exc:  # noqa: BLE001
            out[f"warm-{path}"] = {"error": str(exc)}
    # Cold: a fresh proxy process each time; first connection = lookup + dial (+ circuit) + stream.
    for name, make in (
        (
            "cold-peerup-relayed",
            lambda i: [
                *PEERUP,
                "--home",
                bench.home("cold"),
                "proxy",
                bench.peer,
                "bench",
                "0",
                "--relay",
                bench.relay_addr,
                "--listen",
                LOOPBACK_ANY,
            ],
        ),
        (
            "cold-peerup-direct",
            lambda i: [
                *STATIC,
                bench.direct_addr,
                "--",
                "--home",
                bench.home("cold-direct"),
                "proxy",
                bench.peer,
                "bench",
                "0",
                "--listen",
                LOOPBACK_ANY,
            ],
        ),
    ):
        samples = []
        errors = []
        for i in range(cold_samples):
            proc = Proc(name, make(i))
            try:
                port = Bench._forwarding(proc)
                time.sleep(0.3)  # let the relay reservation settle: we time the tunnel, not process start-up
                samples.append(first_byte(port) * 1000)
            except Exception as exc:  # noqa: BLE001
                errors.append(str(exc)[:200])
            finally:
                proc.stop()
        samples.sort()
        out[name] = {
            "p50_ms": round(statistics.median(samples), 2) if samples else None,
            "min_ms": round(samples[0], 2) if samples else None,
            "max_ms": round(samples[-1], 2) if samples else None,
            "samples": len(samples),
            "errors": errors,
        }
        log(f"  first byte {name}: {out[name]}")
    return out


def measure_concurrency(bench: Bench, counts: list[int], each: int, paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    watched = {
        "peerup-relayed": {"relay": bench.relay, "serve": bench.serve, "proxy": bench.proxy_relayed},
        "bare-libp2p-relayed": {"relay": bench.relay, "serve": bench.bare_serve, "proxy": bench.bare_relayed},
        "peerup-direct": {"serve": bench.serve, "proxy": bench.proxy_direct},
        "raw": {"service": bench.svc},
    }
    for path in paths:
        port = bench.ports.get(path)
        rows = []
        for n in counts:
            if port is None:
                rows.append({"connections": n, "unavailable": True})
                continue
            timeout = 60 + n * 0.15
            with RssMeter(watched.get(path, {})) as meter:
                try:
                    row = concurrent(port, n, each, timeout, meter.mark_established)
                except Exception as exc:  # noqa: BLE001
                    row = {"connections": n, "failures": n, "error": f"{type(exc).__name__}: {exc}"}
            row["memory"] = meter.report(n)
            rows.append(row)
            mem = {k: (v["held_per_connection_kib"], v["per_connection_kib"]) for k, v in row["memory"].items()}
            log(
                f"  {n:>5} x {each // 1024} KiB {path}: failures={row.get('failures')} "
                f"agg={row.get('aggregate_mb_per_s')} MB/s ttfb p50={row.get('ttfb_p50_ms')} ms "
                f"up in {row.get('established_s')} s, KiB/conn (held, peak) {mem}"
            )
            time.sleep(0.5)
        out[path] = rows
    return out


def measure_memory(tmp: Path, quick: bool, n: int, each: int) -> dict[str, Any]:
    """``n`` tunnels through freshly started processes, so no earlier phase's heap hides the growth.

    In the concurrency section each phase's RSS growth is counted from the RSS at
    its start, which already holds what earlier phases (bulk transfers, smaller N)
    left in the Python heap for reuse; the larger N rows understate. Here nothing
    ran before: the figure is what N tunnels cost.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    bench = Bench(tmp, quick)
    out: dict[str, Any] = {}
    try:
        bench.setup()
        watched = {
            "peerup-relayed": {"relay": bench.relay, "serve": bench.serve, "proxy": bench.proxy_relayed},
            "bare-libp2p-relayed": {"relay": bench.relay, "serve": bench.bare_serve, "proxy": bench.bare_relayed},
        }
        for path, procs in watched.items():
            # One tunnel first, so the proxy holds its libp2p connection: N tunnels
            # opened at once on a proxy with no connection yet each start their own
            # discovery and dial (seen: 1000 at once never came up; see performance.md).
            first_byte(bench.ports[path])
            time.sleep(0.5)
            with RssMeter(procs) as meter:
                try:
                    row = concurrent(bench.ports[path], n, each, 60 + n * 0.15, meter.mark_established)
                except Exception as exc:  # noqa: BLE001
                    row = {"connections": n, "failures": n, "error": f"{type(exc).__name__}: {exc}"}
            row["memory"] = meter.report(n)
            out[path] = row
            mem = {k: (v["held_per_connection_kib"], v["per_connection_kib"]) for k, v in row["memory"].items()}
            log(f"  {n} x {each // 1024} KiB {path}, fresh: failures={row.get('failures')} KiB/conn (held, peak) {mem}")
            time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        bench.stop_all()
    return out


def log(text: str) -> None:
    print(text, flush=True)


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as fh:
        mem = int(fh.readline().split()[1]) * 1024
    from importlib.metadata import version

    import libp2p  # noqa: F401

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "libp2p": version("libp2p"),
        "trio": version("trio"),
        "socat": _socat_version(),
        "loadavg_at_start": os.getloadavg(),
        "nproc": _command(["nproc"]),
        "lscpu_head": _command(["lscpu"]).splitlines()[:10],
        "git": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip(),
    }


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def _socat_version() -> str | None:
    socat = shutil.which("socat")
    if not socat:
        return None
    done = subprocess.run([socat, "-V"], capture_output=True, text=True, check=False)
    match = re.search(r"socat version (\S+)", done.stdout)
    return match.group(1) if match else "unknown"


# -- targets and reports -------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    bulk_main = results["bulk"]
    out = []

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": met})

    def mbps(path: str) -> float | None:
        return bulk_main.get(path, {}).get("mb_per_s")

    for path, goal in (("peerup-relayed", 100), ("peerup-direct", 250)):
        v = mbps(path)
        add(f"{path} throughput", f"{v} MB/s", f">= {goal} MB/s", v is not None and v >= goal)
    for kind in ("relayed", "direct"):
        v, b = mbps(f"peerup-{kind}"), mbps(f"bare-libp2p-{kind}")
        if v and b:
            cost = round(100 * (1 - v / b), 1)
            add(f"peerup layers cost vs bare libp2p ({kind})", f"{cost}% ({v} vs {b} MB/s)", "<= 10%", cost <= 10)
        else:
            add(f"peerup layers cost vs bare libp2p ({kind})", None, "<= 10%", None)
    fb = results["first_byte"]
    cold = fb.get("cold-peerup-relayed", {}).get("p50_ms")
    add("cold first byte (relayed, DHT + circuit)", f"{cold} ms", "< 100 ms", cold is not None and cold < 100)
    warm = fb.get("warm-peerup-relayed", {}).get("p50_ms")
    add("warm first byte (relayed)", f"{warm} ms", "< 10 ms", warm is not None and warm < 10)
    warm_direct = fb.get("warm-peerup-direct", {}).get("p50_ms")
    add("warm first byte (direct)", f"{warm_direct} ms", "< 10 ms", warm_direct is not None and warm_direct < 10)
    rows = [r for r in results["concurrency"].get("peerup-relayed", []) if not r.get("unavailable")]
    largest = max((r["connections"] for r in rows), default=0)
    for row in rows:
        if row["connections"] >= min(500, largest):
            add(
                f"{row['connections']} concurrent relayed tunnels: failures",
                row.get("failures"),
                "0",
                row.get("failures") == 0,
            )
    fresh = results.get("memory", {}).get("peerup-relayed")
    if fresh and fresh.get("memory"):
        n = fresh["connections"]
        memory = fresh["memory"]
        held = max((m.get("held_per_connection_kib") or 0) for m in memory.values())
        peak = max((m.get("per_connection_kib") or 0) for m in memory.values())
        each = results["config"]["concurrency_bytes_each"] // 1024
        add(f"{n} relayed tunnels, fresh processes: failures", fresh.get("failures"), "0", fresh.get("failures") == 0)
        add(
            f"{n} relayed tunnels, fresh processes: KiB per connection held, all up and idle (worst process)",
            held,
            "< 64 KiB",
            held < 64,
        )
        add(
            f"{n} relayed tunnels, fresh processes: KiB per connection at peak, all pulling {each} KiB at once "
            "(worst process)",
            peak,
            "< 64 KiB",
            peak < 64,
        )
    return out


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def render_summary(results: dict[str, Any]) -> str:
    """The headline figures next to their baselines, as ratios."""
    bulk_rows = results["bulk"]
    fb = results["first_byte"]

    def mbps(path: str) -> float | None:
        return bulk_rows.get(path, {}).get("mb_per_s")

    def warm(path: str) -> float | None:
        return fb.get(f"warm-{path}", {}).get("p50_ms")

    raw, socat = mbps("raw"), mbps("socat")
    size = results["config"]["bulk_mib"]
    lines = [
        f"### Side by side: bulk throughput ({size} MiB, one connection) and warm first byte (p50)",
        "",
        "| path | MB/s | vs raw TCP | vs socat | vs bare libp2p, same path | warm first byte ms | vs bare libp2p |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        bare = f"bare-libp2p-{path.split('-', 1)[1]}" if path.startswith("peerup-") else None
        lines.append(
            f"| {path} | {_cell(mbps(path))} | {_ratio(mbps(path), raw)} | {_ratio(mbps(path), socat)} | "
            f"{_ratio(mbps(path), mbps(bare)) if bare else '-'} | {_cell(warm(path))} | "
            f"{_ratio(warm(path), warm(bare)) if bare else '-'} |"
        )
    conc = results["concurrency"]
    counts = sorted({r["connections"] for rows in conc.values() for r in rows})
    lines += [
        "",
        "Aggregate MB/s with N simultaneous connections (failures in brackets when not 0):",
        "",
        "| path | " + " | ".join(f"N={n}" for n in counts) + " |",
        "|---|" + "---|" * len(counts),
    ]
    for path, rows in conc.items():
        by_n = {r["connections"]: r for r in rows}
        cells = []
        for n in counts:
            r = by_n.get(n, {})
            cell = _cell(r.get("aggregate_mb_per_s")) if not r.get("unavailable") else "unavailable"
            if r.get("failures"):
                cell += f" ({r['failures']} failed)"
            cells.append(cell)
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tables(results: dict[str, Any]) -> str:
    lines: list[str] = [render_summary(results), ""]
    size = results["config"]["bulk_mib"]
    lines += [
        f"### Bulk throughput, one connection, {size} MiB, every byte verified",
        "",
        "| path | MB/s (median) | all runs, MB/s | seconds | verified |",
        "|---|---|---|---|---|",
    ]
    for path, row in results["bulk"].items():
        if row.get("unavailable"):
            lines.append(f"| {path} | unavailable | - | - | - |")
        else:
            runs = ", ".join(_cell(v) for v in row.get("samples_mb_per_s", [row.get("mb_per_s")]))
            lines.append(
                f"| {path} | {_cell(row.get('mb_per_s'))} | {runs} | {_cell(row.get('seconds'))} | "
                f"{_cell(row.get('verified'))} |"
            )
    lines += ["", "### Throughput as the size grows (MB/s)", ""]
    sizes = sorted({int(s) for s in results["bulk_by_size"]})
    paths = list(next(iter(results["bulk_by_size"].values()), {}).keys())
    lines += ["| path | " + " | ".join(f"{s} MiB" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for path in paths:
        cells = [_cell(results["bulk_by_size"][str(s)][path].get("mb_per_s")) for s in sizes]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    fb = results["first_byte"]
    lines += [
        "",
        "### Time to first byte of a new connection (ms)",
        "",
        "| case | p50 | min | max | samples |",
        "|---|---|---|---|---|",
    ]
    for name, row in fb.items():
        if row.get("unavailable"):
            lines.append(f"| {name} | unavailable | | | |")
            continue
        lines.append(
            f"| {name} | {_cell(row.get('p50_ms'))} | {_cell(row.get('min_ms'))} | "
            f"{_cell(row.get('max_ms'))} | {_cell(row.get('samples'))} |"
        )
    lines += [
        "",
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
            f"| {name} | {_cell(row.get('p50_ms'))} | {_cell(row.get('min_ms'))} | {_cell(row.get('avg_ms'))} |"
        )
    conc = results["concurrency"]
    each = results["config"]["concurrency_bytes_each"]
    lines += [
        "",
        f"### Concurrency: N simultaneous connections, each pulls {each // 1024} KiB (verified)",
        "",
        "| path | N | failures | all up (s) | first byte p50 / p99 (ms) | transfer (s) | aggregate MB/s | "
        "per process: peak RSS MiB / KiB per conn held (all up, idle) / KiB per conn at peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, rows in conc.items():
        for row in rows:
            if row.get("unavailable"):
                lines.append(f"| {path} | {row['connections']} | unavailable | | | | | |")
                continue
            mem = ", ".join(
                f"{k} {v['rss_peak_mib']} MiB / {_cell(v.get('held_per_connection_kib'))} / "
                f"{_cell(v['per_connection_kib'])} KiB"
                for k, v in row.get("memory", {}).items()
            )
            lines.append(
                f"| {path} | {row['connections']} | {_cell(row.get('failures'))} | {_cell(row.get('established_s'))} | "
                f"{_cell(row.get('ttfb_p50_ms'))} / {_cell(row.get('ttfb_p99_ms'))} | {_cell(row.get('transfer_s'))} | "
                f"{_cell(row.get('aggregate_mb_per_s'))} | {mem} |"
            )
    fresh = results.get("memory") or {}
    if fresh:
        lines += [
            "",
            "### Memory per connection, fresh processes",
            "",
            "The concurrency rows above count each phase's RSS growth from its start, when the Python heap "
            "already holds what earlier phases freed, so their larger N understate. Here the processes are "
            "started anew and nothing runs before the N tunnels.",
            "",
            "| path | N | failures | per process: peak RSS MiB / KiB per conn held (all up, idle) / KiB per "
            "conn at peak |",
            "|---|---|---|---|",
        ]
        for path, row in fresh.items():
            if not isinstance(row, dict):
                lines.append(f"| {path} | - | error: {row} | |")
                continue
            mem = ", ".join(
                f"{k} {v['rss_peak_mib']} MiB / {_cell(v.get('held_per_connection_kib'))} / "
                f"{_cell(v['per_connection_kib'])} KiB"
                for k, v in row.get("memory", {}).items()
            )
            lines.append(f"| {path} | {row.get('connections')} | {_cell(row.get('failures'))} | {mem} |")
    lines += ["", "### Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_cell(t['measured'])} | {t['goal']} | {met} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], png: Path) -> str:
    """Aggregate throughput against connection count: a PNG if matplotlib is there, else ASCII."""
    series = {}
    for path, rows in results["concurrency"].items():
        pts = [(r["connections"], r.get("aggregate_mb_per_s")) for r in rows if r.get("aggregate_mb_per_s")]
        if pts:
            series[path] = pts
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        lines = ["```", "aggregate MB/s against simultaneous connections (log scale not applied)"]
        peak = max((v for pts in series.values() for _, v in pts), default=1)
        for path, pts in series.items():
            for n, v in pts:
                lines.append(f"{path:>22} {n:>5} | {'#' * max(1, int(50 * v / peak))} {v}")
        lines.append("```")
        return "\n".join(lines)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for path, pts in series.items():
        ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=path)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("simultaneous connections")
    ax.set_ylabel("aggregate MB/s (all bytes verified)")
    ax.set_title("Throughput against connection count (127.0.0.1, 2 cores)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return f"![throughput against connection count]({png.name})"


def _loadavg(value: Any) -> str:
    return ", ".join(f"{v:.2f}" for v in value) if value else "-"


def write_docs(results: dict[str, Any], tables: str) -> None:
    docs = ROOT / "docs"
    picture = plot(results, docs / "performance-throughput.png")
    m = results["machine"]
    text = f"""# Performance

Latest results of `{results["command"]}` ({results["finished"]}, {results["duration_s"]:.0f} s),
on {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB, Linux {m["kernel"]}, Python {m["python"]},
libp2p {m["libp2p"]}, trio {m["trio"]}, socat {m["socat"] or "unavailable"}, peerup at {m["git"]}
(plus the working tree). Raw numbers: `benchmarks/results/latest.json`; how the
benchmark works: `benchmarks/README.md`.

Everything runs on 127.0.0.1 as separate processes: a Python asyncio test
service, `socat`, `peerup relay serve`, `peerup serve`, `peerup proxy` (relayed,
and direct through a static-address discovery plugin), and the bare-libp2p
baseline (`benchmarks/bare_libp2p.py`: the same libp2p hosts and path with a raw
stream handler instead of peerup's layers). The client is the benchmark process.
MB = 10^6 bytes. On 2 cores the client, the service and every peerup process
compete for the same CPUs, so these are end-to-end figures for one machine, not
for a network.

Machine: `nproc` = {m.get("nproc") or m["cores"]}; `lscpu | head`:

```
{chr(10).join(m.get("lscpu_head") or ["(lscpu unavailable)"])}
```

Load average (1, 5, 15 min) at the start {_loadavg(m.get("loadavg_at_start"))}, at the end
{_loadavg(m.get("loadavg_at_end"))}.

{picture}

{tables}
"""
    notes_file = ROOT / "benchmarks" / "performance-notes.md"
    if notes_file.exists():
        text += "\n" + notes_file.read_text()
    ab_file = ROOT / "benchmarks" / "results" / "ab.json"
    if ab_file.exists():
        from benchmarks.ab import render as render_ab

        text += (
            "\n### Before/after, same run (`python -m benchmarks.ab`)\n\n"
            "Each column starts every process with `PEERUP_FASTPATH_SKIP` naming the fast-path "
            "patches to leave out (see `peerup/plugins/libp2p/fastpath.py`); the variants alternate "
            "round by round.\n\n" + render_ab(json.loads(ab_file.read_text())) + "\n"
        )
    text += _measured_elsewhere()
    notes = results.get("notes") or []
    if notes:
        text += "\n### Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (docs / "performance.md").write_text(text)


def _measured_elsewhere() -> str:
    """The NAT, small-message and churn sections, from the results their own commands wrote."""
    text = ""
    nat_file = ROOT / "benchmarks" / "results" / "nat.json"
    if nat_file.exists():
        from benchmarks.nat import table as nat_table

        nat = json.loads(nat_file.read_text())
        text += (
            f"\n### Direct paths across NAT (`python -m benchmarks.nat`, {nat['when']})\n\n"
            "Real Linux NAT routers in network namespaces (peerup/netlab.py), the real CLI in them "
            "(peerup/natworld.py). Per pair: direct paths out of fresh tries (a new identity and `peerup proxy` "
            "each), seconds from the first tunnel to the first direct one, tunnels that failed (relayed or not), "
            "and one 64 MiB echo (MB both ways per second) relayed, then direct, in the same topology. "
            "Targets: cone/cone 20 of 20 with the median under 2 s; no failed tunnel anywhere.\n\n"
            + nat_table(nat["rows"])
            + "\n"
        )
    rpc_file = ROOT / "benchmarks" / "results" / "rpc.json"
    if rpc_file.exists():
        from benchmarks.rpc import table as rpc_table

        rpc = json.loads(rpc_file.read_text())
        text += (
            f"\n### Many small messages (`{rpc['command']}`, {rpc['when']})\n\n"
            "64-byte request/response, each answer verified, 1 client or 20 at once on their own connections; "
            "medians of alternating rounds, peerup as shipped and with `PEERUP_PATCHES_OFF=yamux-group-commit` "
            "started afresh in the same run. Targets (issue #16): 20 clients >= 5,000 req/s relayed and "
            ">= 10,000 direct.\n\n" + rpc_table(rpc) + "\n"
        )
    churn_file = ROOT / "benchmarks" / "results" / "churn.json"
    if churn_file.exists():
        from benchmarks.churn import summary as churn_summary

        text += (
            "\n### Connection churn (`python -m benchmarks.churn`)\n\n"
            + churn_summary(json.loads(churn_file.read_text()))
            + "\n"
        )
    return text


# -- main ---------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts: under 2 minutes")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    args = parser.parse_args()
    os.environ.pop("PEERUP_HOME", None)
    quick = args.quick
    cfg = {
        "bulk_mib": 32 if quick else 256,
        "bulk_repeat": 1 if quick else 3,
        "sizes_mib": [1, 8] if quick else [1, 16, 64],
        "counts": [10, 100] if quick else [1, 10, 100, 500, 1000],
        "concurrency_bytes_each": 16 * 1024 if quick else 64 * 1024,
        "cold_samples": 2 if quick else 5,
        "warm_samples": 10 if quick else 30,
        "ping_count": 10 if quick else 50,
    }
    started = time.time()
    results: dict[str, Any] = {"command": "python -m benchmarks.run" + (" --quick" if quick else ""), "config": cfg}
    results["machine"] = machine()
    with tempfile.TemporaryDirectory(prefix="peerup-bench-") as tmp:
        bench = Bench(Path(tmp), quick)
        try:
            log("starting service, socat, relay, serving nodes and proxies ...")
            bench.setup()
            log(f"ports: {bench.ports}")
            log("bulk throughput")
            results["bulk"] = measure_bulk(bench, cfg["bulk_mib"] * MiB, repeat=cfg["bulk_repeat"])
            results["bulk_by_size"] = {}
            for s in cfg["sizes_mib"]:
                results["bulk_by_size"][str(s)] = measure_bulk(bench, s * MiB)
            results["bulk_by_size"][str(cfg["bulk_mib"])] = results["bulk"]
            log("first byte")
            results["first_byte"] = measure_first_byte(bench, cfg["cold_samples"], cfg["warm_samples"])
            log("round trips")
            results["ping"] = measure_ping(bench, cfg["ping_count"])
            log("concurrency")
            results["concurrency"] = measure_concurrency(
                bench,
                cfg["counts"],
                cfg["concurrency_bytes_each"],
                ["raw", "socat", "bare-libp2p-relayed", "peerup-relayed"],
            )
        finally:
            bench.stop_all()
        results["notes"] = bench.notes
        log("memory, fresh processes")
        results["memory"] = measure_memory(
            Path(tmp) / "fresh", quick, max(cfg["counts"]), cfg["concurrency_bytes_each"]
        )
    results["targets"] = targets(results)
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["duration_s"] = round(time.time() - started, 1)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / ("latest-quick.json" if quick else "latest.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    tables = render_tables(results)
    print("\n" + tables)
    print(f"\nJSON: {out.relative_to(ROOT)}  ({results['duration_s']:.0f} s)")
    if not quick and not args.no_docs:
        write_docs(results, tables)
        print("docs: docs/performance.md, docs/performance-throughput.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
