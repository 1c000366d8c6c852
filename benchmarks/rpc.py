"""Many small messages: 64-byte request/response through socat and peerup, group commit on and off.

    python -m benchmarks.rpc [--rounds 2] [--each 300]

The traffic databases, RPC and SSH keystrokes make: one client, or 20 at once,
each sending a request line and reading a 64-byte answer, verified byte by
byte (benchmarks/service.py). The same processes as ``benchmarks.run`` (relay,
serving node, relayed and direct proxies, socat) are started twice in one run:
once as shipped, once with ``PEERUP_PATCHES_OFF=yamux-group-commit``, rounds
alternating, so the ratio compares like with like on the same machine state.
Results go to benchmarks/results/rpc.json; docs/performance.md shows the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.run import ROOT, Bench, log, machine, round_trips

RESULTS = ROOT / "benchmarks" / "results" / "rpc.json"
PATHS = ("socat", "peerup-direct", "peerup-relayed")
VARIANTS = {"shipped": "", "without group commit": "yamux-group-commit"}
CLIENTS = (1, 20)


def rate(port: int, clients: int, each: int) -> dict[str, float]:
    """``clients`` threads, ``each`` round trips apiece on their own connection: req/s, p50/p99 ms."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            mine = round_trips(port, each, 64)
        except BaseException as exc:  # noqa: BLE001 - reported below, the run must not hang
            errors.append(exc)
            return
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.perf_counter() - started
    if errors or len(latencies) != clients * each:
        raise RuntimeError(f"round trips failed: {errors[:1]}")
    latencies.sort()
    return {
        "req_s": clients * each / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    }


def measure(rounds: int, each: int) -> dict[str, Any]:
    samples: dict[str, dict[str, dict[str, list[dict[str, float]]]]] = {
        variant: {path: {str(c): [] for c in CLIENTS} for path in PATHS} for variant in VARIANTS
    }
    for round_number in range(rounds):
        for variant, off in VARIANTS.items():
            if off:
                os.environ["PEERUP_PATCHES_OFF"] = off
            else:
                os.environ.pop("PEERUP_PATCHES_OFF", None)
            with tempfile.TemporaryDirectory(prefix="peerup-rpc-") as tmp:
                bench = Bench(Path(tmp), quick=True)
                try:
                    bench.setup()
                    for path in PATHS:
                        port = bench.ports[path]
                        if port is None:
                            continue
                        rate(port, 1, 50)  # warm: connection, discovery, the upgrade to direct
                        for clients in CLIENTS:
                            result = rate(port, clients, each if clients > 1 else each * 4)
                            samples[variant][path][str(clients)].append(result)
                            what = f"round {round_number + 1} {variant:22s} {path:15s} x{clients:<3d}"
                            log(f"{what} {result['req_s']:8.0f} req/s")
                finally:
                    bench.stop_all()
    os.environ.pop("PEERUP_PATCHES_OFF", None)
    summary = {
        variant: {
            path: {
                clients: {key: statistics.median(s[key] for s in runs) for key in ("req_s", "p50_ms", "p99_ms")}
                for clients, runs in by_clients.items()
                if runs
            }
            for path, by_clients in by_path.items()
        }
        for variant, by_path in samples.items()
    }
    return {"rounds": rounds, "each": each, "summary": summary, "samples": samples}


def table(results: dict[str, Any]) -> str:
    """peerup with and without group commit, and socat (which the switch does not touch) as the baseline."""
    shipped, without = results["summary"]["shipped"], results["summary"]["without group commit"]
    lines = [
        "| path | clients | req/s | p50 ms | p99 ms | without group commit, req/s | gain | share of socat |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in PATHS:
        for clients in map(str, CLIENTS):
            now = shipped.get(path, {}).get(clients)
            if now is None:
                continue
            cells = [path, clients, f"{now['req_s']:,.0f}", f"{now['p50_ms']:.2f}", f"{now['p99_ms']:.2f}"]
            before = without.get(path, {}).get(clients)
            socat = shipped.get("socat", {}).get(clients)
            if path == "socat" or before is None:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{before['req_s']:,.0f}", f"{now['req_s'] / before['req_s']:.2f}x"]
                cells.append(f"{now['req_s'] / socat['req_s']:.2f}" if socat else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant (default 2)")
    parser.add_argument("--each", type=int, default=300, help="round trips per client with 20 clients (default 300)")
    args = parser.parse_args()
    os.environ.pop("PEERUP_HOME", None)
    results = measure(max(1, args.rounds), max(10, args.each))
    results["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["machine"] = machine()
    results["command"] = f"python -m benchmarks.rpc --rounds {args.rounds} --each {args.each}"
    RESULTS.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
