"""Long churn soak (not CI): tens of thousands of fresh peers connect to a relay process and leave.

    python -m benchmarks.churn --connections 20000              # as fast as 8 at a time go (~2 min)
    python -m benchmarks.churn --connections 20000 --rate 50    # spread over ~7 min
    python -m benchmarks.churn --target server                  # a serving node's direct port instead

Issue #11, item 1: py-libp2p 0.8.1 kept an inbound-limiter slot per connection
for the life of the swarm, so a listener refused everyone after ~250
connect-and-close cycles. ``tests/test_churn.py`` checks 2,000 cycles; this runs
many more, over minutes, and records how the target behaves over time.

The target runs as a separate ``peerup`` process (:class:`peerup.hostile.Lab`);
each cycle is a real dial from a new ed25519 identity, Noise, yamux, a yamux
PING round trip, GO_AWAY and close (:func:`peerup.hostile.churn`). Every
``--sample`` seconds it records the target's resident memory (VmRSS), open file
descriptors, and the cycles that worked and failed so far (by phase: a full
limiter shows as ``security``, the connection closed during the handshake).
After the churn it waits ``--settle`` seconds, samples again, and checks that a
new peer still gets in (``peerup ping`` through the relay, and a direct probe).

Writes JSON (``--out``, default ``benchmarks/results/churn.json``) and next to
it a CSV of the samples and a plot: PNG with matplotlib (benchmarks/requirements.txt),
else an SVG drawn here. Bounded by ``--deadline``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from peerup.hostile import ChurnStats, Lab, churn, probe, process_fds, process_rss  # noqa: E402

MiB = 1024 * 1024


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)


def sample(pid: int, stats: ChurnStats, started: float, phase: str) -> dict[str, Any]:
    """One row: seconds since the start, the target's RSS (MiB) and FDs, and the churn's counters."""
    try:
        rss: float | None = round(process_rss(pid) / MiB, 1)
        fds: int | None = process_fds(pid)
    except (OSError, ValueError):  # the target died: the row says so
        rss, fds = None, None
    return {
        "t": round(time.monotonic() - started, 2),
        "phase": phase,
        "cycles": stats.attempted,
        "ok": stats.ok,
        "failed": stats.failed,
        "refused": stats.by_phase.get("security", 0) + stats.by_phase.get("tcp", 0),
        "rss_mib": rss,
        "fds": fds,
    }


async def run(args: argparse.Namespace, lab: Lab) -> dict[str, Any]:
    addr, proc = lab.pick(args.target)
    pid = proc.popen.pid
    stats = ChurnStats()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    await trio.sleep(1.0)
    baseline = sample(pid, stats, started, "baseline")
    samples.append(baseline)
    log(f"target {args.target} pid {pid}: RSS {baseline['rss_mib']} MiB, {baseline['fds']} fds; churning")
    phase = "churn"

    async def watch() -> None:
        last_cycles = 0
        while True:
            await trio.sleep(args.sample)
            row = sample(pid, stats, started, phase)
            samples.append(row)
            rate = (row["cycles"] - last_cycles) / args.sample
            last_cycles = row["cycles"]
            log(
                f"{row['cycles']:>6} cycles ({rate:.0f}/s): ok {row['ok']}, failed {row['failed']}; "
                f"RSS {row['rss_mib']} MiB, {row['fds']} fds"
            )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await churn(
            addr,
            args.connections,
            concurrency=args.concurrency,
            rate=args.rate or None,
            deadline=args.deadline,
            stats=stats,
        )
        phase = "settle"
        log(f"churn done: {stats.summary()}; settling {args.settle:g} s")
        await trio.sleep(args.settle)
        nursery.cancel_scope.cancel()
    final = sample(pid, stats, started, "final")
    samples.append(final)
    ping = await trio.to_thread.run_sync(lab.ping)
    direct = await probe(addr)
    log(f"afterwards: peerup ping exit {ping.returncode}; new peer on the port: {direct or 'ok'}")
    return {
        "stats": {
            "attempted": stats.attempted,
            "ok": stats.ok,
            "failed": stats.failed,
            "by_phase": dict(stats.by_phase),
            "first_failure": stats.first_failure,
            "last_ok": stats.last_ok,
            "first_error": stats.first_error,
            "seconds": round(stats.seconds, 1),
            "cycles_per_s": round(stats.rate, 1),
        },
        "baseline": baseline,
        "final": final,
        "peak_rss_mib": max((s["rss_mib"] for s in samples if s["rss_mib"] is not None), default=None),
        "peak_fds": max((s["fds"] for s in samples if s["fds"] is not None), default=None),
        "after": {
            "peerup_ping_exit": ping.returncode,
            "peerup_ping_error": ping.stderr.strip().splitlines()[-1:] if ping.returncode else [],
            "direct_probe": direct or "ok",
            "target_alive": proc.popen.poll() is None,
            "target_log_lines": len(proc.errors),
        },
        "samples": samples,
    }


def write_csv(path: Path, samples: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(samples[0]))
        writer.writeheader()
        writer.writerows(samples)


def plot_png(path: Path, samples: list[dict[str, Any]], title: str) -> bool:
    """Three panels with matplotlib; False if it is not installed."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return False
    t = [s["t"] for s in samples]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 8))
    axes[0].plot(t, [s["rss_mib"] for s in samples])
    axes[0].set_ylabel("target RSS (MiB)")
    axes[1].plot(t, [s["fds"] for s in samples])
    axes[1].set_ylabel("target open fds")
    axes[2].plot(t, [s["ok"] for s in samples], label="ok")
    axes[2].plot(t, [s["refused"] for s in samples], label="refused")
    axes[2].set_ylabel("cycles")
    axes[2].set_xlabel("seconds")
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_svg(path: Path, samples: list[dict[str, Any]], title: str) -> None:
    """The same three panels as plain SVG polylines, for machines without matplotlib."""
    width, panel, margin = 760, 200, 60
    t_max = max(s["t"] for s in samples) or 1.0
    panels = [
        ("target RSS (MiB)", [("rss_mib", "#1f77b4")]),
        ("target open fds", [("fds", "#1f77b4")]),
        ("cycles: ok (blue), refused (red)", [("ok", "#1f77b4"), ("refused", "#d62728")]),
    ]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 2 * margin}" '
        f'height="{len(panels) * (panel + margin) + margin}" font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{margin}" y="20" font-size="14">{title}</text>',
    ]
    for n, (label, series) in enumerate(panels):
        top = margin + n * (panel + margin)
        values = [s[key] for key, _ in series for s in samples if s[key] is not None]
        y_max = max(values, default=1) or 1
        y_min = min(0, min(values, default=0))
        parts.append(f'<rect x="{margin}" y="{top}" width="{width}" height="{panel}" fill="none" stroke="#888"/>')
        parts.append(f'<text x="{margin}" y="{top - 6}">{label}</text>')
        parts.append(f'<text x="{margin - 6}" y="{top + 10}" text-anchor="end">{y_max:g}</text>')
        parts.append(f'<text x="{margin - 6}" y="{top + panel}" text-anchor="end">{y_min:g}</text>')
        for key, colour in series:
            points = " ".join(
                f"{margin + s['t'] / t_max * width:.1f},{top + panel - (s[key] - y_min) / (y_max - y_min) * panel:.1f}"
                for s in samples
                if s[key] is not None
            )
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>')
    bottom = margin + len(panels) * (panel + margin) - margin + 16
    parts.append(f'<text x="{margin + width}" y="{bottom}" text-anchor="end">{t_max:g} s</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def summary(result: dict[str, Any]) -> str:
    """The performance.md paragraph for a saved result (benchmarks/run.py includes it)."""
    stats, after, params = result["stats"], result["after"], result.get("params", {})
    base, final = result["baseline"], result["final"]
    return (
        f"{stats['attempted']} connect-and-close cycles from fresh identities against a "
        f"{params.get('target', 'relay')} "
        f"process ({result.get('when', '')}), {params.get('concurrency', '?')} at a time: "
        f"{stats['ok']} ok, {stats['failed']} failed, {stats['cycles_per_s']} cycles/s. "
        f"Target RSS {base['rss_mib']} -> {final['rss_mib']} MiB (peak {result['peak_rss_mib']}), "
        f"open files {base['fds']} -> {final['fds']} (peak {result['peak_fds']}); "
        f"afterwards a new `peerup ping` exited {after['peerup_ping_exit']} and a new peer on the port: "
        f"{after['direct_probe']}. Samples: `benchmarks/results/churn.csv`, plot next to it. "
        "libp2p 0.8.1 refused every peer after about 250 cycles (docs/security.md)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--connections", type=int, default=20000, help="connect-and-close cycles (default 20000)")
    parser.add_argument("--concurrency", type=int, default=8, help="cycles in flight at once (default 8)")
    parser.add_argument("--rate", type=float, default=0.0, help="at most this many new cycles per second (0: no cap)")
    parser.add_argument("--target", choices=["relay", "server"], default="relay")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between samples (default 2)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait after the churn (default 10)")
    parser.add_argument("--deadline", type=float, default=1800.0, help="stop churning after this many seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "churn.json")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.concurrency < 1 or args.sample <= 0:
        parser.error("--connections, --concurrency and --sample must be positive")
    # The attacker's own libp2p logs every refused dial at ERROR; the target's log is what matters.
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)

    with tempfile.TemporaryDirectory(prefix="peerup-churn-") as tmp:
        lab = Lab(Path(tmp))
        try:
            lab.start_relay()
            lab.start_server()  # the new peer afterwards pings it through the relay
            result = trio.run(run, args, lab)
        finally:
            lab.stop()
    result["params"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["when"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    write_csv(args.out.with_suffix(".csv"), result["samples"])
    title = f"{args.connections} fresh peers against a {args.target}: {result['stats']['ok']} ok"
    if plot_png(args.out.with_suffix(".png"), result["samples"], title):
        plotted = args.out.with_suffix(".png")
    else:
        plotted = args.out.with_suffix(".svg")
        plot_svg(plotted, result["samples"], title)
        log("matplotlib is not installed: plot written as SVG (CSV has the numbers)")
    log(f"wrote {args.out}, {args.out.with_suffix('.csv')}, {plotted}")
    stats = result["stats"]
    healthy = stats["failed"] == 0 and result["after"]["peerup_ping_exit"] == 0 and result["after"]["target_alive"]
    log(
        f"{'OK' if healthy else 'PROBLEM'}: {stats['ok']}/{stats['attempted']} ok at {stats['cycles_per_s']}/s; "
        f"RSS {result['baseline']['rss_mib']} -> {result['final']['rss_mib']} MiB (peak {result['peak_rss_mib']}), "
        f"fds {result['baseline']['fds']} -> {result['final']['fds']} (peak {result['peak_fds']})"
    )
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
