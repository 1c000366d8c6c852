"""Tables and targets of the small-messages section (issue #16), for stdout and docs/performance.md.

Why the targets are printed here, next to the figures, and not only in the
general Targets table: issue #16 states them for this workload (and repeats
the bulk and memory goals with its own numbers), each with the same case's
socat figure as the yardstick.
"""

from __future__ import annotations

from typing import Any

from benchmarks import memory
from benchmarks.fmt import cell, num, ratio
from benchmarks.topology import ALL_PATHS

ORDER = {p: i for i, p in enumerate(ALL_PATHS)}


def _paths(rows: dict[str, Any]) -> list[str]:
    return sorted(rows, key=lambda p: ORDER.get(p, len(ORDER)))


def _cpu(row: dict[str, Any], key: str) -> str:
    cpu = row.get(key) or {}
    return ", ".join(f"{role} {_short(value)}" for role, value in cpu.items()) or "-"


def _short(value: Any) -> str:
    """Three significant digits: CPU figures come in 10 ms ticks, medians of them print as 1.6004999999999998."""
    return f"{value:.3g}" if isinstance(value, float) else cell(value)


def _figures(row: dict[str, Any] | None, socat: dict[str, Any] | None) -> list[str]:
    """req/s, p50, p99, vs socat, or the error."""
    if not row or row.get("unavailable"):
        return ["unavailable", "", "", ""]
    if "error" in row:
        return [f"error: {row['error'][:80]}", "", "", ""]
    return [
        num(row["rps"]),
        f"{row['p50_ms']:.2f}",
        f"{row['p99_ms']:.2f}",
        ratio(row["rps"], (socat or {}).get("rps")),
    ]


def _case_label(case: str) -> str:
    clients, pipeline = case[1:].split("-P")
    return f"{clients} client{'s' if clients != '1' else ''}" + (f", -P {pipeline}" if pipeline != "1" else "")


def tables(results: dict[str, Any]) -> list[str]:
    small = results.get("small")
    if not small:
        return []
    meta = results.get("sections", {}).get("small")
    variants: dict[str, str] = small["variants"]
    reference = next(iter(variants))
    got = small["results"][reference]
    cfg = results.get("config", {})
    when = f" (`{meta['command']}`, {meta['finished']}, {meta['duration_s']:.0f} s)" if meta else ""
    out = [
        f"### Many small messages{when}\n\n"
        "Processes started for this section only; the serving node exposes the test service and a throwaway "
        "`redis-server --save '' --appendonly no`, each through its own proxies. CPU: seconds of each process "
        "(utime + stime from /proc/PID/stat, socat's forked children included) per 10,000 requests, or "
        "milliseconds per tunnel. Latencies: redis-benchmark's own percentiles; for the echo, per round trip. "
        f"Redis runs are sized to last about {cfg.get('small_seconds', '?')} s each after a warm-up"
        + (f"; medians of {small['rounds']} rounds" if small["rounds"] > 1 else "")
        + ". Targets at the end."
    ]
    redis = got.get("redis", {})
    if any(redis.values()):
        lines = [
            "### Small messages: Redis GET (`redis-benchmark -t get -c C -P P`)",
            "",
            "| clients, pipeline | path | req/s | p50 ms | p99 ms | vs socat | CPU s per 10k requests |",
            "|---|---|---|---|---|---|---|",
        ]
        cases = list(next(iter(redis.values())))
        for case in cases:
            socat = redis.get("socat", {}).get(case)
            for path in _paths(redis):
                row = redis[path].get(case)
                figures = _figures(row, socat)
                lines.append(
                    f"| {_case_label(case)} | {path} | "
                    + " | ".join(figures)
                    + f" | {_cpu(row or {}, 'cpu_s_per_10k')} |"
                )
        out.append("\n".join(lines))
    echo = got.get("echo", {})
    lines = [
        "### Small messages: 64-byte request/response (`benchmarks/service.py`, every answer verified)",
        "",
        "| clients | path | req/s | p50 ms | p99 ms | vs socat | CPU s per 10k requests |",
        "|---|---|---|---|---|---|---|",
    ]
    for clients in next(iter(echo.values()), {}):
        socat = echo.get("socat", {}).get(clients)
        for path in _paths(echo):
            row = echo[path].get(clients)
            lines.append(
                f"| {clients} | {path} | "
                + " | ".join(_figures(row, socat))
                + f" | {_cpu(row or {}, 'cpu_s_per_10k')} |"
            )
    out.append("\n".join(lines))
    tunnels = got.get("tunnels", {})
    lines = [
        f"### Small messages: tunnels opened per second ({cfg.get('tunnels')} connections, "
        f"{cfg.get('tunnels_at_once')} at a time: connect, one 64-byte request, answer, close)",
        "",
        "| path | tunnels/s | failed | vs socat | CPU ms per tunnel |",
        "|---|---|---|---|---|",
    ]
    socat_rate = tunnels.get("socat", {}).get("tunnels_per_s")
    for path in _paths(tunnels):
        row = tunnels[path]
        if "error" in row or row.get("unavailable"):
            lines.append(f"| {path} | {row.get('error', 'unavailable')} | | | |")
            continue
        lines.append(
            f"| {path} | {num(row['tunnels_per_s'])} | {num(row['failures'])} | "
            f"{ratio(row['tunnels_per_s'], socat_rate)} | {_cpu(row, 'cpu_ms_per_tunnel')} |"
        )
    out.append("\n".join(lines))
    if len(variants) > 1:
        out.append(variant_table(small))
    out.append(targets_table(results))
    return out


