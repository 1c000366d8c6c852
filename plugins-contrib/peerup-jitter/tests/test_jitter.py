"""The jitter plugin swapped in for the built-in backoff: observed delays, spread, budget, settings.

Delays are observed, not read back from the policy: a probe plugin asked first
for ``discover_peer`` records when each attempt starts and answers with an
address where nothing listens, so each attempt is a real libp2p dial that is
refused. The core logs each failure just before it sleeps; the time from that
log record to the next attempt's start is the delay actually slept.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from peerup.core.errors import ConfigError, PeerupError
from peerup.core.hookspecs import hookimpl
from peerup.core.node import Node, PeerRecord
from peerup.core.plugins import describe_plugins, load_plugins
from peerup.core.runtime import Runtime
from peerup.core.settings import Settings, load_settings
from peerup.plugins.backoff import ExponentialBackoff
from peerup.plugins.libp2p.identity import create_identity
from peerup.testing import free_port, make_settings

from peerup_jitter import DecorrelatedJitter, JitterPlugin, RetryBudget

RETRY = {"retries": 4, "initial": 0.05, "multiplier": 2.0, "max_delay": 0.5}
DOUBLING = [0.05, 0.1, 0.2, 0.4]


class AttemptClock:
    """Asked first for discover_peer: notes the time, answers with a closed port."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.dead = f"/ip4/127.0.0.1/tcp/{free_port()}"

    @hookimpl
    def discover_peer(self, node: Node, peer_id: str, settings: Settings) -> PeerRecord:
        self.starts.append(time.time())  # the clock log records use
        return PeerRecord(peer_id, (f"{self.dead}/p2p/{peer_id}",), source="attempt-clock")

    def slept(self, caplog: pytest.LogCaptureFixture) -> list[float]:
        """From each "attempt N failed ... retrying" record to the next attempt's start."""
        failed = [r.created for r in caplog.records if r.name == "peerup.retry" and "retrying in" in r.getMessage()]
        return [start - at for at, start in zip(failed, self.starts[1:], strict=True)]


@asynccontextmanager
async def client(
    tmp_path: Path, selected: list[str], disabled: list[str], **values: Any
) -> AsyncIterator[tuple[Runtime, Node, AttemptClock]]:
    """A real libp2p node with the plugins selected as ``--plugin``/``--disable-plugin`` would."""
    settings = make_settings(tmp_path / "client", retry=RETRY, **values)
    host = load_plugins(selected, disabled)
    clock = AttemptClock()
    host.register("attempt-clock", clock, origin="attempt-clock")
    runtime = Runtime(settings, host)
    async with runtime.node() as node:
        yield runtime, node, clock


def absent_peer(tmp_path: Path) -> str:
    """A valid peer ID nobody runs: every attempt fails fast and is retried."""
    return create_identity(tmp_path / "absent")


def expected_jitter(seed: int, retries: int, base: float, cap: float) -> list[float]:
    rng, sleep, out = random.Random(seed), base, []
    for _ in range(retries):
        sleep = min(cap, rng.uniform(base, sleep * 3))
        out.append(sleep)
    return out


