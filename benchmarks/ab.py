"""Before/after in one run: the same measurements with parts of the libp2p fast path switched off.

    python -m benchmarks.ab                 # ~4 min: 3 variants x 2 rounds, 64 MiB bulk
    python -m benchmarks.ab --rounds 3 --mib 128

Each variant starts the whole set of processes (``benchmarks.topology.Bench``) with
``PEERUP_FASTPATH_SKIP`` naming the patches of ``peerup/plugins/libp2p/patches.py``
to leave out, then measures the warm first byte (p50 of 15) and one bulk transfer
on the four libp2p paths. Variants alternate round by round, so a busy neighbour
slows all of them alike. Writes ``benchmarks/results/ab.json``, which the next full
``python -m benchmarks.run`` puts into ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bulk import bulk  # noqa: E402
from benchmarks.latency import first_byte  # noqa: E402
from benchmarks.runner import MiB, log  # noqa: E402
from benchmarks.topology import Bench  # noqa: E402

#: label -> PEERUP_FASTPATH_SKIP value.
VARIANTS = {
    "no fast path": "noise-read,noise-write,yamux-write,yamux-conn,yamux-buffers,yamux-credit,multiselect",
    "fast path 1-3 (before)": "yamux-conn,yamux-buffers,yamux-credit,multiselect",
    "fast path 1-7 (now)": "",
    # peerup's yamux session (peerup/plugins/libp2p/muxer.py: enforced windows, limits,
    # honest resets) against upstream's, everything else equal.
    "upstream yamux session": "peerup-session",
}
PATHS = ["bare-libp2p-direct", "peerup-direct", "bare-libp2p-relayed", "peerup-relayed"]


def measure(mib: int, warm_samples: int) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    with tempfile.TemporaryDirectory(prefix="peerup-ab-") as tmp:
        bench = Bench(Path(tmp), True, paths=PATHS, clients=[])
        try:
            bench.setup()
            for path in PATHS:
                port = bench.ports[path]
                row: dict[str, float | None] = {}
                try:
                    if port is None:
                        raise RuntimeError("path not started")
                    first_byte(port)
                    samples = [first_byte(port) * 1000 for _ in range(warm_samples)]
                    row["warm_ms"] = round(statistics.median(samples), 2)
                    bulk(port, 1 * MiB, 30)
                    row["mb_per_s"] = bulk(port, mib * MiB, 120)["mb_per_s"]
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    row = {"warm_ms": None, "mb_per_s": None}
                    log(f"    {path}: {type(exc).__name__}: {exc}")
                out[path] = row
        finally:
            bench.stop_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--warm-samples", type=int, default=15)
    args = parser.parse_args()
    started = time.time()
    loadavg_at_start = os.getloadavg()
    raw: dict[str, dict[str, list[float]]] = {}
    for round_no in range(args.rounds):
        for label, skip in VARIANTS.items():
            os.environ["PEERUP_FASTPATH_SKIP"] = skip
            got = measure(args.mib, args.warm_samples)
            for path, row in got.items():
                for key, value in row.items():
                    if value is not None:
                        raw.setdefault(label, {}).setdefault(f"{path} {key}", []).append(value)
            log(f"round {round_no + 1}/{args.rounds} {label}: {got}")
    os.environ.pop("PEERUP_FASTPATH_SKIP", None)
    results: dict[str, Any] = {
        "command": "python -m benchmarks.ab " + " ".join(sys.argv[1:]),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "duration_s": round(time.time() - started, 1),
        "loadavg": [loadavg_at_start, os.getloadavg()],
        "bulk_mib": args.mib,
        "rounds": args.rounds,
        "variants": VARIANTS,
        "samples": raw,
        "median": {label: {k: round(statistics.median(v), 2) for k, v in rows.items()} for label, rows in raw.items()},
    }
    out = ROOT / "benchmarks" / "results" / "ab.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def render(results: dict[str, Any]) -> str:
    """A markdown table: one row per path and measure, one column per variant (medians)."""
    labels = list(results["median"])
    lines = [
        f"Command: `{results['command'].strip()}` ({results['finished']}, {results['duration_s']:.0f} s, "
        f"{results['rounds']} rounds, bulk {results['bulk_mib']} MiB, medians; load average "
        f"{results['loadavg'][0][0]:.2f} at start, {results['loadavg'][1][0]:.2f} at end).",
        "",
        "| path | measure | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for path in PATHS:
        for key, name in (("mb_per_s", "bulk MB/s"), ("warm_ms", "warm first byte ms")):
            cells = [str(results["median"][label].get(f"{path} {key}", "-")) for label in labels]
            lines.append(f"| {path} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
