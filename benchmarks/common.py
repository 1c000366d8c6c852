"""What the benchmark's processes share: the byte pattern and how to verify it."""

from __future__ import annotations

import random

#: Every byte the test service sends is PATTERN repeated from offset 0, so any
#: reader can check every byte it gets without the sender's help.
PATTERN_SIZE = 1 << 20
PATTERN = random.Random(7).randbytes(PATTERN_SIZE)
_DOUBLE = PATTERN + PATTERN


class Verifier:
    """Checks that a byte stream is PATTERN repeated from offset 0."""

    def __init__(self) -> None:
        self.offset = 0
        self.ok = True

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            start = self.offset % PATTERN_SIZE
            take = min(len(view), PATTERN_SIZE)
            if view[:take] != _DOUBLE[start : start + take]:
                self.ok = False
            self.offset += take
            view = view[take:]
