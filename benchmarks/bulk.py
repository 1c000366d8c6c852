"""Bulk throughput: one connection pulls N MiB, every byte verified, on every path.

Why every byte is checked: a forwarder that drops or reorders data would look
fast otherwise. The main size is the median of interleaved rounds because one
transfer on a shared 2-core machine varies by 10-20%.
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Verifier
from benchmarks.context import Context
from benchmarks.fmt import cell
from benchmarks.runner import MB, MiB, log
from benchmarks.topology import ALL_PATHS, Bench


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


def measure_bulk(bench: Bench, size: int, paths: list[str] = ALL_PATHS, repeat: int = 1) -> dict[str, Any]:
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


def run(ctx: Context) -> dict[str, Any]:
    """``bulk`` at the main size (median of ``bulk_repeat``) and ``bulk_by_size``."""
    bench = ctx.shared()
    cfg = ctx.cfg
    main = measure_bulk(bench, cfg.bulk_mib * MiB, repeat=cfg.bulk_repeat)
    by_size = {str(s): measure_bulk(bench, s * MiB) for s in cfg.sizes_mib}
    by_size[str(cfg.bulk_mib)] = main
    return {"bulk": main, "bulk_by_size": by_size}


def smoke(tmp: Path | None = None, path: str = "peerup-relayed", mib: int = 1) -> dict[str, Any]:
    """One verified ``mib`` MiB transfer on ``path`` through fresh processes (for a CI test)."""
    with contextlib.ExitStack() as stack:
        where = tmp or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peerup-bench-")))
        bench = stack.enter_context(Bench(where, True, paths=[path], clients=[]))
        bench.setup()
        row: dict[str, Any] = measure_bulk(bench, mib * MiB, [path])[path]
        return row


def tables(results: dict[str, Any]) -> list[str]:
    if "bulk" not in results:
        return []
    size = results["config"]["bulk_mib"]
    lines = [
        f"### Bulk throughput, one connection, {size} MiB, every byte verified",
        "",
        "| path | MB/s (median) | all runs, MB/s | seconds | verified |",
        "|---|---|---|---|---|",
    ]
    for path, row in results["bulk"].items():
        if row.get("unavailable"):
            lines.append(f"| {path} | unavailable | - | - | - |")
        else:
            runs = ", ".join(cell(v) for v in row.get("samples_mb_per_s", [row.get("mb_per_s")]))
            lines.append(
                f"| {path} | {cell(row.get('mb_per_s'))} | {runs} | {cell(row.get('seconds'))} | "
                f"{cell(row.get('verified'))} |"
            )
    lines += ["", "### Throughput as the size grows (MB/s)", ""]
    sizes = sorted({int(s) for s in results["bulk_by_size"]})
    paths = list(next(iter(results["bulk_by_size"].values()), {}).keys())
    lines += ["| path | " + " | ".join(f"{s} MiB" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for path in paths:
        cells = [cell(results["bulk_by_size"][str(s)][path].get("mb_per_s")) for s in sizes]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return ["\n".join(lines)]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    bulk_main = results.get("bulk")
    if bulk_main is None:
        return []
    out = []

    def add(name: str, value: Any, goal: str, met: bool | None) -> None:
        out.append({"target": name, "measured": value, "goal": goal, "met": met})

    def mbps(path: str) -> float | None:
        value: float | None = bulk_main.get(path, {}).get("mb_per_s")
        return value

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
    return out
