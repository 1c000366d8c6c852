"""peerup benchmarks: throughput, latency, scale and many small messages, each next to its baseline.

    python -m benchmarks.run                       # full run (< 15 min on 2 cores)
    python -m benchmarks.run --quick               # smoke run (a few minutes)
    python -m benchmarks.run --only small          # one section (or a comma list), merged into latest.json
    python -m benchmarks.run --only small --variant "no group commit=yamux-group-commit" --rounds 2

Sections (benchmarks/<section>.py): bulk, latency, concurrency, memory, small.
Starts, as separate processes on 127.0.0.1: a test service (and redis-server for
small), socat forwarders, a ``peerup relay serve``, ``peerup serve`` and
``peerup proxy`` processes (relayed and direct), and the bare-libp2p baseline
(``benchmarks/bare_libp2p.py``) over the same paths. Prints tables, writes
``benchmarks/results/latest.json`` (``latest-quick.json`` with --quick) and, when
not --quick, ``docs/performance.md`` and ``docs/performance-throughput.png``.
With --only, the sections run replace theirs in the existing JSON and the doc is
regenerated from the merged results; each section records when it ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.context import Config, Context  # noqa: E402
from benchmarks.report import SECTIONS, render_tables, targets, write_docs  # noqa: E402
from benchmarks.runner import git_head, log, machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def parse_variants(values: list[str]) -> dict[str, str]:
    """``NAME=patch,patch`` arguments -> {label: PEERUP_PATCHES_OFF}, "shipped" first; names checked now."""
    variants = {"shipped": ""}
    known: set[str] | None = None
    for value in values:
        name, sep, off = value.partition("=")
        if not sep or not name or not off:
            raise SystemExit(f"--variant {value!r}: expected NAME=PATCH[,PATCH] (PEERUP_PATCHES_OFF names)")
        if known is None:
            from peerup.plugins.libp2p.patches import BY_NAME

            known = set(BY_NAME)
        unknown = sorted(set(off.split(",")) - known)
        if unknown:
            raise SystemExit(
                f"--variant {name}: unknown patch {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        variants[name] = off
    return variants


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes and counts")
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.md")
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="measure nothing: rewrite docs/performance.md from the stored results (after editing "
        "benchmarks/performance-notes.md)",
    )
    parser.add_argument("--only", help=f"comma list of sections to run: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATCHES_OFF",
        help="small messages: also run the libp2p paths with PEERUP_PATCHES_OFF=PATCHES_OFF (repeatable)",
    )
    parser.add_argument("--rounds", type=int, help="small messages: alternating rounds per variant (default 1)")
    parser.add_argument("--small-seconds", type=float, help="small messages: seconds per redis-benchmark case")
    parser.add_argument("--echo-each", type=int, help="small messages: 64-byte round trips per client (x4 with one)")
    args = parser.parse_args(argv)
    args.sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    args.variants = parse_variants(args.variant)
    return args


def run_sections(ctx: Context, names: list[str], command: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``names`` in the registry's order; a failing section is recorded, the others still run."""
    results: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    try:
        for name in [n for n in SECTIONS if n in names]:
            log(f"== {name}")
            started = time.time()
            load = os.getloadavg()
            try:
                results.update(SECTIONS[name].run(ctx))
                error = None
            except Exception as exc:  # noqa: BLE001 - reported; the other sections still run
                error = f"{type(exc).__name__}: {exc}"
                log(f"  section {name} failed: {error}")
            meta[name] = {
                "command": command,
                "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "duration_s": round(time.time() - started, 1),
                "loadavg": [load, os.getloadavg()],
                "git": git_head(),
                **({"error": error} if error else {}),
            }
    finally:
        ctx.stop_shared()
    return results, meta


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.docs_only:
        return _docs_only()
    # SIGTERM runs the finally blocks (every child is stopped) instead of killing us outright.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.pop("PEERUP_HOME", None)
    quick = args.quick
    cfg = Config.quick() if quick else Config()
    if args.rounds:
        cfg.rounds = max(1, args.rounds)
    if args.small_seconds:
        cfg.small_seconds = args.small_seconds
    if args.echo_each:
        cfg.echo_each = args.echo_each
    command = shlex.join(["python", "-m", "benchmarks.run", *(argv if argv is not None else sys.argv[1:])])
    started = time.time()
    out = RESULTS / ("latest-quick.json" if quick else "latest.json")
    partial = args.only is not None
    results: dict[str, Any] = json.loads(out.read_text()) if partial and out.exists() else {}
    fresh_machine = machine()
    with tempfile.TemporaryDirectory(prefix="peerup-bench-") as tmp:
        ctx = Context(cfg, Path(tmp), quick, variants=args.variants)
        measured, meta = run_sections(ctx, args.sections, command)
    results.update(measured)
    results.setdefault("sections", {}).update(meta)
    # A section's own sizes go with it; with --only the other sections keep the config they ran with.
    if partial and results.get("config"):
        stored = results["config"]
        stored.update({k: v for k, v in cfg.as_json().items() if k not in stored or _owned(k, args.sections)})
    else:
        results["config"] = cfg.as_json()
    if not partial or "command" not in results:
        results["command"] = command
        results["machine"] = fresh_machine
        results["notes"] = ctx.notes
        results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        results["duration_s"] = round(time.time() - started, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["targets"] = targets(results)
    if "small" in measured:
        from benchmarks.small_report import targets as small_targets

        results["small"]["targets"] = small_targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    tables = render_tables(results)
    print("\n" + tables)
    print(f"\nJSON: {out.relative_to(ROOT)}  ({time.time() - started:.0f} s)")
    if not quick and not args.no_docs:
        write_docs(results, tables)
        print("docs: docs/performance.md, docs/performance-throughput.png")
    failed = [name for name, m in meta.items() if m.get("error")]
    return 1 if failed else 0


def _docs_only() -> int:
    """Targets and tables again from latest.json (the issue #16 targets read other sections' results)."""
    results: dict[str, Any] = json.loads((RESULTS / "latest.json").read_text())
    results["targets"] = targets(results)
    if "small" in results:
        from benchmarks.small_report import targets as small_targets

        results["small"]["targets"] = small_targets(results)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    write_docs(results, render_tables(results))
    print("docs: docs/performance.md, docs/performance-throughput.png")
    return 0


def _owned(key: str, sections: list[str]) -> bool:
    """Whether a config key belongs to a section that ran now (so its new value replaces the stored one)."""
    small_key = key.startswith(("small_", "echo_", "tunnels")) or key == "rounds"
    return "small" in sections if small_key else bool(set(sections) - {"small"})


if __name__ == "__main__":
    sys.exit(main())
