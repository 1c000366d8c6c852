"""Many small messages (issue #16): Redis GETs, 64-byte round trips and new tunnels, on every path.

    python -m benchmarks.run --only small [--quick] [--variant NAME=PATCHES_OFF ...] [--rounds R]

Why its own processes: a relay, serving node and proxies started for this
section only (the serving node exposes ``bench`` and ``redis``; each has its
own proxies), so the CPU each process spends per request is this workload's
alone. Per path (raw, socat, bare libp2p and peerup, direct and relayed):

- ``redis-benchmark -t get -c C -P P`` for every C and P of the config, each
  run sized from a short warm-up to last ``small_seconds``;
- 64-byte request/response on ``benchmarks/service.py``, 1 and 20 clients;
- tunnels opened per second: connect + one request + close, ``tunnels_at_once`` at a time;

and for each, the CPU seconds of every process on the path (/proc/PID/stat
utime + stime across the measurement). ``--variant`` starts the libp2p paths
again with ``PEERUP_PATCHES_OFF`` set, rounds alternating, so a patch is
compared with it switched off in one run on the same machine state (what
``benchmarks.rpc`` did for group commit).
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.context import Config, Context
from benchmarks.runner import CpuMeter, log
from benchmarks.small_clients import REDIS_BENCHMARK, echo_rate, open_tunnels, redis_benchmark
from benchmarks.small_report import tables as tables  # the section's tables, with issue #16's targets
from benchmarks.topology import ALL_PATHS, LIBP2P_PATHS, Bench

REFERENCE = "shipped"


def case_name(clients: int, pipeline: int) -> str:
    return f"c{clients}-P{pipeline}"


def _measured(what: Callable[[], dict[str, Any]], meter: CpuMeter, per: str, key: str, scale: float) -> dict[str, Any]:
    """Run ``what`` under ``meter``; add each process's CPU per ``scale`` of the row's ``per`` as ``key``."""
    try:
        with meter:
            row = what()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the run goes on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    row[key] = meter.per(row[per], scale)
    return row


PER_10K = ("requests", "cpu_s_per_10k", 10_000)  # CPU seconds per 10,000 requests
PER_TUNNEL = ("ok", "cpu_ms_per_tunnel", 1000)  # CPU milliseconds per tunnel that worked


def redis_case(bench: Bench, path: str, clients: int, pipeline: int, cfg: Config) -> dict[str, Any]:
    """One redis-benchmark case, its size chosen from a warm-up so that it lasts about ``small_seconds``."""
    port = bench.redis_ports.get(path)
    if port is None:
        return {"unavailable": True}
    try:
        warm = redis_benchmark(port, clients, pipeline, max(200, 2 * clients * pipeline), timeout=60)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"warm-up: {type(exc).__name__}: {exc}"[:300]}
    floor = max(cfg.small_min_requests, 4 * clients * pipeline)
    n = int(min(max(warm["rps"] * cfg.small_seconds, floor), cfg.small_max_requests))
    meter = CpuMeter(bench.roles(path, "redis"))
    return _measured(lambda: redis_benchmark(port, clients, pipeline, n), meter, *PER_10K)


def echo_case(bench: Bench, path: str, clients: int, cfg: Config) -> dict[str, Any]:
    port = bench.ports.get(path)
    if port is None:
        return {"unavailable": True}
    each = cfg.echo_each if clients > 1 else cfg.echo_each * 4
    with contextlib.suppress(Exception):
        echo_rate(port, 1, 20, timeout=60)  # warm: the connection, discovery
    return _measured(lambda: echo_rate(port, clients, each), CpuMeter(bench.roles(path)), *PER_10K)


def tunnels_case(bench: Bench, path: str, cfg: Config) -> dict[str, Any]:
    port = bench.ports.get(path)
    if port is None:
        return {"unavailable": True}
    with contextlib.suppress(Exception):
        open_tunnels(port, 5, 1)  # the proxy holds its libp2p connection before the clock starts
    meter = CpuMeter(bench.roles(path))
    return _measured(lambda: open_tunnels(port, cfg.tunnels, cfg.tunnels_at_once), meter, *PER_TUNNEL)


def measure(bench: Bench, cfg: Config, paths: list[str], label: str = "") -> dict[str, Any]:
    """Every case on every path, interleaved by case so that load from elsewhere hits all paths alike."""
    out: dict[str, Any] = {"redis": {p: {} for p in paths}, "echo": {p: {} for p in paths}, "tunnels": {}}
    if bench.redis_ports:
        for clients in cfg.small_clients:
            for pipeline in cfg.small_pipelines:
                for path in paths:
                    row = redis_case(bench, path, clients, pipeline, cfg)
                    out["redis"][path][case_name(clients, pipeline)] = row
                    log(f"  {label}redis GET c={clients} P={pipeline} {path}: {_brief(row)}")
    for clients in cfg.echo_clients:
        for path in paths:
            row = echo_case(bench, path, clients, cfg)
            out["echo"][path][str(clients)] = row
            log(f"  {label}echo 64 B x{clients} {path}: {_brief(row)}")
    for path in paths:
        row = tunnels_case(bench, path, cfg)
        out["tunnels"][path] = row
        log(f"  {label}tunnels {cfg.tunnels} ({cfg.tunnels_at_once} at once) {path}: {_brief(row)}")
    return out


def _brief(row: dict[str, Any]) -> str:
    if "error" in row or row.get("unavailable"):
        return str(row.get("error", "unavailable"))
    if "tunnels_per_s" in row:
        return f"{row['tunnels_per_s']:.0f}/s, {row['failures']} failed, CPU ms/tunnel {row.get('cpu_ms_per_tunnel')}"
    return (
        f"{row['rps']:.0f} req/s p50 {row['p50_ms']:.2f} p99 {row['p99_ms']:.2f} ms, CPU s/10k {row['cpu_s_per_10k']}"
    )


def _median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of each figure (and of each process's CPU); errors only if no round worked."""
    good = [r for r in rows if "error" not in r and not r.get("unavailable")]
    if not good:
        return rows[-1]
    out: dict[str, Any] = {}
    for key, value in good[0].items():
        if isinstance(value, bool) or key == "failure_examples":
            out[key] = value
        elif isinstance(value, int | float):
            out[key] = statistics.median(r[key] for r in good if r.get(key) is not None)
        elif isinstance(value, dict):
            out[key] = {k: statistics.median(r[key][k] for r in good if r[key].get(k) is not None) for k in value}
        else:
            out[key] = value
    if len(rows) > 1:
        main = "tunnels_per_s" if "tunnels_per_s" in good[0] else "rps"
        out["rounds"] = [r.get(main) for r in rows]
    return out


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several rounds of :func:`measure` (same shape, medians)."""
    if len(runs) == 1:
        return runs[0]
    first = runs[0]
    return {
        "redis": {
            p: {c: _median_row([r["redis"][p][c] for r in runs]) for c in cases} for p, cases in first["redis"].items()
        },
        "echo": {
            p: {c: _median_row([r["echo"][p][c] for r in runs]) for c in cases} for p, cases in first["echo"].items()
        },
        "tunnels": {p: _median_row([r["tunnels"][p] for r in runs]) for p in first["tunnels"]},
    }


def measure_variants(
    tmp: Path, cfg: Config, quick: bool, variants: dict[str, str], paths: list[str] = ALL_PATHS
) -> dict[str, Any]:
    """Fresh processes per variant and round; the first variant runs every path, the others the libp2p ones."""
    redis = REDIS_BENCHMARK is not None and Bench.redis_server() is not None
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    reference = next(iter(variants))
    for round_no in range(cfg.rounds):
        for index, (variant, off) in enumerate(variants.items()):
            wanted = paths if variant == reference else [p for p in paths if p in LIBP2P_PATHS]
            env: dict[str, str | None] = {"PEERUP_PATCHES_OFF": off or None, "PEERUP_FASTPATH_SKIP": None}
            label = f"[{variant}, round {round_no + 1}] " if len(variants) > 1 or cfg.rounds > 1 else ""
            log(f"small messages {label}: starting {', '.join(wanted)}")
            where = tmp / f"small-{round_no}-{index}"
            where.mkdir(parents=True, exist_ok=True)
            with Bench(where, quick, paths=wanted, redis=redis, env=env, clients=[]) as bench:
                bench.setup()
                runs[variant].append(measure(bench, cfg, wanted, label))
    return {
        "variants": variants,
        "rounds": cfg.rounds,
        "redis": "redis-server and redis-benchmark"
        if redis
        else "unavailable: redis-server or redis-benchmark missing",
        "results": {variant: _combine(got) for variant, got in runs.items()},
    }


def run(ctx: Context) -> dict[str, Any]:
    ctx.stop_shared()  # this section's CPU figures must be its own
    return {"small": measure_variants(ctx.tmp / "small", ctx.cfg, ctx.quick, ctx.variants)}


def smoke(tmp: Path | None = None, path: str = "peerup-relayed", requests: int = 200) -> dict[str, Any]:
    """One case of each measurement through fresh processes on ``path``, tiny sizes (for a CI test).

    Returns ``{"redis": {...}, "echo": {...}, "tunnels": {...}}``: redis-benchmark
    GET with 1 client and ``-n requests`` (``rps``, ``p50_ms``, ``p99_ms``,
    ``cpu_s_per_10k`` per process), 20 x 64-byte round trips, 20 tunnels opened
    4 at a time. ``redis`` is ``{"unavailable": True}`` without the Redis binaries.
    """
    cfg = Config(echo_each=5, tunnels=20, tunnels_at_once=4)
    redis = REDIS_BENCHMARK is not None and Bench.redis_server() is not None
    with contextlib.ExitStack() as stack:
        where = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peerup-bench-")))
        bench = stack.enter_context(Bench(where, True, paths=[path], redis=redis, clients=[]))
        bench.setup()
        out: dict[str, Any] = {"redis": {"unavailable": True}}
        port = bench.redis_ports.get(path)
        if port is not None:
            meter = CpuMeter(bench.roles(path, "redis"))
            out["redis"] = _measured(lambda: redis_benchmark(port, 1, 1, requests, timeout=60), meter, *PER_10K)
        out["echo"] = echo_case(bench, path, 1, cfg)
        out["tunnels"] = tunnels_case(bench, path, cfg)
        return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """None for the general Targets table: issue #16's are printed with this section's figures."""
    return []
