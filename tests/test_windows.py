"""Windowing matches the obvious loop, and the split leaks nothing."""

from __future__ import annotations

import numpy as np
import pytest

from attnlstm.windows import (
    evenly,
    sampled_windows,
    series_windows,
    sliding_windows,
    sliding_windows_many,
    split_point,
    split_windows,
    time_split,
)


def _loop_windows(values: np.ndarray, window: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for i in range(len(values) - window - horizon + 1):
        xs.append(values[i : i + window])
        ys.append(values[i + window : i + window + horizon])
    return np.array(xs), np.array(ys)


@pytest.mark.parametrize(("window", "horizon"), [(1, 1), (5, 1), (20, 3), (7, 7)])
def test_sliding_windows_equal_the_loop(window: int, horizon: int) -> None:
    values = np.random.default_rng(0).normal(size=60)
    w = sliding_windows(values, window, horizon)
    x, y = _loop_windows(values, window, horizon)
    np.testing.assert_array_equal(w.x, x)
    np.testing.assert_array_equal(w.y, y)
    # start is where each target begins in the series
    np.testing.assert_array_equal(values[w.start], y[:, 0])
    assert w.y.shape == (len(w), horizon)  # 2-D targets: never (N, horizon, 1)


def test_windows_are_copies_not_views_of_the_series() -> None:
    values = np.arange(10.0)
    w = sliding_windows(values, 3)
    values[:] = -1
    assert w.x[0].tolist() == [0.0, 1.0, 2.0]


def test_too_short_series_gives_no_windows() -> None:
    w = sliding_windows(np.arange(4.0), window=4, horizon=1)
    assert len(w) == 0
    assert w.x.shape == (0, 4)
    assert w.y.shape == (0, 1)


def test_many_series_are_tagged_and_concatenated() -> None:
    a, b = np.arange(10.0), 100 + np.arange(6.0)
    w = sliding_windows_many([a, b], window=3, horizon=2)
    assert len(w) == 6 + 2
    assert w.series.tolist() == [0] * 6 + [1] * 2
    assert w.x[6].tolist() == [100.0, 101.0, 102.0]
    assert w.start[6:].tolist() == [3, 4]


def test_time_split_has_no_target_on_both_sides() -> None:
    lengths = [100, 37]
    series = [np.arange(n, dtype=float) for n in lengths]  # value == its own index
    w = sliding_windows_many(series, window=5, horizon=3)
    train, val = time_split(w, lengths, 0.2)
    for s, n in enumerate(lengths):
        cut = split_point(n, 0.2)
        tr, va = train.series == s, val.series == s
        assert train.y[tr].max() < cut  # every training target before the cut
        assert train.x[tr].max() < cut  # and so every training input
        assert val.y[va].min() >= cut  # every validation target at or after it
        assert set(train.y[tr].ravel()).isdisjoint(val.y[va].ravel())
        # windows straddling the cut are the only ones dropped
        assert tr.sum() + va.sum() == (n - 5 - 3 + 1) - 2


def test_split_windows_are_the_time_split_sliding_windows_unbuilt() -> None:
    rng = np.random.default_rng(2)
    series = [rng.normal(size=n) for n in (100, 9, 37, 60)]  # the second has no window
    lengths = [len(s) for s in series]
    want = time_split(sliding_windows_many(series, 6, 3), lengths, 0.25)
    got = split_windows(series, 6, 3, 0.25)
    for w, g in zip(want, got, strict=True):
        assert len(g) == len(w) > 0
        built = g.build()
        for field in ("x", "y", "start", "series"):
            np.testing.assert_array_equal(getattr(built, field), getattr(w, field))
        rows = np.array([len(w) - 1, 0, 3])
        np.testing.assert_array_equal(g.build(rows).x, w.x[rows])
        np.testing.assert_array_equal(g.take(rows).build().y, w.y[rows])
        np.testing.assert_array_equal(g.take(rows).start, w.start[rows])
        np.testing.assert_array_equal(g.recent(2).build().x, w.x[:, -2:])
        np.testing.assert_array_equal(g.recent(2).build().y, w.y)
    with pytest.raises(ValueError, match="window must be in"):
        got[0].recent(7)
    every = series_windows(series, 6, 3).build()
    want_every = sliding_windows_many(series, 6, 3)
    for field in ("x", "y", "start", "series"):
        np.testing.assert_array_equal(getattr(every, field), getattr(want_every, field))


def test_evenly_keeps_the_ends_and_at_most_the_limit() -> None:
    assert evenly(10, 10) == slice(None)
    rows = evenly(1000, 7)
    assert isinstance(rows, np.ndarray)
    assert rows.tolist() == [0, 166, 333, 500, 666, 832, 999]


def test_split_point_rejects_a_bad_fraction() -> None:
    assert split_point(1000, 0.2) == 800
    with pytest.raises(ValueError, match="val_fraction"):
        split_point(1000, 1.0)


def test_sampled_windows_are_the_sliding_windows_in_each_span() -> None:
    rng = np.random.default_rng(1)
    series = [rng.normal(size=n) for n in (40, 9, 55)]
    spans = [(12, 30), (0, 100), (50, 100)]  # the second is clipped to where windows fit
    everything = sliding_windows_many(series, 6, 2)
    first, stop = np.array(spans)[everything.series].T
    inside = (first <= everything.start) & (everything.start < stop)
    want = everything.take(inside)
    got = sampled_windows(series, 6, 2, spans, limit=10_000, seed=0)  # fewer: all of them
    for field in ("x", "y", "start", "series"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))

    sample = sampled_windows(series, 6, 2, spans, limit=7, seed=3)
    assert len(sample) == 7
    keys = set(zip(want.series.tolist(), want.start.tolist(), strict=True))
    picked = list(zip(sample.series.tolist(), sample.start.tolist(), strict=True))
    assert len(set(picked)) == 7
    assert set(picked) <= keys
    assert picked == sorted(picked)
    for x, y, k, s in zip(sample.x, sample.y, sample.series, sample.start, strict=True):
        np.testing.assert_array_equal(x, series[k][s - 6 : s])
        np.testing.assert_array_equal(y, series[k][s : s + 2])
    again = sampled_windows(series, 6, 2, spans, limit=7, seed=3)
    np.testing.assert_array_equal(again.start, sample.start)  # the seed decides