def variant_table(small: dict[str, Any]) -> str:
    """req/s (tunnels/s) of each variant next to the reference's, libp2p paths only."""
    variants: dict[str, str] = small["variants"]
    names = list(variants)
    res = small["results"]
    head = " | ".join(f"{n} (`{variants[n] or '-'}` off)" for n in names)
    lines = [
        "### Small messages: variants (`PEERUP_PATCHES_OFF`), fresh processes each, rounds alternating",
        "",
        f"| measure | path | {head} | " + " | ".join(f"{names[0]} / {n}" for n in names[1:]) + " |",
        "|---|---|" + "---|" * (2 * len(names) - 1),
    ]

    def figure(variant: str, kind: str, path: str, case: str | None) -> float | None:
        rows = res[variant].get(kind, {}).get(path, {})
        row = rows.get(case, {}) if case is not None else rows
        value: float | None = row.get("tunnels_per_s" if kind == "tunnels" else "rps")
        return value

    measures: list[tuple[str, str, str | None]] = []
    for case in next(iter(res[names[0]].get("redis", {}).values()), {}):
        measures.append((f"redis GET {_case_label(case)}, req/s", "redis", case))
    for clients in next(iter(res[names[0]].get("echo", {}).values()), {}):
        measures.append((f"64-byte echo x{clients}, req/s", "echo", clients))
    measures.append(("tunnels/s", "tunnels", None))
    for label, kind, case in measures:
        for path in [p for p in ALL_PATHS if p in res[names[-1]].get(kind, {})]:
            values = [figure(n, kind, path, case) for n in names]
            lines.append(
                f"| {label} | {path} | "
                + " | ".join(num(v) for v in values)
                + " | "
                + " | ".join(ratio(values[0], v) for v in values[1:])
                + " |"
            )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #16's goals, each with the measured figure and the same case through socat."""
    small = results.get("small")
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, goal: float, unit: str, socat: float | None, le: bool = False) -> None:
        met = None if value is None else (value <= goal if le else value >= goal)
        out.append(
            {
                "target": name,
                "measured": None if value is None else round(value, 1),
                "goal": f"{'<=' if le else '>='} {goal:,g} {unit}",
                "met": met,
                "vs_socat": ratio(value, socat),
            }
        )

    if small:
        got = small["results"][next(iter(small["variants"]))]
        redis, echo, tunnels = got.get("redis", {}), got.get("echo", {}), got.get("tunnels", {})

        def rps(rows: dict[str, Any], path: str, case: str) -> float | None:
            value: float | None = rows.get(path, {}).get(case, {}).get("rps")
            return value

        for kind, goal in (("relayed", 5000), ("direct", 10000)):
            path = f"peerup-{kind}"
            add(
                f"20 clients one at a time, {kind} (redis GET)",
                rps(redis, path, "c20-P1"),
                goal,
                "req/s",
                rps(redis, "socat", "c20-P1"),
            )
            add(
                f"20 clients one at a time, {kind} (64-byte echo)",
                rps(echo, path, "20"),
                goal,
                "req/s",
                rps(echo, "socat", "20"),
            )
        add(
            "20 clients x 16 pipelined, relayed (redis GET -P 16)",
            rps(redis, "peerup-relayed", "c20-P16"),
            100_000,
            "req/s",
            rps(redis, "socat", "c20-P16"),
        )
        socat_tunnels = tunnels.get("socat", {}).get("tunnels_per_s")
        for kind in ("relayed", "direct"):
            add(
                f"tunnels opened, {kind}",
                tunnels.get(f"peerup-{kind}", {}).get("tunnels_per_s"),
                1000,
                "/s",
                socat_tunnels,
            )
    bulk = results.get("bulk")
    if bulk:
        socat_mb = bulk.get("socat", {}).get("mb_per_s")
        for kind, goal in (("relayed", 120), ("direct", 250)):
            add(f"bulk, {kind}", bulk.get(f"peerup-{kind}", {}).get("mb_per_s"), goal, "MB/s", socat_mb)
    peak = memory.worst(results, "per_connection_kib")
    if peak is not None:
        n = results["memory"]["peerup-relayed"]["connections"]
        add(
            f"memory per connection at peak, {n} relayed tunnels pulling (worst process)",
            peak,
            64,
            "KiB",
            None,
            le=True,
        )
    return out


def targets_table(results: dict[str, Any]) -> str:
    lines = [
        "### Targets of issue #16",
        "",
        'Bulk and memory from the sections above (their own runs); "vs socat" is the same case through socat.',
        "",
        "| target | measured | goal | met | vs socat |",
        "|---|---|---|---|---|",
    ]
    for t in targets(results):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        digits = 1 if t["goal"].endswith(("MB/s", "KiB")) else 0
        lines.append(f"| {t['target']} | {num(t['measured'], digits)} | {t['goal']} | {met} | {t['vs_socat']} |")
    return "\n".join(lines)
