"""From results to text: the tables on stdout and docs/performance.md.

Why one place: the doc is generated, never edited by hand (its figures must
be the JSON's), and a section run alone (``--only``) must regenerate the same
doc from the merged results. The order of :data:`SECTIONS` is the order of
the run and of the doc; results stored by other commands (``benchmarks.ab``,
``benchmarks.nat``, ``benchmarks.churn``) are appended as before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from benchmarks import bulk, concurrency, latency, memory, small
from benchmarks.context import Context
from benchmarks.fmt import cell, ratio
from benchmarks.runner import ROOT
from benchmarks.topology import ALL_PATHS


class Section(Protocol):
    """What run.py needs of a section module."""

    def run(self, ctx: Context) -> dict[str, Any]: ...
    def tables(self, results: dict[str, Any]) -> list[str]: ...
    def targets(self, results: dict[str, Any]) -> list[dict[str, Any]]: ...


SECTIONS: dict[str, Section] = {
    "bulk": bulk,
    "latency": latency,
    "concurrency": concurrency,
    "memory": memory,
    "small": small,
}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for section in SECTIONS.values() for t in section.targets(results)]


def render_summary(results: dict[str, Any]) -> str:
    """The headline figures next to their baselines, as ratios."""
    bulk_rows = results["bulk"]
    fb = results.get("first_byte", {})

    def mbps(path: str | None) -> float | None:
        value: float | None = bulk_rows.get(path, {}).get("mb_per_s")
        return value

    def warm(path: str | None) -> float | None:
        value: float | None = fb.get(f"warm-{path}", {}).get("p50_ms")
        return value

    raw, socat = mbps("raw"), mbps("socat")
    size = results["config"]["bulk_mib"]
    lines = [
        f"### Side by side: bulk throughput ({size} MiB, one connection) and warm first byte (p50)",
        "",
        "| path | MB/s | vs raw TCP | vs socat | vs bare libp2p, same path | warm first byte ms | vs bare libp2p |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in ALL_PATHS:
        bare = f"bare-libp2p-{path.split('-', 1)[1]}" if path.startswith("peerup-") else None
        lines.append(
            f"| {path} | {cell(mbps(path))} | {ratio(mbps(path), raw)} | {ratio(mbps(path), socat)} | "
            f"{ratio(mbps(path), mbps(bare)) if bare else '-'} | {cell(warm(path))} | "
            f"{ratio(warm(path), warm(bare)) if bare else '-'} |"
        )
    conc = results.get("concurrency", {})
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
            text = cell(r.get("aggregate_mb_per_s")) if not r.get("unavailable") else "unavailable"
            if r.get("failures"):
                text += f" ({r['failures']} failed)"
            cells.append(text)
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_tables(results: dict[str, Any]) -> str:
    """Summary, each section's tables, the general Targets table, then small messages with its targets."""
    parts: list[str] = [render_summary(results)] if "bulk" in results else []
    for name, section in SECTIONS.items():
        if name != "small":
            parts += section.tables(results)
    general = results["targets"] if "targets" in results else targets(results)
    if general:
        lines = ["### Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
        for t in general:
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            lines.append(f"| {t['target']} | {cell(t['measured'])} | {t['goal']} | {met} |")
        parts.append("\n".join(lines))
    parts += small.tables(results)
    return "\n\n".join(parts)


def plot(results: dict[str, Any], png: Path) -> str:
    """Aggregate throughput against connection count: a PNG if matplotlib is there, else ASCII."""
    series = {}
    for path, rows in results.get("concurrency", {}).items():
        pts = [(r["connections"], r.get("aggregate_mb_per_s")) for r in rows if r.get("aggregate_mb_per_s")]
        if pts:
            series[path] = pts
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
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
    text += measured_elsewhere()
    notes = results.get("notes") or []
    if notes:
        text += "\n### Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    (docs / "performance.md").write_text(text)


def measured_elsewhere() -> str:
    """The NAT and churn sections, from the results their own commands wrote."""
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
    churn_file = ROOT / "benchmarks" / "results" / "churn.json"
    if churn_file.exists():
        from benchmarks.churn import summary as churn_summary

        text += (
            "\n### Connection churn (`python -m benchmarks.churn`)\n\n"
            + churn_summary(json.loads(churn_file.read_text()))
            + "\n"
        )
    return text
