"""``retry_policy`` with decorrelated jitter and a per-process retry budget.

Why: the built-in backoff waits exactly 1, 2, 4 s. When a relay restarts, every
peer that lost it fails at the same moment and retries at the same moments, so
the relay gets the whole crowd at once, again and again (a thundering herd).
Decorrelated jitter (``sleep = min(cap, uniform(base, 3 * sleep))``, from the
AWS architecture blog "Exponential Backoff And Jitter") spreads those retries
out; the budget caps how many retries one process may spend in a burst, so a
node proxying many connections does not multiply the crowd.

Select it with ``peerup run --plugin jitter`` or ``plugins = ["jitter"]``; it is
asked before the built-in ``backoff``, which may also be turned off
(``--disable-plugin backoff``). Settings live in ``[plugin.jitter]``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from peerup.core.hookspecs import hookimpl
from peerup.core.settings import PluginSettings, ServiceSettings, Settings
from pydantic import Field, model_validator

__all__ = ["DecorrelatedJitter", "JitterPlugin", "JitterSettings", "RetryBudget"]

log = logging.getLogger("peerup.jitter")

SECTION = "jitter"


class JitterSettings(PluginSettings):
    """``[plugin.jitter]``. Unset ``retries``/``base``/``cap`` follow peerup's ``[retry]``.

    Following ``[retry]`` by default means swapping the plugin in keeps a
    deployment's tuning (how many retries, how long at most) and changes only
    the spacing.
    """

    section = SECTION

    retries: int | None = Field(None, ge=0, le=1000, description="retries per operation; default retry.retries")
    base: float | None = Field(None, gt=0, description="smallest delay; default retry.initial")
    cap: float | None = Field(None, gt=0, description="largest delay; default retry.max_delay")
    budget: float = Field(10.0, ge=0, description="retries this process may spend in a burst")
    budget_refill: float = Field(1.0, ge=0, description="retries per second the budget regains")
    seed: int | None = Field(None, description="seed the random source (reproducible delays); unset = OS entropy")

    @model_validator(mode="after")
    def _cap_not_below_base(self) -> JitterSettings:
        if self.base is not None and self.cap is not None and self.cap < self.base:
            raise ValueError(f"cap ({self.cap:g}) must not be below base ({self.base:g})")
        return self


class RetryBudget:
    """A token bucket shared by every operation of one process.

    Each retry takes one token; tokens come back at ``refill`` per second up to
    ``capacity``. First attempts are never charged: the budget limits extra
    load, not normal traffic.
    """

    def __init__(self, capacity: float, refill: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.refill = refill
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()

    @property
    def tokens(self) -> float:
        self._top_up()
        return self._tokens

    def try_spend(self) -> bool:
        self._top_up()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def _top_up(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.refill)
        self._stamp = now


@dataclass
class DecorrelatedJitter:
    """The policy object the core asks for delays (``RetryPolicy`` protocol).

    Each delay is drawn from ``[base, 3 * previous]`` and capped, so two peers
    that failed together drift apart after one retry instead of staying in step.
    A delay is only handed out if the budget pays for it; when it cannot, the
    iterator ends and the core reports the operation as given up.
    """

    retries: int
    base: float
    cap: float
    rng: random.Random = field(default_factory=random.Random)
    budget: RetryBudget | None = None

    def delays(self) -> Iterator[float]:
        sleep = self.base
        for _ in range(self.retries):
            if self.budget is not None and not self.budget.try_spend():
                log.warning("retry budget spent (%g per burst, %g/s back): not retrying now", *self._budget_shape())
                return
            sleep = min(self.cap, self.rng.uniform(self.base, sleep * 3))
            yield sleep

    def _budget_shape(self) -> tuple[float, float]:
        assert self.budget is not None
        return self.budget.capacity, self.budget.refill


class JitterPlugin:
    """The ``jitter`` entry point; peerup makes one per process, so the budget is per process."""

    settings_model = JitterSettings

    def __init__(self) -> None:
        self._settings: JitterSettings | None = None
        self._budget: RetryBudget | None = None
        self._rng = random.Random()

    def section(self, settings: Settings) -> JitterSettings:
        """The typed ``[plugin.jitter]`` (peerup validated it at start); a changed section gets a fresh budget."""
        section = settings.plugin_settings(JitterSettings)
        if section != self._settings:
            self._settings = section
            self._budget = RetryBudget(section.budget, section.budget_refill)
            self._rng = random.Random(section.seed)
        return section

    @hookimpl
    def retry_policy(self, settings: Settings, service: ServiceSettings | None) -> DecorrelatedJitter:
        section = self.section(settings)
        retry = settings.retry
        base = section.base if section.base is not None else retry.initial
        cap = section.cap if section.cap is not None else retry.max_delay
        return DecorrelatedJitter(
            retries=section.retries if section.retries is not None else retry.retries,
            base=base,
            cap=max(cap, base),
            rng=self._rng,
            budget=self._budget,
        )
