"""Running an operation under a retry policy.

The policy is an object a plugin returns (``retry_policy`` hook), not a pair of
numbers, so a deployment can swap exponential backoff for jitter or a budget
without the core knowing (docs/adr/0002-retry-policy-object.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import anyio

from peerup.core.errors import PeerNotFound, PeerTimeout, PeerUnreachable, RetriesExhausted

log = logging.getLogger("peerup.retry")

T = TypeVar("T")

#: Failures another attempt might cure. A refused service or an unknown
#: service name will not change by waiting, so those are not retried.
RETRYABLE: tuple[type[Exception], ...] = (PeerNotFound, PeerUnreachable, PeerTimeout)


class RetryPolicy(Protocol):
    """Yields the delay before each retry; the number of values is the retry count."""

    def delays(self) -> Iterator[float]: ...


async def call_with_retry(
    policy: RetryPolicy,
    attempt: Callable[[], Awaitable[T]],
    what: str,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> T:
    """Await ``attempt()`` until it succeeds or the policy runs out of delays.

    Each failed attempt is logged with its reason and the coming delay, so a user
    watching ``-v`` output can tell a slow relay from a dead peer.
    """
    delays = policy.delays()
    number = 1
    while True:
        try:
            return await attempt()
        except RETRYABLE as exc:
            delay = next(delays, None)
            if delay is None:
                if number == 1:
                    raise
                raise RetriesExhausted(f"{what}: {exc} (gave up after {number} attempts)") from exc
            log.warning("%s: attempt %d failed: %s; retrying in %.1f s", what, number, exc, delay)
            await sleep(delay)
            number += 1