@pytest.mark.anyio
async def test_observed_delays_are_jittered_and_backoff_can_be_turned_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same scenario, same [retry]: built-in doubles exactly; jitter follows its random draw."""
    caplog.set_level(logging.WARNING, logger="peerup.retry")
    peer = absent_peer(tmp_path)
    seed = 7
    expected = expected_jitter(seed, 4, 0.05, 0.5)
    assert max(abs(a - b) for a, b in zip(expected, DOUBLING, strict=True)) > 0.05  # the seed is telling
    async with client(tmp_path, [], []) as (runtime, node, builtin):
        with anyio.fail_after(10), pytest.raises(PeerupError, match="gave up after 5 attempts"):
            await runtime.open_service_stream(node, peer, "svc")
    builtin_slept = builtin.slept(caplog)
    caplog.clear()
    jitter = {"jitter": {"seed": seed}}
    async with client(tmp_path, ["jitter"], ["backoff"], plugin=jitter) as (runtime, node, jittered):
        assert "backoff" not in runtime.plugins.plugin_names()
        with anyio.fail_after(10), pytest.raises(PeerupError, match="gave up after 5 attempts"):
            await runtime.open_service_stream(node, peer, "svc")
    jitter_slept = jittered.slept(caplog)
    assert builtin_slept == pytest.approx(DOUBLING, abs=0.03)
    assert jitter_slept == pytest.approx(expected, abs=0.03)
    assert all(0.05 <= delay <= 0.5 + 0.03 for delay in jitter_slept)


@pytest.mark.anyio
async def test_budget_caps_retries_across_concurrent_operations(tmp_path: Path) -> None:
    """Four connections fail at once; a budget of 2 allows 2 retries in all, not 4 x 4."""
    peer = absent_peer(tmp_path)
    section = {"budget": 2, "budget_refill": 0, "base": 0.05, "cap": 0.1}
    async with client(tmp_path, ["jitter"], [], plugin={"jitter": section}) as (runtime, node, clock):
        failures: list[PeerupError] = []

        async def connect() -> None:
            try:
                await runtime.open_service_stream(node, peer, "svc")
            except PeerupError as exc:
                failures.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(connect)
    assert len(failures) == 4
    assert len(clock.starts) == 4 + 2


def test_many_peers_failing_together_do_not_retry_in_step(tmp_path: Path) -> None:
    """200 processes (one plugin each) lose the relay at once: their retries spread out."""
    create_identity(tmp_path)
    settings = Settings(home=tmp_path, retry={"retries": 3, "initial": 1.0, "max_delay": 60.0})
    builtin = [next(ExponentialBackoff.from_settings(settings.retry).delays()) for _ in range(200)]
    firsts, seconds = [], []
    for _ in range(200):
        policy = JitterPlugin().retry_policy(settings=settings, service=None)
        delays = list(policy.delays())
        firsts.append(delays[0])
        seconds.append(delays[0] + delays[1])
    assert set(builtin) == {1.0}  # the herd: everyone back at t = 1 s
    assert min(firsts) >= 1.0 and max(firsts) <= 3.0
    assert statistics.pstdev(firsts) > 0.4  # uniform over [1, 3] has 0.58
    assert statistics.pstdev(seconds) > statistics.pstdev(firsts)  # and they drift further apart
    assert len({round(second, 2) for second in seconds}) > 150


def test_budget_refills_over_time() -> None:
    now = [0.0]
    budget = RetryBudget(capacity=2, refill=0.5, clock=lambda: now[0])
    policy = DecorrelatedJitter(retries=5, base=0.1, cap=1.0, rng=random.Random(1), budget=budget)
    assert len(list(policy.delays())) == 2
    assert list(policy.delays()) == []
    now[0] = 2.0  # one token back
    assert len(list(policy.delays())) == 1


def _write(home: Path, text: str) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(text)


def test_section_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path, "[plugin.jitter]\nbase = 0.5\ncap = 4\nbudget = 3\n")
    monkeypatch.setenv("PEERUP_PLUGIN__JITTER__CAP", "8")
    section = JitterPlugin().section(load_settings(tmp_path))
    assert (section.base, section.cap, section.budget) == (0.5, 8.0, 3.0)


@pytest.mark.parametrize(
    ("config", "env", "message"),
    [
        ("base = 2\ncap = 1\n", {}, "{file}: [plugin.jitter] cap (1) must not be below base (2)"),
        ("bsae = 2\n", {}, "{file}: [plugin.jitter] bsae: Extra inputs are not permitted, got 2"),
        (
            "",
            {"PEERUP_PLUGIN__JITTER__BUDGET": "-1"},
            "environment variable PEERUP_PLUGIN__JITTER__BUDGET: [plugin.jitter] budget: "
            "Input should be greater than or equal to 0, got '-1'",
        ),
    ],
)
def test_bad_section_is_one_config_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, env: dict[str, str], message: str
) -> None:
    _write(tmp_path, "[plugin.jitter]\n" + config)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        JitterPlugin().section(load_settings(tmp_path))
    expected = message.format(file=tmp_path / "config.toml")
    assert str(info.value) == expected
    assert "\n" not in str(info.value)


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PEERUP_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "peerup", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_listed_by_peerup_plugins_and_selected_by_flag(tmp_path: Path) -> None:
    rows = {row.name: row for row in describe_plugins()}
    assert rows["jitter"].distribution == "peerup-jitter"
    assert not rows["jitter"].active
    assert set(rows["jitter"].hooks) == {"retry_policy"}

    listing = _cli(tmp_path, "plugins", "--plugin", "jitter", "--disable-plugin", "backoff")
    assert listing.returncode == 0, listing.stderr
    active = {line.split()[0]: line.split()[3] for line in listing.stdout.splitlines()[1:]}
    assert active["jitter"] == "yes" and active["backoff"] == "no"


def test_run_with_a_bad_section_fails_at_startup_in_one_line(tmp_path: Path) -> None:
    _write(tmp_path, "[plugin.jitter]\nbase = 0\n")
    result = _cli(tmp_path, "run", "--plugin", "jitter")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"peerup: error: {tmp_path / 'config.toml'}: [plugin.jitter] base: Input should be greater than 0, got 0"
    ]
