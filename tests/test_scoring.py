"""Online scoring: each forecast against the value that came next, per series."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import numpy as np
import pytest

from attnlstm.intervals import GAMMA, Spread, online_intervals, window_scale
from worker.online.scoring import AVERAGES, STEP_SERIES, Overall, Scored, Scorer, Steps


def _update(
    scorer: Scorer, slots: list[int], values: list[float], yhat: list[float], now: float
) -> Scored:
    """One-step forecasts from windows of deviation 1."""
    n = len(slots)
    one = np.array(yhat)[:, None]
    return scorer.update(np.array(slots), np.array(values), one, np.ones(n), now)


def test_each_value_is_scored_against_its_series_last_forecast() -> None:
    scorer = Scorer(Overall(halflife_s=10))
    nan = np.nan
    # Series 0 and 1; series 0 twice in one batch: its second value is scored against
    # the forecast made for its first, within the batch.
    assert _update(scorer, [0, 1, 0], [1.0, 5.0, 2.0], [2.5, 5.5, 3.0], now=0.0).count == 1
    assert scorer.series_mae[0] == pytest.approx(0.5)  # |2.0 - 2.5|
    assert scorer.series_naive_mae[0] == pytest.approx(1.0)  # |2.0 - 1.0|
    assert np.isnan(scorer.series_mae[1])  # nothing to score yet
    # No forecast was made for series 1's next value (warming, say): not scored after.
    assert _update(scorer, [1, 0], [6.0, 3.0], [nan, nan], 1.0).count == 2
    assert scorer.series_mae[1] == pytest.approx(0.5)  # |6.0 - 5.5|
    assert _update(scorer, [1], [7.0], [8.0], 2.0).count == 0
    assert scorer.overall.scored == 3
    assert np.isnan(scorer.overall.coverage)  # no intervals asked for


def test_intervals_follow_the_spread_and_each_series_own_misses() -> None:
    half = np.array([1.0, 2.0])  # at 90%, in window deviations, per step ahead
    scorer = Scorer(Overall(halflife_s=10), half_width=half, coverage=0.9, threshold=3.0)
    yhat = np.array([[10.0, 11.0], [20.0, 21.0]])
    first = scorer.update(np.array([0, 1]), np.array([9.0, 19.0]), yhat, np.array([0.5, 2.0]), 0.0)
    np.testing.assert_allclose(first.lo, [[9.5, 10.0], [18.0, 17.0]])  # yhat - half * scale
    np.testing.assert_allclose(first.hi, [[10.5, 12.0], [22.0, 25.0]])
    # Series 0's value falls outside [9.5, 10.5], series 1's inside [18, 22]: series 0's
    # intervals widen, series 1's narrow, by the adaptive step.
    second = scorer.update(np.array([0, 1]), np.array([11.0, 20.5]), yhat, np.ones(2), 1.0)
    wider, narrower = np.exp(GAMMA * 0.9), np.exp(-GAMMA * 0.1)
    np.testing.assert_allclose(second.hi - yhat, [half * wider, half * narrower])
    assert scorer.overall.coverage == pytest.approx(0.5)
    # 11.0 is one half-width from 10: outside, not an anomaly at threshold 3.
    assert second.anomalies.size == 0


def test_a_value_threshold_half_widths_away_is_an_anomaly_with_what_it_broke() -> None:
    half = np.array([1.0])
    scorer = Scorer(Overall(halflife_s=10), half_width=half, coverage=0.9, threshold=3.0)
    one = np.array([[10.0], [5.0]])
    scorer.update(np.array([0, 1]), np.array([10.0, 5.0]), one, np.ones(2), 0.0)
    found = scorer.update(np.array([0, 1]), np.array([13.5, 7.9]), one, np.ones(2), 1.0)
    assert found.anomalies.tolist() == [0]  # 3.5 half-widths; series 1's 2.9 is not
    np.testing.assert_allclose(found.expected, [[10.0, 9.0, 11.0]])  # yhat, lo, hi it broke
    np.testing.assert_allclose(found.scores, [3.5])


def test_values_whose_forecasts_read_an_anomaly_are_not_judged_and_the_rest_are() -> None:
    # A model that reads the newest value and the one three before it (a lag, say):
    # after a spike, the next value and the fourth are not judged (their forecasts read
    # the spike), the second and the third are. Each flagged spike is followed on its
    # own: the value at 14 is four after the spike at 10 (read), two after the one at 12.
    reads = np.array([True, False, False, True])
    scorer = Scorer(Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0, reads=reads)
    spikes = {10, 11, 12, 14, 16, 20}
    flagged = []
    for t in range(24):
        value = 50.0 if t in spikes else 0.0
        if _update(scorer, [0], [value], [0.0], float(t)).anomalies.size:
            flagged.append(t)
    # 11 reads 10; 14 reads 10 (three before 13); 16 reads 12 (three before 15); 20 reads
    # none of them.
    assert flagged == [10, 12, 20]


def test_a_model_that_reads_its_whole_context_leaves_every_value_after_a_spike_unjudged() -> None:
    # The sines' model: a window of 20 and nothing else, so the 20 values after a spike
    # are not judged, and the 21st is.
    scorer = Scorer(
        Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0, reads=np.ones(20, bool)
    )
    flagged = [
        t
        for t in range(60)
        if _update(scorer, [0], [50.0 if t in (5, 25, 26) else 0.0], [0.0], float(t)).anomalies.size
    ]
    assert flagged == [5, 26]


def test_a_new_model_that_reads_more_values_follows_the_anomalies_as_they_came() -> None:
    # The worker hands the scorer each new model's reads: a series with no anomaly is
    # judged at once under the new model, one whose anomaly came two values before the
    # swap is not judged while the new model's forecasts read it.
    one = np.ones(1)
    scorer = Scorer(Overall(halflife_s=10), half_width=one, threshold=3.0, reads=np.ones(3, bool))
    _update(scorer, [0, 1], [0.0, 0.0], [0.0, 0.0], 0.0)
    assert _update(scorer, [0, 1], [0.0, 50.0], [0.0, 0.0], 1.0).anomalies.tolist() == [1]
    _update(scorer, [0, 1], [0.0, 0.0], [0.0, 0.0], 2.0)
    scorer.reads = np.ones(10, bool)
    flagged = [
        _update(scorer, [0, 1], [50.0, 50.0], [0.0, 0.0], float(t)).anomalies.tolist()
        for t in range(3, 13)
    ]
    assert flagged == [[0]] + [[]] * 8 + [[1]]  # series 1: eleven values after its anomaly


def test_an_anomaly_is_handed_to_the_stand_in_as_found_and_the_values_after_it_are_judged() -> None:
    # In one batch, series 0: a spike, handed over with the forecast it broke before the
    # next value is judged (the stand-in makes the spike's own forecast again: 7); 7.0
    # then meets that forecast. 60 is found and stood in for; the 60 right after it stays
    # in the window (the series may have moved) and is followed, so the 50 after it, whose
    # forecast reads it, is not judged. Series 1's spike is stood in for.
    scorer = Scorer(
        Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0, reads=np.ones(3, bool)
    )
    _update(scorer, [0, 1], [0.0, 0.0], [0.0, 0.0], 0.0)
    slots = np.array([0, 1, 0, 0, 0, 0])
    yhat = np.zeros((6, 1))
    handed: list[tuple[list[int], list[float]]] = []

    def stand_in(at: np.ndarray, forecasts: np.ndarray) -> None:
        handed.append((at.tolist(), forecasts.tolist()))
        yhat[at[at == 0]] = 7.0

    values = np.array([50.0, 40.0, 7.0, 60.0, 60.0, 50.0])
    found = scorer.update(slots, values, yhat, np.ones(6), 1.0, stand_in=stand_in)
    assert found.anomalies.tolist() == [0, 1, 3, 4]
    assert handed == [([0, 1], [0.0, 0.0]), ([3], [0.0])]
    assert scorer.saved(np.array([0, 1]))["stood_in"].tolist() == [False, True]
    # Without a stand-in, every anomaly is followed: the 7.0 is not judged.
    scorer = Scorer(
        Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0, reads=np.ones(3, bool)
    )
    _update(scorer, [0], [0.0], [0.0], 0.0)
    found = scorer.update(slots[[0, 2, 3]], values[[0, 2, 3]], np.zeros((3, 1)), np.ones(3), 1.0)
    assert found.anomalies.tolist() == [0]


def test_a_stand_in_lies_within_three_usual_changes_of_the_value_before() -> None:
    # Series 0 moves by 1 a value (the naive forecast's mean error: 1), and its forecasts
    # are right until one reads a glitch nobody judged: 40 where 11 comes. 11 is flagged,
    # and stood in for by 13 (10 + 3 x 1), not by 40. Series 1's spike (90 where its
    # forecast, 11, is right) is stood in for by that forecast.
    scorer = Scorer(Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0)
    for t in range(10):
        _update(scorer, [0, 1], [float(t), float(t)], [t + 1.0, t + 1.0], float(t))
    handed: list[float] = []
    _update(scorer, [0, 1], [10.0, 10.0], [40.0, 11.0], 10.0)
    scorer.update(
        np.array([0, 1]),
        np.array([11.0, 90.0]),
        np.zeros((2, 1)),
        np.ones(2),
        11.0,
        stand_in=lambda at, forecasts: handed.extend(forecasts.tolist()),
    )
    assert handed == [13.0, 11.0]


def test_coverage_recovers_after_the_errors_triple() -> None:
    # One series, errors drawn from N(0, 1) and then N(0, 3): the multiplier brings the
    # share inside back to about 90% within a few hundred values.
    rng = np.random.default_rng(0)
    scorer = Scorer(Overall(halflife_s=1e9), half_width=np.array([1.645]), coverage=0.9)
    slot, zero = np.zeros(1, dtype=np.int64), np.zeros((1, 1))
    interval = scorer.update(slot, np.zeros(1), zero, np.ones(1), 0.0)
    inside = []
    for t in range(4000):
        value = rng.normal(0.0, 1.0 if t < 2000 else 3.0, size=1)
        inside.append(bool(interval.lo[0, 0] <= value[0] <= interval.hi[0, 0]))
        interval = scorer.update(slot, value, zero, np.ones(1), float(t))
    assert 0.87 <= np.mean(inside[:2000]) <= 0.93
    assert np.mean(inside[2000:2050]) < 0.8  # the change: many fall outside at first
    assert 0.87 <= np.mean(inside[2300:]) <= 0.93  # back within 300 values


def test_drift_is_the_rolling_mae_far_above_its_level() -> None:
    scorer = Scorer(Overall(halflife_s=5))
    slots = np.arange(50)
    values = np.zeros(50)
    drifted_at = None
    for step in range(1200):
        now = step * 0.05  # a batch every 50 ms, one value per series
        error = 0.1 if now < 40 else 0.4
        scorer.update(slots, values, (values + error)[:, None], np.ones(50), now)
        if scorer.overall.drifting(1.5):
            drifted_at = now if drifted_at is None else drifted_at
            scorer.overall.settle()
    assert scorer.overall.mae == pytest.approx(0.4, rel=0.05)
    assert drifted_at is not None
    assert 40 < drifted_at < 45  # not before the change; within a second or so of it
    assert not scorer.overall.drifting(1.5)  # settled: the new errors are the new usual


def test_a_freed_slot_starts_unscored_for_the_series_that_takes_it() -> None:
    scorer = Scorer(Overall(halflife_s=10))
    _update(scorer, [0, 0], [1.0, 2.0], [5.0, 9.0], now=0.0)
    assert np.isfinite(scorer.series_mae[0])
    scorer.forget(np.array([0, 10_000]))  # a slot past the scorer's arrays is nothing to it
    assert np.isnan(scorer.series_mae[0])
    # The next series in slot 0 is not scored against the old one's forecast (9.0).
    assert _update(scorer, [0], [100.0], [101.0], now=1.0).count == 0


def test_saved_scoring_restored_goes_on_as_the_scorer_it_came_from() -> None:
    """What a window checkpoint saves of each series' scoring (its pending forecast and
    interval, multiplier, values since its last anomalies) restored into a new scorer:
    the next values get the same intervals and anomalies as in the scorer that saved
    them."""
    rng = np.random.default_rng(0)
    half = np.array([1.0, 2.0])

    def scorer() -> Scorer:
        reads = np.array([True, False, True])
        return Scorer(Overall(halflife_s=10), half_width=half, threshold=3.0, reads=reads)

    def batch(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        slots = np.array([0, 1, 2, 0])
        values = rng.normal(size=4) * (3.0 if k % 3 == 0 else 1.0)  # misses, and anomalies
        return slots, values, rng.normal(size=(4, 2)), np.ones(4)

    first = scorer()
    for k in range(20):
        first.update(*batch(k), now=float(k))
    slots = np.array([0, 1, 2])
    second = scorer()
    second.restore(slots, first.saved(slots))
    found = 0
    for k in range(20, 40):
        args = batch(k)
        a, b = first.update(*args, now=float(k)), second.update(*args, now=float(k))
        np.testing.assert_array_equal(b.lo, a.lo)
        np.testing.assert_array_equal(b.hi, a.hi)
        np.testing.assert_array_equal(b.anomalies, a.anomalies)
        found += a.anomalies.size
    assert found > 0
    assert not np.allclose(first.adaptive.log_m[:3], 0.0)  # the multipliers had moved


def test_scoring_saved_as_a_quiet_count_restores_as_the_values_since_the_anomaly() -> None:
    # A checkpoint saved before 2026-12-03 holds, per series, how many values were left
    # unjudged after its last anomaly (out of the context). Restored, those values are
    # still not judged, and the next one is; a count of 0 leaves every value judged.
    def scorer() -> Scorer:
        return Scorer(
            Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0, reads=np.ones(5, bool)
        )

    first = scorer()
    _update(first, [0, 1], [0.0, 0.0], [0.0, 0.0], 0.0)
    slots = np.array([0, 1])
    saved = first.saved(slots)
    del saved["since"]
    saved["quiet"] = np.array([3, 0])
    second = scorer()
    second.restore(slots, saved)
    flagged = [
        _update(second, [0, 1], [50.0, 50.0], [0.0, 0.0], float(t)).anomalies.tolist()
        for t in range(1, 5)
    ]
    # Series 1 (position 1) is flagged at once, and then not for the five values after;
    # series 0 (position 0) after its three.
    assert flagged == [[1], [], [], [0]]
    saved["quiet"] = np.array([3, -1])
    with pytest.raises(ValueError, match="whole numbers"):
        scorer().restore(slots, saved)


def test_scoring_saved_before_stand_ins_restores_with_none_stood_in() -> None:
    first = Scorer(Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0)
    _update(first, [0, 1], [0.0, 0.0], [0.0, 0.0], 0.0)
    slots = np.array([0, 1])
    saved = first.saved(slots)
    del saved["stood_in"]
    second = Scorer(Overall(halflife_s=10), half_width=np.ones(1), threshold=3.0)
    second.restore(slots, saved)
    assert second.saved(slots)["stood_in"].tolist() == [False, False]
    np.testing.assert_array_equal(second.saved(slots)["since"], saved["since"])


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda s: s.pop("log_m"), "not"),
        (lambda s: s.update(log_m=np.array([0.0, np.nan])), "past"),
        (lambda s: s.update(log_m=np.array([0.0, 1e3])), "past"),  # an interval of inf
        (lambda s: s.update(since=np.array([[0, 1, 2, 3], [0, 0, -1, 0]])), "whole numbers"),
        (lambda s: s.update(since=np.full((2, 4), np.nan)), "whole numbers"),
        (lambda s: s.update(lo=np.zeros(3)), "do not match"),
        (lambda s: s.update(since=np.zeros(2, dtype=np.int64)), "do not match"),
        (lambda s: s.update(stood_in=np.array([1, 0])), "booleans"),
    ],
)
def test_saved_scoring_that_is_not_what_a_scorer_saves_is_refused(
    change: Callable[[dict[str, np.ndarray]], object], error: str
) -> None:
    first = Scorer(Overall(halflife_s=10), half_width=np.ones(1))
    _update(first, [0, 1], [1.0, 2.0], [1.5, 2.5], 0.0)
    slots = np.array([0, 1])
    saved = first.saved(slots)
    change(saved)
    second = Scorer(Overall(halflife_s=10), half_width=np.ones(1))
    with pytest.raises(ValueError, match=error):
        second.restore(slots, saved)
    assert np.isnan(second.saved(slots)["forecast"]).all()  # nothing taken


def test_a_flat_stretch_neither_flags_its_level_nor_narrows_the_intervals_after() -> None:
    """A sensor that reads 0.0 for hours (a closed valve, solar output at night): its
    windows are flat and its intervals zero wide. A value on the level is no anomaly
    (it was one, with score inf, each time the last one's window had passed), and its
    hits teach the multiplier nothing (1,200 of them took it to e^-9.9: then 84% of the
    values after the flat stretch fell outside their 90% intervals). A value off the
    level is outside a zero-wide interval: an anomaly, infinitely many half-widths out."""
    half = np.array([1.0])
    scorer = Scorer(Overall(halflife_s=10), half_width=half, coverage=0.9, threshold=5.0)
    for t in range(1200):
        flat = scorer.update(np.array([0]), np.array([0.0]), np.zeros((1, 1)), np.zeros(1), t)
        assert flat.anomalies.size == 0
    assert scorer.adaptive.multiplier(np.array([0]))[0] == 1.0
    off = scorer.update(np.array([0]), np.array([0.5]), np.ones((1, 1)), np.ones(1), 1200.0)
    assert off.scores.tolist() == [np.inf]


def test_a_value_whose_forecast_had_no_interval_is_not_judged() -> None:
    """A restart that turns intervals on (coverage 0 before) restores each series'
    pending forecast without one: its next value is neither an anomaly (it was, with
    score inf and bounds nan, for every series) nor a lesson for the multiplier."""
    before = Scorer(Overall(halflife_s=10))  # intervals off
    before.update(np.array([0, 1]), np.array([1.0, 2.0]), np.ones((2, 1)), np.ones(2), 0.0)
    slots = np.array([0, 1])
    after = Scorer(Overall(halflife_s=10), half_width=np.array([1.0]), threshold=5.0)
    after.restore(slots, before.saved(slots))
    found = after.update(slots, np.array([50.0, -50.0]), np.ones((2, 1)), np.ones(2), 1.0)
    assert found.anomalies.size == 0
    np.testing.assert_array_equal(after.adaptive.multiplier(slots), [1.0, 1.0])
    assert np.isfinite(found.lo).all()  # the forecasts made now have their intervals
    assert math.isnan(after.overall.coverage)  # nor counted inside: it was, at 1.0


def test_a_flat_level_that_rounds_is_no_anomaly() -> None:
    """The mean of twenty 0.11s is 0.11000000000000001: a forecast that far off a value
    on the level, its interval zero wide, made the value an anomaly of score inf (at
    0.11, 0.22, 0.42, 0.81, and about one two-decimal level in eight)."""
    scorer = Scorer(Overall(halflife_s=10), half_width=np.array([1.0]), threshold=5.0)
    rounded = np.full((1, 1), np.mean(np.full(20, 0.11)))
    assert rounded[0, 0] != 0.11
    for t in range(50):
        found = scorer.update(np.array([0]), np.array([0.11]), rounded, np.zeros(1), t)
        assert found.anomalies.size == 0
    assert scorer.overall.coverage == 1.0  # on the level: inside its interval
    off = scorer.update(np.array([0]), np.array([0.1100001]), rounded, np.zeros(1), 50.0)
    assert off.scores.tolist() == [np.inf]  # off the level by more than rounding


def test_at_a_threshold_of_one_an_event_is_a_value_outside_its_interval() -> None:
    """A value on a bound scored 1.000 by rounding (5,512 of 6,000 such cases): an event,
    where the coverage counted it inside."""
    scorer = Scorer(Overall(halflife_s=10), half_width=np.array([1.0]), threshold=1.0)
    forecast = np.array([[0.3]])
    scorer.update(np.array([0]), np.array([0.3]), forecast, np.array([0.7]), 0.0)
    for t, bound in enumerate(["hi", "lo"], start=1):
        value = scorer.saved(np.array([0]))[bound][0]  # the pending interval's
        on = scorer.update(np.array([0]), np.array([value]), forecast, np.array([0.7]), t)
        assert on.anomalies.size == 0, bound
    hi = scorer.saved(np.array([0]))["hi"][0]
    out = scorer.update(np.array([0]), np.array([np.nextafter(hi, np.inf)]), forecast,
                        np.array([0.7]), 3.0)  # fmt: skip
    assert out.anomalies.tolist() == [0]


def test_a_series_that_starts_afresh_meets_no_forecast_from_before_its_gap() -> None:
    """Idle past series_idle_s, a series' window starts again at its next value (while
    its slot was not swept: a partition all quiet, or a series alone in it); so does its
    scoring. Judged against the forecast from before the gap, a level that moved while
    the sensor was off was an anomaly, and its stand-in put the old level in the new
    window."""
    half = np.array([1.0])
    scorer = Scorer(Overall(halflife_s=10), half_width=half, coverage=0.9, threshold=5.0)
    slot = np.array([0])
    scorer.update(slot, np.array([10.0]), np.array([[10.0]]), np.ones(1), 0.0)
    scorer.adaptive.update(slot, np.array([True]))  # a miss before the gap
    found = scorer.update(
        slot, np.array([500.0]), np.array([[500.0]]), np.ones(1), 1.0, fresh=np.array([True])
    )
    assert (found.count, found.anomalies.size) == (0, 0)
    assert scorer.adaptive.multiplier(slot)[0] == 1.0
    again = scorer.update(slot, np.array([530.0]), np.array([[500.0]]), np.ones(1), 2.0)
    assert (again.count, again.scores.tolist()) == (1, [30.0])  # against the fresh one


def test_every_partition_of_a_batch_counts_by_its_number_of_values() -> None:
    """The worker scores a batch partition by partition, a call each at the batch's time.
    Each call weighed by the time since the one before, the first partition's values took
    the whole batch's weight: here a rolling MAE of 0.01 and a coverage of 1, for a
    partition scored right (300 values) beside one all wrong (100)."""
    overall = Overall(halflife_s=30)
    for batch in range(3000):  # a batch every 20 ms
        overall.add(np.full(300, 0.01), np.full(300, 1.0), np.zeros(300, bool), batch * 0.02)
        overall.add(np.full(100, 5.0), np.full(100, 1.0), np.ones(100, bool), batch * 0.02)
    assert overall.mae == pytest.approx((300 * 0.01 + 100 * 5.0) / 400)
    assert overall.level == pytest.approx(overall.mae)
    assert overall.coverage == pytest.approx(0.75)
    assert overall.scored == 3000 * 400


def test_a_batch_scored_in_parts_moves_every_average_as_the_batch_scored_at_once() -> None:
    """Partitions of a batch, scored a call each at the batch's time: every average, the
    step metrics' too, as if the batch's values had come in one call."""
    rng = np.random.default_rng(0)

    def part(n: int) -> tuple[np.ndarray, ...]:
        """One partition's errors, the naive forecast's, misses, and the errors and
        insides at each of 4 steps ahead (NaN: no forecast made that far back yet)."""
        step_err = rng.exponential(size=(n, 4))
        step_err[rng.random((n, 4)) < 0.3] = np.nan
        inside = np.where(np.isnan(step_err), np.nan, rng.random((n, 4)) < 0.9)
        err, naive = rng.exponential(size=n), rng.exponential(size=n)
        return err, naive, rng.random(n) < 0.2, step_err, inside

    split, whole = Overall(halflife_s=1), Overall(halflife_s=1)
    now = 0.0
    for _ in range(200):
        now += rng.uniform(0.0, 0.2)
        parts = [part(n) for n in rng.integers(0, 30, size=3)]
        for err, naive, missed, step_err, inside in parts:
            split.add(err, naive, missed, now, steps=(step_err, inside))
        err, naive, missed, step_err, inside = map(np.concatenate, zip(*parts, strict=True))
        whole.add(err, naive, missed, now, steps=(step_err, inside))
    for name in AVERAGES:
        np.testing.assert_allclose(getattr(split, name), getattr(whole, name), err_msg=name)
    assert np.isfinite(whole.step_mae).all()


def test_step_metrics_hold_a_small_error_at_a_large_level() -> None:
    """Forecasts right at every step, at a level of 1e7 + 0.3: each step's error is 0 and
    every value inside its interval (kept in float32, the forecasts were 1e7: an error of
    0.3 at every step, and no value inside)."""
    scorer = Scorer(Overall(halflife_s=30), half_width=np.ones(2), coverage=0.9)
    y = 1e7 + 0.3 + 0.01 * np.sin(0.3 * np.arange(203))
    for t in range(200):
        scorer.update(np.array([0]), y[t : t + 1], y[None, t + 1 : t + 3], np.full(1, 0.01), t)
    np.testing.assert_array_equal(scorer.overall.step_mae, [0.0, 0.0])
    np.testing.assert_array_equal(scorer.overall.step_coverage, [1.0, 1.0])


@pytest.mark.parametrize(("horizon", "sampled"), [(48, STEP_SERIES), (300, 11), (1025, 0)])
def test_the_step_sample_takes_at_most_24_mib_whatever_the_horizon(
    horizon: int, sampled: int
) -> None:
    """Each sampled series keeps its last ``horizon`` forecasts of ``horizon`` steps: at a
    checkpoint's horizon of 1,000, 128 series took 1.5 GB a partition. Past a horizon of
    90 fewer series are sampled, and past 1,024 none."""
    steps = Steps()
    tracemalloc.start()
    try:
        steps.fit(horizon)
        taken, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert taken <= 24 * 2**20 + 2**16  # the ring, and a little more
    slots, values = np.arange(200), np.zeros(200)
    yhat = np.zeros((200, horizon))
    for _ in range(2):
        err, inside = steps.update(slots, values, yhat, yhat - 1, yhat + 1)
    assert err.shape == inside.shape == (sampled, horizon)
    np.testing.assert_array_equal(err[:, 0], 0.0)  # the first step ahead, scored


def test_offline_intervals_adapt_as_the_worker_does_through_a_flat_stretch() -> None:
    """attnlstm.intervals.online_intervals replays the worker's intervals offline (the
    held-out report): through a flat stretch, whose intervals are zero wide, its
    multiplier learnt from each value on the level, and came out at 0.025 where the
    worker's stayed at 0.41 (65% of the values after it inside, not 92%)."""
    rng = np.random.default_rng(0)
    y = np.r_[np.sin(0.3 * np.arange(100)), np.zeros(300), np.sin(0.3 * np.arange(100))]
    y += np.r_[np.zeros(400), 0.02 * rng.standard_normal(100)]
    windows = np.lib.stride_tricks.sliding_window_view(y[:-1], 20)
    target, one = y[20:], windows[:, -1]  # the naive forecast
    scale, spread = window_scale(windows, 20), Spread.from_meta({}, 1)
    lo, hi, m = online_intervals(target, one, scale, spread, 0.9)
    scorer = Scorer(Overall(halflife_s=30), half_width=spread.at(0.9), coverage=0.9)
    slot = np.array([0])
    made = scorer.update(slot, np.zeros(1), one[:1, None], scale[:1], 0.0)
    worker_lo, worker_hi, worker_m = [made.lo[0, 0]], [made.hi[0, 0]], []
    after = zip(target, np.r_[one[1:], np.nan], np.r_[scale[1:], 0.0], strict=True)
    for t, (value, yhat, deviation) in enumerate(after, start=1):
        worker_m.append(scorer.adaptive.multiplier(slot)[0])
        made = scorer.update(slot, np.array([value]), np.array([[yhat]]), np.array([deviation]), t)
        worker_lo.append(made.lo[0, 0])
        worker_hi.append(made.hi[0, 0])
    np.testing.assert_allclose(m, worker_m, rtol=1e-12)
    np.testing.assert_allclose(lo, worker_lo[:-1], rtol=1e-12)
    np.testing.assert_allclose(hi, worker_hi[:-1], rtol=1e-12)
    assert m[380] == m[100]  # the flat windows' values taught the multiplier nothing
