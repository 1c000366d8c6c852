"""The retry policy: the seed's delays, the cap, and what counts as retryable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from peerup.core.errors import PeerNotFound, RetriesExhausted, ServiceError
from peerup.core.retry import call_with_retry
from peerup.plugins.backoff import ExponentialBackoff


def test_default_backoff_is_1_2_4() -> None:
    assert list(ExponentialBackoff().delays()) == [1, 2, 4]


def test_backoff_is_capped_at_60_seconds() -> None:
    assert list(ExponentialBackoff(retries=9).delays()) == [1, 2, 4, 8, 16, 32, 60, 60, 60]


@pytest.mark.anyio
async def test_failed_attempts_sleep_the_policy_delays_then_give_up() -> None:
    slept: list[float] = []
    attempts = 0

    async def sleep(delay: float) -> None:
        slept.append(delay)

    async def attempt() -> str:
        nonlocal attempts
        attempts += 1
        raise PeerNotFound("peer X not found")

    with pytest.raises(RetriesExhausted, match=r"^ssh on X: peer X not found \(gave up after 4 attempts\)$"):
        await call_with_retry(ExponentialBackoff(), attempt, "ssh on X", sleep=sleep)
    assert slept == [1, 2, 4]
    assert attempts == 4


@pytest.mark.anyio
async def test_success_after_failures_returns_value() -> None:
    results: Iterator[PeerNotFound | str] = iter([PeerNotFound("x"), PeerNotFound("x"), "stream"])

    async def attempt() -> str:
        item = next(results)
        if isinstance(item, Exception):
            raise item
        return item

    async def sleep(delay: float) -> None:
        pass

    assert await call_with_retry(ExponentialBackoff(), attempt, "svc", sleep=sleep) == "stream"


@pytest.mark.anyio
async def test_refused_service_is_not_retried() -> None:
    calls = 0

    async def attempt() -> str:
        nonlocal calls
        calls += 1
        raise ServiceError("refused", "local service refused")

    with pytest.raises(ServiceError):
        await call_with_retry(ExponentialBackoff(), attempt, "svc")
    assert calls == 1
