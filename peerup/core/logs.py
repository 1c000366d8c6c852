"""One WARNING per key per minute: refusals and protocol errors must not flood the log.

A flood of refused streams, hostile handshakes or broken frames would
otherwise write a line each; the operator needs to know that it happens, from
whom and why, not every instance. Used by the runtime (refused service
streams), the relay policy, the admission gate and the yamux session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

#: A repeated message (same key) is logged at WARNING at most this often, in seconds.
EVERY = 60.0
#: Keys remembered at once; beyond it the ones that no longer silence anything go.
MAX_KEYS = 10_000


class OncePer:
    """``warning(key, ...)`` logs at WARNING the first time for ``key`` in ``every`` seconds, else at DEBUG."""

    def __init__(self, logger: logging.Logger, every: float = EVERY, max_keys: int = MAX_KEYS) -> None:
        self._log = logger
        self._every = every
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}

    def warning(self, key: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args``; True when it went out at WARNING."""
        now = time.monotonic()
        if now - self._last.get(key, -self._every) < self._every:
            self._log.debug(message, *args)
            return False
        if len(self._last) >= self._max_keys:
            # Bounded under a flood of distinct keys: expired entries silence nothing.
            self._last = {k: t for k, t in self._last.items() if now - t < self._every}
            if len(self._last) >= self._max_keys:
                self._last.clear()
        self._last[key] = now
        self._log.warning(message, *args)
        return True
