"""One small case of each benchmark section, so `python -m benchmarks.run` cannot rot unnoticed.

The full runs (minutes, on a quiet machine) live in benchmarks/ and their
numbers in docs/performance.md. Here each section runs once at a tiny size
through the same real processes (relay, serving node, proxy, Redis) on the relayed path.
The asserts are about what a reader of those tables relies on: every byte
was checked, no request or tunnel failed, and every figure the tables print
is there. Nothing is asserted about speed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks import bulk, concurrency, latency, memory, small


def test_small_messages_section_runs_redis_echo_and_tunnel_opens(tmp_path: Path) -> None:
    result = small.smoke(tmp_path, requests=200)
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        redis = result["redis"]
        assert redis["requests"] == 200
        assert redis["rps"] > 0 and 0 < redis["p50_ms"] <= redis["p99_ms"]
        assert set(redis["cpu_s_per_10k"]) >= {"relay", "serve", "proxy"}
    else:
        assert result["redis"] == {"unavailable": True}
    assert result["echo"]["requests"] == 20 and result["echo"]["rps"] > 0
    tunnels = result["tunnels"]
    assert (tunnels["ok"], tunnels["failures"]) == (20, 0), tunnels["failure_examples"]


def test_bulk_section_verifies_every_byte(tmp_path: Path) -> None:
    result = bulk.smoke(tmp_path, mib=1)
    assert result["verified"] is True
    assert result["bytes"] == 1 << 20


def test_latency_section_measures_warm_first_bytes(tmp_path: Path) -> None:
    result = latency.smoke(tmp_path, samples=3)
    assert result["warm"]["samples"] == 3
    assert result["rtt32_p50_ms"] > 0


@pytest.mark.parametrize("section", [concurrency, memory], ids=["concurrency", "memory"])
def test_concurrency_and_memory_sections_bring_every_tunnel_up(tmp_path: Path, section: object) -> None:
    result = section.smoke(tmp_path, n=10, each=16 * 1024)  # type: ignore[attr-defined]
    row = result.get("peerup-relayed", result)
    assert (row["connections"], row["failures"]) == (10, 0), row["failure_examples"]
    assert set(row["memory"]) == {"relay", "serve", "proxy"}
