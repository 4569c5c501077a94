"""Online scoring: each forecast against the value that came next, per series."""

from __future__ import annotations

import numpy as np
import pytest

from worker.online.scoring import Overall, Scorer


def test_each_value_is_scored_against_its_series_last_forecast() -> None:
    scorer = Scorer(Overall(halflife_s=10))
    nan = np.nan
    # Series 0 and 1; series 0 twice in one batch: its second value is scored against
    # the forecast made for its first, within the batch.
    assert (
        scorer.update(
            np.array([0, 1, 0]), np.array([1.0, 5.0, 2.0]), np.array([2.5, 5.5, 3.0]), now=0.0
        )
        == 1
    )
    assert scorer.series_mae[0] == pytest.approx(0.5)  # |2.0 - 2.5|
    assert scorer.series_naive_mae[0] == pytest.approx(1.0)  # |2.0 - 1.0|
    assert np.isnan(scorer.series_mae[1])  # nothing to score yet
    # No forecast was made for series 1's next value (warming, say): not scored after.
    assert scorer.update(np.array([1, 0]), np.array([6.0, 3.0]), np.array([nan, nan]), 1.0) == 2
    assert scorer.series_mae[1] == pytest.approx(0.5)  # |6.0 - 5.5|
    assert scorer.update(np.array([1]), np.array([7.0]), np.array([8.0]), 2.0) == 0
    assert scorer.overall.scored == 3


def test_drift_is_the_rolling_mae_far_above_its_level() -> None:
    scorer = Scorer(Overall(halflife_s=5))
    slots = np.arange(50)
    values = np.zeros(50)
    drifted_at = None
    for step in range(1200):
        now = step * 0.05  # a batch every 50 ms, one value per series
        error = 0.1 if now < 40 else 0.4
        scorer.update(slots, values, values + error, now)
        if scorer.overall.drifting(1.5):
            drifted_at = now if drifted_at is None else drifted_at
            scorer.overall.settle()
    assert scorer.overall.mae == pytest.approx(0.4, rel=0.05)
    assert drifted_at is not None
    assert 40 < drifted_at < 45  # not before the change; within a second or so of it
    assert not scorer.overall.drifting(1.5)  # settled: the new errors are the new usual


def test_a_freed_slot_starts_unscored_for_the_series_that_takes_it() -> None:
    scorer = Scorer(Overall(halflife_s=10))
    scorer.update(np.array([0, 0]), np.array([1.0, 2.0]), np.array([5.0, 9.0]), now=0.0)
    assert np.isfinite(scorer.series_mae[0])
    scorer.forget(np.array([0, 10_000]))  # a slot past the scorer's arrays is nothing to it
    assert np.isnan(scorer.series_mae[0])
    # The next series in slot 0 is not scored against the old one's forecast (9.0).
    assert scorer.update(np.array([0]), np.array([100.0]), np.array([101.0]), now=1.0) == 0
