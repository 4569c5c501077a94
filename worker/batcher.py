"""When to cut a batch: at ``max_batch`` entries, or ``max_wait_ms`` after the first
entry arrived, whichever comes first (Triton's dynamic batcher, RedisAI's
MINBATCHTIMEOUT). Pure logic; the worker asks it how long the next read may block."""

from __future__ import annotations

import time
from collections.abc import Callable


class BatchWindow:
    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_batch = max_batch
        self.size = 0
        self._clock = clock
        self._deadline = clock() + max_wait_ms / 1000  # the first entry is here now

    @property
    def room(self) -> int:
        return self.max_batch - self.size

    def add(self, n: int) -> None:
        self.size += n

    def block_ms(self) -> int | None:
        """How long the next read may wait for more, or None: cut the batch now.

        A blocking read takes whole milliseconds and BLOCK 0 means forever, so less
        than a millisecond left means cut."""
        if self.size >= self.max_batch:
            return None
        left_ms = int((self._deadline - self._clock()) * 1000)
        return left_ms if left_ms >= 1 else None
