"""A worker served in a thread of this process, beside a tool's own work (the demo's
replay, the bench's producer): its error kept for the tool's thread to raise."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.loop import Worker


class Served:
    """``worker`` run in a daemon thread (one that could not be stopped never holds up
    the exit); ``error``: what ended its run, once it has ended so."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # surfaced in the tool's thread
            self.error = e
