"""Prediction intervals: the spread a model is calibrated with, and its online adaptation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlstm.intervals import (
    LEVELS,
    LOG_M_LIMIT,
    Adaptive,
    Spread,
    adapted,
    calibrate,
    online_intervals,
    window_scale,
)


def test_the_spread_is_the_quantiles_of_the_scaled_error_per_step() -> None:
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.5, 20.0, size=20_000)
    err = rng.normal(size=(20_000, 2)) * np.array([1.0, 3.0]) * scale[:, None]
    spread = calibrate(err, np.zeros_like(err), scale)
    assert spread is not None
    assert spread.q.shape == (len(LEVELS), 2)
    # |N(0, s)| has its 90% quantile at 1.645 s: per step, whatever each window's scale.
    np.testing.assert_allclose(spread.at(0.9), [1.645, 3 * 1.645], rtol=0.03)
    assert spread.at(0.85) == pytest.approx((spread.at(0.8) + spread.at(0.9)) / 2)
    # Outside the levels measured, no width is known: 99.99% was given 99%'s, 30% 50%'s.
    for coverage in (1.0, 0.9999, 0.3):
        with pytest.raises(ValueError, match=r"coverage must be from 0\.5 to 0\.99, the levels"):
            spread.at(coverage)
    assert spread.at(0.99) == pytest.approx(spread.q[-1])


@pytest.mark.parametrize(
    ("y", "yhat", "scale"),
    [
        (np.ones((4, 1, 1)), np.ones((4, 1)), np.ones(4)),  # the article's targets
        (np.ones((4, 1)), np.ones(4), np.ones(4)),
        (np.ones((4, 2)), np.ones((4, 2)), np.ones(3)),
    ],
    ids=["targets-n-1-1", "forecasts-1d", "scales-short"],
)
def test_calibrate_refuses_shapes_that_would_broadcast(
    y: np.ndarray, yhat: np.ndarray, scale: np.ndarray
) -> None:
    """Targets of (N, 1, 1) against forecasts of (N, 1) gave a spread of (6, 4, 1), all
    zeros at the first step, without a word: the broadcast of the article's bug."""
    with pytest.raises(ValueError, match=r"need y and yhat of one shape \(N, horizon\)"):
        calibrate(y, yhat, scale)


def test_adapted_refuses_values_and_forecasts_of_other_lengths() -> None:
    """Three values for six forecasts left the last three bounds as uninitialised memory."""
    with pytest.raises(ValueError, match="got 3 values, 6 centres and 6 half-widths"):
        adapted(np.zeros(3), np.zeros(6), np.ones(6), 0.9)
    with pytest.raises(ValueError, match="got 6 values, 3 centres and 6 half-widths"):
        adapted(np.zeros(6), np.zeros(3), np.ones(6), 0.9)


def test_flat_windows_are_left_out_and_all_flat_is_no_spread() -> None:
    y, yhat = np.array([[1.0], [5.0]]), np.array([[0.0], [0.0]])
    spread = calibrate(y, yhat, np.array([1.0, 0.0]))
    assert spread is not None
    np.testing.assert_allclose(spread.q, 1.0)  # only the first window counts
    assert calibrate(y, yhat, np.zeros(2)) is None
    windows = np.array([[9.0, 1.0, 3.0], [7.0, 2.0, 2.0]])
    np.testing.assert_allclose(window_scale(windows, 2), [1.0, 0.0])  # the last 2 values


def test_a_spread_travels_in_a_checkpoints_meta_and_a_bad_one_falls_back() -> None:
    spread = Spread(np.tile(np.linspace(0.5, 3.0, len(LEVELS))[:, None], (1, 3)))
    back = Spread.from_meta({"spread": spread.to_meta()}, horizon=3)
    np.testing.assert_allclose(back.q, spread.q)
    for meta in [
        {},  # a checkpoint from before intervals
        {"spread": spread.to_meta() | {"levels": [0.9]}},
        {"spread": {"levels": list(LEVELS), "q": [[1.0]]}},  # another horizon's
        {"spread": {"levels": list(LEVELS), "q": [[-1.0] * 3] * len(LEVELS)}},
        {"spread": {"levels": list(LEVELS), "q": [[1.0, 2.0], [1.0]]}},  # ragged: planted
        {"spread": {"levels": list(LEVELS), "q": [["a"] * 3] * len(LEVELS)}},
        {"spread": {"levels": list(LEVELS), "q": {"x": 1}}},
        {"spread": {"levels": list(LEVELS), "q": [[math.inf] * 3] * len(LEVELS)}},
        {"spread": {"levels": list(LEVELS), "q": [[math.nan] * 3] * len(LEVELS)}},
        {"spread": {"levels": list(LEVELS), "q": [[10**400] * 3] * len(LEVELS)}},  # JSON's
    ]:
        # The fallback itself (the shape and a positive spread, the stored one had too).
        fallback = Spread.from_meta(meta, horizon=3)
        np.testing.assert_array_equal(fallback.q, Spread.from_meta({}, horizon=3).q)
        assert (fallback.at(0.9) > 0).all()


