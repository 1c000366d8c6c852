"""Human-readable tables for ``status``, ``peers`` and ``tunnels``; ``--json`` prints the API's answer as is."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]


def status(data: dict[str, Any]) -> list[str]:
    lines = [
        f"peer          {data['peer_id']}",
        f"version       {data['version']} (pid {data['pid']}, up {duration(data['uptime'])})",
        f"ready         {'yes' if data['ready'] else 'no (waiting for a relay slot)'}",
        f"reachability  {data['reachability']}",
    ]
    for relay in data["relays"]:
        state = f"slot held, expires in {duration(relay['expires_in'])}" if relay["reserved"] else "no slot"
        lines.append(f"relay         {relay['addr']}  {state}")
    lines += [f"address       {addr}" for addr in data["addresses"]]
    lines += [f"service       {name} -> {address}" for name, address in sorted(data["services"].items())]
    lines.append(f"tunnels       {data['tunnels']} forwards, {data['connections']} open connections")
    return lines


def peers(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no connected peers"]
    body = [
        (
            row["peer_id"],
            row["name"] or ("(relay)" if row["relay"] else "-"),
            row["path"],
            f"{row['rtt_ms']:.1f} ms" if row["rtt_ms"] is not None else "no answer",
            duration(row["connected_for"]),
        )
        for row in rows
    ]
    return table(("PEER", "NAME", "PATH", "RTT", "SINCE"), body)


def tunnels(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["no open tunnels"]
    body = []
    for row in rows:
        where = f"{row['bind']}:{row['port']}" if row["kind"] == "forward" else f"via {row.get('forward') or '-'}"
        conns = str(row["connections"]) if row["kind"] == "forward" else "-"
        body.append(
            (
                row["id"],
                row["kind"],
                row["service"],
                row["peer"],
                where,
                conns,
                size(row["bytes_up"]),
                size(row["bytes_down"]),
                duration(row["age"]),
            )
        )
    return table(("ID", "KIND", "SERVICE", "PEER", "LOCAL", "CONNS", "UP", "DOWN", "AGE"), body)
