"""Memory per tunnel, in freshly started processes.

Why fresh: in the concurrency section each phase's RSS growth is counted from
the RSS at its start, which already holds what earlier phases (bulk transfers,
smaller N) left in the Python heap for reuse; the larger N rows understate.
Here nothing ran before: the figure is what N tunnels cost.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.concurrency import memory_cells, phase
from benchmarks.context import Context
from benchmarks.fmt import cell
from benchmarks.latency import first_byte
from benchmarks.runner import log
from benchmarks.topology import Bench

PATHS = ["peerup-relayed", "bare-libp2p-relayed"]


def measure_memory(tmp: Path, quick: bool, n: int, each: int, paths: list[str] = PATHS) -> dict[str, Any]:
    """``n`` tunnels through freshly started processes, so no earlier phase's heap hides the growth."""
    tmp.mkdir(parents=True, exist_ok=True)
    bench = Bench(tmp, quick, paths=paths, clients=[])
    out: dict[str, Any] = {}
    try:
        bench.setup()
        for path in paths:
            port = bench.ports[path]
            assert port is not None
            # One tunnel first, so the proxy holds its libp2p connection: N tunnels
            # opened at once on a proxy with no connection yet each start their own
            # discovery and dial (seen: 1000 at once never came up; see performance.md).
            first_byte(port)
            time.sleep(0.5)
            row = phase(bench, path, n, each)
            out[path] = row
            mem = {k: (v["held_per_connection_kib"], v["per_connection_kib"]) for k, v in row["memory"].items()}
            log(f"  {n} x {each // 1024} KiB {path}, fresh: failures={row.get('failures')} KiB/conn (held, peak) {mem}")
            time.sleep(0.5)
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        bench.stop_all()
    return out


def run(ctx: Context) -> dict[str, Any]:
    ctx.stop_shared()  # its heap and CPU must not count here
    n = max(ctx.cfg.counts)
    return {"memory": measure_memory(ctx.tmp / "fresh", ctx.quick, n, ctx.cfg.concurrency_bytes_each)}


def smoke(tmp: Path | None = None, n: int = 10, each: int = 16 * 1024) -> dict[str, Any]:
    """``n`` relayed peerup tunnels in fresh processes; the row with per-process KiB per connection."""
    if tmp is not None:
        return measure_memory(tmp, True, n, each, ["peerup-relayed"])
    with tempfile.TemporaryDirectory(prefix="peerup-bench-") as where:
        return measure_memory(Path(where), True, n, each, ["peerup-relayed"])


def tables(results: dict[str, Any]) -> list[str]:
    fresh = results.get("memory") or {}
    if not fresh:
        return []
    lines = [
        "### Memory per connection, fresh processes",
        "",
        "The concurrency rows above count each phase's RSS growth from its start, when the Python heap "
        "already holds what earlier phases freed, so their larger N understate. Here the processes are "
        "started anew and nothing runs before the N tunnels.",
        "",
        "| path | N | failures | per process: peak RSS MiB / KiB per conn held (all up, idle) / KiB per conn at peak |",
        "|---|---|---|---|",
    ]
    for path, row in fresh.items():
        if not isinstance(row, dict):
            lines.append(f"| {path} | - | error: {row} | |")
            continue
        lines.append(
            f"| {path} | {row.get('connections')} | {cell(row.get('failures'))} | "
            f"{memory_cells(row.get('memory', {}))} |"
        )
    return ["\n".join(lines)]


def worst(results: dict[str, Any], key: str) -> float | None:
    """The largest ``key`` (e.g. ``per_connection_kib``) over the fresh relayed run's processes."""
    fresh = (results.get("memory") or {}).get("peerup-relayed")
    if not fresh or not fresh.get("memory"):
        return None
    return max((m.get(key) or 0) for m in fresh["memory"].values())


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    fresh = (results.get("memory") or {}).get("peerup-relayed")
    if not fresh or not fresh.get("memory"):
        return []
    n = fresh["connections"]
    held, peak = worst(results, "held_per_connection_kib"), worst(results, "per_connection_kib")
    assert held is not None and peak is not None
    each = results["config"]["concurrency_bytes_each"] // 1024
    return [
        {
            "target": f"{n} relayed tunnels, fresh processes: failures",
            "measured": fresh.get("failures"),
            "goal": "0",
            "met": fresh.get("failures") == 0,
        },
        {
            "target": f"{n} relayed tunnels, fresh processes: KiB per connection held, all up and idle (worst process)",
            "measured": held,
            "goal": "< 64 KiB",
            "met": held < 64,
        },
        {
            "target": f"{n} relayed tunnels, fresh processes: KiB per connection at peak, all pulling {each} KiB "
            "at once (worst process)",
            "measured": peak,
            "goal": "< 64 KiB",
            "met": peak < 64,
        },
    ]
