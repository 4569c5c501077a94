"""The batch window cuts at max_batch entries or max_wait_ms after the first, on a fake
clock whose readings are exact in binary (so milliseconds come out whole)."""

from __future__ import annotations

from collections.abc import Callable

from worker.batch import BatchWindow


def _clock(start: float = 100.0) -> tuple[list[float], Callable[[], float]]:
    """The time it reads, as a one-item list a test moves forward, and the clock."""
    now = [start]
    return now, lambda: now[0]


def test_full_batch_is_cut_at_once() -> None:
    _, clock = _clock()
    window = BatchWindow(max_batch=4, max_wait_ms=500, clock=clock)
    window.add(3)
    assert window.room == 1
    assert window.block_ms() == 500
    window.add(1)
    assert window.room == 0
    assert window.block_ms() is None  # no time has passed: size alone cuts


def test_overfull_batch_is_cut() -> None:
    _, clock = _clock()
    window = BatchWindow(max_batch=4, max_wait_ms=500, clock=clock)
    window.add(6)
    assert window.block_ms() is None


def test_block_ms_counts_down_the_remaining_wait() -> None:
    now, clock = _clock()
    window = BatchWindow(max_batch=100, max_wait_ms=500, clock=clock)
    window.add(1)
    assert window.block_ms() == 500
    now[0] += 0.125
    assert window.block_ms() == 375
    now[0] += 0.25
    assert window.block_ms() == 125


def test_no_wait_once_the_deadline_has_passed() -> None:
    now, clock = _clock()
    window = BatchWindow(max_batch=100, max_wait_ms=500, clock=clock)
    window.add(1)
    now[0] += 0.5
    assert window.block_ms() is None
    now[0] += 1.0
    assert window.block_ms() is None


def test_less_than_a_millisecond_left_means_cut() -> None:
    now, clock = _clock()
    window = BatchWindow(max_batch=100, max_wait_ms=500, clock=clock)
    now[0] += 0.5 - 2 / 1024  # 1.95 ms left: wait 1 (whole ms, rounded down)
    assert window.block_ms() == 1
    now[0] += 1 / 1024  # 0.98 ms left: BLOCK 0 would wait forever, so cut
    assert window.block_ms() is None


def test_zero_wait_cuts_right_after_the_first_read() -> None:
    _, clock = _clock()
    window = BatchWindow(max_batch=100, max_wait_ms=0, clock=clock)
    window.add(1)
    assert window.room == 99
    assert window.block_ms() is None


def test_the_deadline_starts_when_the_window_is_made() -> None:
    now, clock = _clock()
    now[0] += 10.0  # time before the window exists does not count
    window = BatchWindow(max_batch=100, max_wait_ms=250, clock=clock)
    assert window.block_ms() == 250
