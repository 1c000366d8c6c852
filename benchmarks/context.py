"""What a section gets from run.py: the sizes (:class:`Config`) and the processes (:class:`Context`).

Why a separate module: the sections import it and run.py imports the sections;
keeping it here avoids an import cycle. The bulk, latency and concurrency
sections share one set of processes, as they always did (their figures stay
comparable with earlier runs); memory and small messages start their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.topology import Bench


@dataclass
class Config:
    """Every size and count of a run; ``latest.json`` records it as ``config``."""

    bulk_mib: int = 256
    bulk_repeat: int = 3
    sizes_mib: list[int] = field(default_factory=lambda: [1, 16, 64])
    counts: list[int] = field(default_factory=lambda: [1, 10, 100, 500, 1000])
    concurrency_bytes_each: int = 64 * 1024
    cold_samples: int = 5
    warm_samples: int = 30
    ping_count: int = 50
    # small messages (benchmarks/small.py)
    small_seconds: float = 3.0  # each redis-benchmark case is sized to last about this long
    small_min_requests: int = 1000
    small_max_requests: int = 300_000
    small_clients: list[int] = field(default_factory=lambda: [1, 20, 100])
    small_pipelines: list[int] = field(default_factory=lambda: [1, 16])
    echo_clients: list[int] = field(default_factory=lambda: [1, 20])
    echo_each: int = 300  # round trips per client with 20 clients (x4 with one)
    tunnels: int = 1000
    tunnels_at_once: int = 20
    rounds: int = 1

    @classmethod
    def quick(cls) -> Config:
        return cls(
            bulk_mib=32,
            bulk_repeat=1,
            sizes_mib=[1, 8],
            counts=[10, 100],
            concurrency_bytes_each=16 * 1024,
            cold_samples=2,
            warm_samples=10,
            ping_count=10,
            small_seconds=1.0,
            small_min_requests=300,
            small_clients=[20],
            echo_each=100,
            tunnels=200,
        )

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Context:
    """One run: its config, a scratch directory, the variants to compare, the shared processes."""

    cfg: Config
    tmp: Path
    quick: bool = False
    #: label -> PEERUP_PATCHES_OFF value; the first is the reference (normally "shipped": "").
    variants: dict[str, str] = field(default_factory=lambda: {"shipped": ""})
    notes: list[str] = field(default_factory=list)
    _shared: Bench | None = None

    def shared(self) -> Bench:
        """The processes bulk, latency and concurrency measure, started on first use."""
        if self._shared is None:
            bench = Bench(self.tmp / "shared", self.quick)
            self._shared = bench
            (self.tmp / "shared").mkdir(parents=True, exist_ok=True)
            bench.setup()
            self.notes.extend(bench.notes)
        return self._shared

    def stop_shared(self) -> None:
        if self._shared is not None:
            self._shared.stop_all()
            self._shared = None
