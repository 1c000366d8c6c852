"""Built-in ``retry_policy``: exponential backoff with a cap (seed ADR-A02)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from peerup.core.hookspecs import hookimpl
from peerup.core.settings import Retry, ServiceSettings, Settings


@dataclass(frozen=True)
class ExponentialBackoff:
    """``initial``, ``initial*multiplier``, ... each capped at ``max_delay``; ``retries`` values."""

    retries: int = 3
    initial: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 60.0

    @classmethod
    def from_settings(cls, retry: Retry) -> ExponentialBackoff:
        return cls(retry.retries, retry.initial, retry.multiplier, retry.max_delay)

    def delays(self) -> Iterator[float]:
        delay = self.initial
        for _ in range(self.retries):
            yield min(delay, self.max_delay)
            delay *= self.multiplier


@hookimpl(trylast=True)
def retry_policy(settings: Settings, service: ServiceSettings | None) -> ExponentialBackoff:
    return ExponentialBackoff.from_settings(settings.retry)
