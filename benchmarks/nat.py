"""Direct paths across NAT, measured: ``python -m benchmarks.nat`` (root; network namespaces).

For each NAT pair (server side, client side), in one lab (peerup/netlab.py) with
the real CLI (peerup/natworld.py): ``--tries`` fresh clients (a new identity and
a new ``peerup proxy`` process each) open a first tunnel and then small ones
until a tunnel takes the direct path or ``--wait`` seconds pass. Reported per
pair: direct successes out of the tries, seconds from the first tunnel to the
first direct one (median, p90), tunnels that failed (any: a tunnel must never
fail, relayed or not), and throughput of one 64 MiB echo (both directions)
relayed, then after the upgrade, in the same topology.

Results go to benchmarks/results/nat.json and, with --docs, into the NAT table
of docs/performance.md. Not run in CI (minutes, root only); tests/test_nat.py
has one case of each pair.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peerup.natworld import PeerupWorld, Place
from peerup.netlab import NetLab, unavailable_reason

PAIRS: list[tuple[Place, Place]] = [
    ("cone", "cone"),
    ("cone", "symmetric"),
    ("symmetric", "cone"),
    ("symmetric", "symmetric"),
    ("public", "cone"),
    ("cone", "public"),
]
RESULTS = Path(__file__).parent / "results" / "nat.json"
BULK = 64 << 20


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_pair(server: Place, client: Place, tries: int, wait: float) -> dict[str, Any]:
    with NetLab() as lab, tempfile.TemporaryDirectory() as tmp:
        world = PeerupWorld(lab, Path(tmp), server, client, verbose=True).start()
        try:
            times: list[float] = []
            failed = 0
            for attempt in range(tries):
                if attempt:
                    world.fresh_client()
                started = time.monotonic()
                first = world.transfer(64 * 1024)
                failed += not first.intact
                path = first.path
                while path != "direct" and time.monotonic() - started < wait:
                    time.sleep(0.1)
                    moved = world.transfer(1024)
                    failed += not moved.intact
                    path = moved.path
                if path == "direct":
                    times.append(time.monotonic() - started)
                print(f"  {server}/{client} try {attempt + 1}: {path}", flush=True)
            world.fresh_client()
            relayed = world.transfer(BULK)  # the punch takes ~50 ms: a new tunnel now is still relayed
            failed += not relayed.intact
            upgraded = world.wait_for_path("direct", timeout=wait) is not None
            direct = world.transfer(BULK) if upgraded else None
            if direct is not None:
                failed += not direct.intact
            return {
                "server": server,
                "client": client,
                "tries": tries,
                "direct": len(times),
                "to_direct_median_s": statistics.median(times) if times else None,
                "to_direct_p90_s": percentile(times, 0.9),
                "failed_tunnels": failed,
                "relayed_path_of_bulk": relayed.path,
                "relayed_mb_s": round(relayed.mb_per_s, 1),
                "direct_mb_s": round(direct.mb_per_s, 1) if direct is not None else None,
            }
        finally:
            world.stop()


def table(rows: list[dict[str, Any]]) -> str:
    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    def relayed(row: dict[str, Any]) -> str:
        # A client that finds a confirmed public address never goes through the relay.
        if row.get("relayed_path_of_bulk", "relayed") != "relayed":
            return f"- (direct at once: {row['relayed_mb_s']})"
        return str(row["relayed_mb_s"])

    out = [
        "| server | client | direct / tries | to direct, median s | p90 s | failed tunnels "
        "| relayed MB/s | direct MB/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['server']} | {r['client']} | {r['direct']} / {r['tries']} | {secs(r['to_direct_median_s'])} | "
            f"{secs(r['to_direct_p90_s'])} | {r['failed_tunnels']} | {relayed(r)} | "
            f"{r['direct_mb_s'] if r['direct_mb_s'] is not None else '-'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.nat", description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=20, help="fresh clients per NAT pair (default 20)")
    parser.add_argument("--wait", type=float, default=6.0, help="seconds a try waits for the direct path")
    parser.add_argument("--pairs", help="comma list like cone/cone,public/cone (default: all)")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"benchmarks.nat: {reason}", file=sys.stderr)
        return 2
    pairs = PAIRS
    if args.pairs:
        pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]  # type: ignore[misc, unused-ignore]
    rows = []
    for server, client in pairs:
        print(f"{server} server, {client} client: {args.tries} tries", flush=True)
        rows.append(run_pair(server, client, args.tries, args.wait))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}, indent=2) + "\n")
    print(table(rows))
    print(f"written: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