def test_the_multiplier_widens_on_a_miss_and_narrows_on_a_hit() -> None:
    adaptive = Adaptive(0.9, gamma=0.1)
    slots = np.array([0, 3])
    adaptive.update(slots, np.array([True, False]))
    np.testing.assert_allclose(adaptive.multiplier(slots), np.exp([0.1 * 0.9, -0.1 * 0.1]))
    adaptive.forget(np.array([0, 99]))
    assert adaptive.multiplier(np.array([0]))[0] == 1.0
    with pytest.raises(ValueError, match="coverage"):
        Adaptive(1.5)


def test_a_series_missed_for_ever_keeps_a_finite_multiplier() -> None:
    # 10,000 misses in a row would take log m to 900: exp of it is inf, and an interval
    # of inf is no number to publish.
    adaptive = Adaptive(0.9)
    slot = np.zeros(1, dtype=np.int64)
    for _ in range(10_000):
        adaptive.update(slot, np.array([True]))
    assert adaptive.multiplier(slot)[0] == pytest.approx(np.exp(LOG_M_LIMIT))
    for _ in range(10_000):
        adaptive.update(slot, np.array([False]))
    assert adaptive.multiplier(slot)[0] == pytest.approx(np.exp(-LOG_M_LIMIT))


def test_online_intervals_hold_their_coverage_from_a_wrong_start() -> None:
    # A spread twice too narrow: the multiplier finds the right width by itself.
    rng = np.random.default_rng(1)
    y = rng.normal(size=5_000)
    spread = Spread(np.repeat(np.asarray(LEVELS)[:, None], 1, axis=1) * 0.8)
    lo, hi, m = online_intervals(y, np.zeros_like(y), np.ones_like(y), spread, 0.9)
    inside = (lo <= y) & (y <= hi)
    assert 0.88 <= inside[1000:].mean() <= 0.92
    assert m[0] == 1.0  # each interval from the multiplier before its value arrived
    assert m[-1] == pytest.approx(1.645 / 0.72, rel=0.15)


@pytest.mark.parametrize("half", [0.3, 10.0])
def test_any_forecasters_intervals_adapt_to_their_coverage(half: float) -> None:
    """Intervals far too narrow or far too wide, around any centre (a statistical
    model's, in `evaluate --baselines`): adapted, they cover what they should."""
    rng = np.random.default_rng(2)
    y = 5 + rng.normal(size=5_000)
    centre = np.full_like(y, 5.0)
    lo, hi, m = adapted(y, centre, np.full_like(y, half), 0.9)
    inside = (lo <= y) & (y <= hi)
    assert 0.88 <= inside[1000:].mean() <= 0.92
    np.testing.assert_allclose((lo + hi) / 2, centre)
    assert m[-1] * half == pytest.approx(1.645, rel=0.15)


def test_a_constant_window_is_flat_at_any_level() -> None:
    """numpy's deviation of a constant window at a level with no exact binary form is
    rounding error (1e-17 at 0.1, 2e-10 at 1e6 + 0.1), where the model's is 0: flat all
    the same. A real swing, however small beside its level, is not."""
    levels = np.array([0.0, 0.1, 21.3, 1e6 + 0.1, -98765.4321])
    np.testing.assert_array_equal(window_scale(np.repeat(levels[:, None], 20, axis=1), 20), 0)
    swing = np.full((1, 20), 1e6)
    swing[0, ::2] += 1e-4  # 5e-11 of the level
    assert window_scale(swing, 20)[0] == pytest.approx(5e-5)
