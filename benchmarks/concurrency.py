"""Concurrency: N simultaneous tunnels come up, then all pull the same amount at once.

Why two phases: holding N idle tunnels and moving data on all of them stress
different things (per-stream state against buffers and scheduling), so both
the set-up time and the transfer, and RSS held and at peak, are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import Verifier
from benchmarks.context import Context
from benchmarks.fmt import cell
from benchmarks.runner import MB, Proc, RssMeter, log, percentile
from benchmarks.topology import Bench

PATHS = ["raw", "socat", "bare-libp2p-relayed", "peerup-relayed"]


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
        "ttfb_p99_ms": round(percentile(ttfb, 0.99) * 1000, 1) if ttfb else None,
        "transfer_s": round(transfer, 3),
        "aggregate_mb_per_s": round(done_bytes / MB / transfer, 1) if transfer > 0 else None,
    }


def concurrent(
    port: int, n: int, each: int, timeout: float, on_established: Callable[[], None] | None = None
) -> dict[str, Any]:
    return asyncio.run(_concurrent(port, n, each, timeout, on_established))


def watched(bench: Bench, path: str) -> dict[str, Proc]:
    """Whose RSS a path's rows report: the libp2p processes, or the service for raw (socat forks: none)."""
    if path == "raw":
        return {"service": bench.svc}
    if path == "socat":
        return {}
    return {k: v for k, v in bench.roles(path).items() if k in ("relay", "serve", "proxy")}


def phase(bench: Bench, path: str, n: int, each: int) -> dict[str, Any]:
    """One phase of ``n`` tunnels on ``path``, with the RSS of the processes it goes through."""
    port = bench.ports.get(path)
    if port is None:
        return {"connections": n, "unavailable": True}
    with RssMeter(watched(bench, path)) as meter:
        try:
            row = concurrent(port, n, each, 60 + n * 0.15, meter.mark_established)
        except Exception as exc:  # noqa: BLE001
            row = {"connections": n, "failures": n, "error": f"{type(exc).__name__}: {exc}"}
    row["memory"] = meter.report(n)
    return row


def measure_concurrency(bench: Bench, counts: list[int], each: int, paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in paths:
        rows = []
        for n in counts:
            row = phase(bench, path, n, each)
            rows.append(row)
            if row.get("unavailable"):
                continue
            mem = {k: (v["held_per_connection_kib"], v["per_connection_kib"]) for k, v in row["memory"].items()}
            log(
                f"  {n:>5} x {each // 1024} KiB {path}: failures={row.get('failures')} "
                f"agg={row.get('aggregate_mb_per_s')} MB/s ttfb p50={row.get('ttfb_p50_ms')} ms "
                f"up in {row.get('established_s')} s, KiB/conn (held, peak) {mem}"
            )
            time.sleep(0.5)
        out[path] = rows
    return out


def run(ctx: Context) -> dict[str, Any]:
    bench = ctx.shared()
    return {"concurrency": measure_concurrency(bench, ctx.cfg.counts, ctx.cfg.concurrency_bytes_each, PATHS)}


def smoke(tmp: Path | None = None, path: str = "peerup-relayed", n: int = 10, each: int = 16 * 1024) -> dict[str, Any]:
    """``n`` simultaneous tunnels on ``path``, each pulling ``each`` bytes, through fresh processes."""
    with contextlib.ExitStack() as stack:
        where = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peerup-bench-")))
        bench = stack.enter_context(Bench(where, True, paths=[path], clients=[]))
        bench.setup()
        return phase(bench, path, n, each)


def memory_cells(memory: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v['rss_peak_mib']} MiB / {cell(v.get('held_per_connection_kib'))} / {cell(v['per_connection_kib'])} KiB"
        for k, v in memory.items()
    )


def tables(results: dict[str, Any]) -> list[str]:
    conc = results.get("concurrency")
    if conc is None:
        return []
    each = results["config"]["concurrency_bytes_each"]
    lines = [
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
            lines.append(
                f"| {path} | {row['connections']} | {cell(row.get('failures'))} | {cell(row.get('established_s'))} | "
                f"{cell(row.get('ttfb_p50_ms'))} / {cell(row.get('ttfb_p99_ms'))} | {cell(row.get('transfer_s'))} | "
                f"{cell(row.get('aggregate_mb_per_s'))} | {memory_cells(row.get('memory', {}))} |"
            )
    return ["\n".join(lines)]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    rows = [r for r in results.get("concurrency", {}).get("peerup-relayed", []) if not r.get("unavailable")]
    largest = max((r["connections"] for r in rows), default=0)
    for row in rows:
        if row["connections"] >= min(500, largest):
            out.append(
                {
                    "target": f"{row['connections']} concurrent relayed tunnels: failures",
                    "measured": row.get("failures"),
                    "goal": "0",
                    "met": row.get("failures") == 0,
                }
            )
    return out
