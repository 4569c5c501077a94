"""Stop signals, caught from the first moment of an ``attnlstm worker`` process.

SIGTERM, SIGINT and SIGHUP ask the worker to finish the batch in flight, save its
windows, hand its leases back and exit. Caught only once the worker existed, a signal
during start-up (torch's import, the model's load: seconds) was lost where the process
is a container's PID 1, for which the kernel has no default action: `docker stop` then
waited out its grace period and killed the worker with its leases held. And a hang-up
(the terminal closed) killed it without its exit handlers, which left the embedded
server's directory behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
Handler = Callable[[int, Any], Any] | int  # a function, or signal.SIG_IGN / SIG_DFL


class StopRequest:
    """Whether a stop signal came, and what to call on one: the worker's ``stop``, once
    there is a worker."""

    def __init__(self) -> None:
        self.asked = False
        self._stop: Callable[[], None] | None = None

    def __call__(self, signum: int, frame: object) -> None:
        self.ask()

    def ask(self) -> None:
        """A stop, as a stop signal asks for one."""
        self.asked = True
        if self._stop is not None:
            self._stop()

    def route(self, stop: Callable[[], None]) -> None:
        """``stop`` called on every stop signal from now on, and at once if one came."""
        self._stop = stop
        if self.asked:
            stop()


@contextlib.contextmanager
def caught() -> Iterator[StopRequest]:
    """The stop signals caught (in the main thread) until the block ends."""
    request = StopRequest()
    with handled(STOP_SIGNALS, request):
        yield request


@contextlib.contextmanager
def handled(signals: Sequence[int], handler: Handler) -> Iterator[None]:
    """``handler`` for ``signals`` (in the main thread) until the block ends, then the
    handlers before it again."""
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


@contextlib.contextmanager
def deaf_children() -> Iterator[None]:
    """The processes started in the block deaf to Ctrl-C: SIGINT ignored, which a
    spawned process keeps across its exec (its mask it does not: multiprocessing resets
    that). Ctrl-C in a terminal reaches the whole process group, and a child is its
    parent's to stop; one that took it printed a traceback of what it was importing. A
    Ctrl-C in the block (milliseconds) is lost to the parent too. Only the main thread
    may set a handler: a child started from another thread (a worker's fine-tuning
    process, in a thread of the demo or the bench) must ignore SIGINT itself, first."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with handled((signal.SIGINT,), signal.SIG_IGN):
        yield
