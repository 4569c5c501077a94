"""Sliding windows over one series or many, vectorised, with a leak-free time split.

Every window records where its targets start (``start``) and which series it came
from (``series``), so baselines and plots can go back to the raw values. Windows are
kept unbuilt (:class:`SeriesWindows`: the series and those indices) until a batch of
them is read: a window of the day-ahead model is 817 values, so built windows hold
hundreds of times the data they come from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


@dataclass(frozen=True)
class Windows:
    x: np.ndarray  # (N, window) inputs, oldest first
    y: np.ndarray  # (N, horizon) targets, the steps right after the inputs
    start: np.ndarray  # (N,) index in its series of the first target step
    series: np.ndarray  # (N,) index of the series the window came from

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, mask: np.ndarray | slice) -> Windows:
        return Windows(self.x[mask], self.y[mask], self.start[mask], self.series[mask])


@dataclass(frozen=True)
class SeriesWindows:
    """Windows of several series, none of them built: the series end to end, and where
    each window's targets start in them. A day-ahead model reads 817 values a window, so
    that 100 series of 4,032 half-hourly values hold 2.6 GB of windows, but 3 MB of
    values; :meth:`build` makes the rows asked for, a batch at a time."""

    values: np.ndarray  # (total,) every series end to end
    first: np.ndarray  # (N,) index in values of each window's first target
    start: np.ndarray  # (N,) index in its series of the first target step
    series: np.ndarray  # (N,) index of the series the window came from
    window: int
    horizon: int

    def __len__(self) -> int:
        return int(self.first.shape[0])

    def build(self, rows: np.ndarray | slice = slice(None)) -> Windows:
        """The windows ``rows`` (all by default), as :func:`sliding_windows_many` makes them."""
        first = self.first[rows]
        return Windows(
            x=self.values[first[:, None] + np.arange(-self.window, 0)],
            y=self.values[first[:, None] + np.arange(self.horizon)],
            start=self.start[rows],
            series=self.series[rows],
        )

    def take(self, rows: np.ndarray | slice) -> SeriesWindows:
        """The windows ``rows`` (a mask or indices), still unbuilt."""
        return replace(
            self, first=self.first[rows], start=self.start[rows], series=self.series[rows]
        )

    def recent(self, window: int) -> SeriesWindows:
        """The same windows cut to their last ``window`` inputs."""
        if not 1 <= window <= self.window:
            raise ValueError(f"window must be in [1, {self.window}], got {window}")
        return replace(self, window=window)


def series_windows(series: Sequence[np.ndarray], window: int, horizon: int) -> SeriesWindows:
    """Every (window -> horizon) pair of several series, as :func:`sliding_windows_many`
    orders them, unbuilt.

    >>> w = series_windows([np.arange(5.0), np.arange(10.0, 13.0)], 2, 1)
    >>> w.build().x.tolist(), w.start.tolist(), w.series.tolist()
    ([[0.0, 1.0], [1.0, 2.0], [2.0, 3.0], [10.0, 11.0]], [2, 3, 4, 2], [0, 0, 0, 1])
    """
    if window < 1 or horizon < 1:
        raise ValueError(f"window and horizon must be >= 1, got {window} and {horizon}")
    if len(series) == 0:  # (`not` on a 2-D array of series was numpy's ValueError)
        raise ValueError("no series given")
    arrays = [np.asarray(s, dtype=np.float64) for s in series]
    for i, a in enumerate(arrays):
        if a.ndim != 1:
            raise ValueError(f"expected a 1-D series, got shape {a.shape}")
        if not np.isfinite(a).all():  # (training diverged on it; forecasts were NaN)
            at = int(np.argmin(np.isfinite(a)))
            raise ValueError(f"series {i} has a value that is not finite at {at}: {a[at]}")
    offsets = np.cumsum([0] + [a.size for a in arrays[:-1]])
    starts = [np.arange(window, a.size - horizon + 1, dtype=np.int64) for a in arrays]
    start = np.concatenate(starts)
    which = np.concatenate([np.full(s.size, i, dtype=np.int64) for i, s in enumerate(starts)])
    values = np.concatenate(arrays)
    return SeriesWindows(values, offsets[which] + start, start, which, window, horizon)


def split_windows(
    series: Sequence[np.ndarray], window: int, horizon: int, val_fraction: float
) -> tuple[SeriesWindows, SeriesWindows]:
    """``time_split(sliding_windows_many(series, window, horizon), lengths, val_fraction)``,
    in the same order, with no window built.

    >>> train, val = split_windows([np.arange(10.0)], 3, 1, 0.2)
    >>> train.build().x.tolist()[-1], val.build().x.tolist(), val.build().y.tolist()
    ([4.0, 5.0, 6.0], [[5.0, 6.0, 7.0], [6.0, 7.0, 8.0]], [[8.0], [9.0]])
    """
    every = series_windows(series, window, horizon)
    cuts = np.array([split_point(len(s), val_fraction) for s in series], dtype=np.int64)
    cut = cuts[every.series]
    return every.take(every.start + horizon <= cut), every.take(every.start >= cut)


def sliding_windows(values: np.ndarray, window: int, horizon: int = 1) -> Windows:
    """All (window -> horizon) pairs of one series, built.

    >>> w = sliding_windows(np.arange(6.0), window=3, horizon=2)
    >>> w.x.tolist(), w.y.tolist(), w.start.tolist()
    ([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], [[3.0, 4.0], [4.0, 5.0]], [3, 4])
    """
    return series_windows([values], window, horizon).build()


def sliding_windows_many(series: Sequence[np.ndarray], window: int, horizon: int = 1) -> Windows:
    """Windows of several series (of any lengths), concatenated, tagged by series, built."""
    return series_windows(series, window, horizon).build()


def sampled_windows(
    series: Sequence[np.ndarray],
    window: int,
    horizon: int,
    spans: Sequence[tuple[int, int]],
    limit: int,
    seed: int,
) -> Windows:
    """The windows of several series whose targets start in each series' span
    ``[first, stop)`` (clipped to where a window fits): all of them or, where they number
    more than ``limit``, a random ``limit`` of them (by ``seed``), in order. Only those
    are built: a day-ahead model reads 817 values a window, and every window of 1,000
    series of 1,360 values would be 3 GB.

    >>> w = sampled_windows([np.arange(8.0)], 3, 1, [(4, 8)], limit=2, seed=0)
    >>> w.x.shape, w.start.tolist() == sorted(w.start.tolist()), set(w.start) <= {4, 5, 6, 7}
    ((2, 3), True, True)
    """
    if len(spans) != len(series):
        raise ValueError(f"{len(series)} series but {len(spans)} spans")
    firsts = np.array([max(first, window) for first, _ in spans], dtype=np.int64)
    stops = np.array(
        [min(stop, len(s) - horizon + 1) for s, (_, stop) in zip(series, spans, strict=True)],
        dtype=np.int64,
    )
    counts = np.maximum(stops - firsts, 0)
    total = int(counts.sum())
    picked = np.arange(total)
    if total > limit:
        picked = np.sort(np.random.default_rng(seed).choice(total, size=limit, replace=False))
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, picked, side="right")  # the series of each pick
    start = firsts[which] + picked - (ends - counts)[which]
    x, y = np.empty((picked.size, window)), np.empty((picked.size, horizon))
    keys, at, lengths = np.unique(which, return_index=True, return_counts=True)  # sorted
    for k, lo, n in zip(keys, at, lengths, strict=True):
        views = sliding_window_view(np.asarray(series[k], dtype=np.float64), window + horizon)
        rows = slice(lo, lo + n)
        chosen = views[start[rows] - window]
        x[rows], y[rows] = chosen[:, :window], chosen[:, window:]
    return Windows(x, y, start, which.astype(np.int64))


def evenly(n: int, limit: int) -> np.ndarray | slice:
    """Rows of ``n`` to read, at most ``limit``: all of them, or ``limit`` evenly spaced
    from the first to the last.

    >>> evenly(5, 8), evenly(9, 3).tolist()
    (slice(None, None, None), [0, 4, 8])
    """
    if n <= limit:
        return slice(None)
    return np.linspace(0, n - 1, limit).round().astype(np.int64)


HELD_OUT = 0.2  # each series' tail that training never sees, by default: what is scored


def split_point(length: int, val_fraction: float) -> int:
    """Index where a series of ``length`` points enters its held-out tail."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return round(length * (1.0 - val_fraction))


def time_split(
    windows: Windows, lengths: Sequence[int], val_fraction: float
) -> tuple[Windows, Windows]:
    """Split into training and validation windows at each series' own time cut.

    A training window's targets all lie before the cut; a validation window's targets
    all lie at or after it (its inputs may reach back before the cut: that is history
    the forecaster would have had). Windows whose targets straddle the cut are
    dropped, so no target value is in both sets.
    """
    if len(windows) and windows.series.max() >= len(lengths):
        raise ValueError(
            f"windows of {windows.series.max() + 1} series, but {len(lengths)} lengths"
        )
    horizon = windows.y.shape[1]
    ends = np.asarray(lengths, dtype=np.int64)[windows.series]
    if (past := windows.start + horizon > ends).any():  # the lengths of other series
        i = int(np.argmax(past))
        raise ValueError(
            f"window {i} of series {windows.series[i]} has targets up to "
            f"{windows.start[i] + horizon}, past that series' length {ends[i]}: lengths "
            "must be those of the series the windows were cut from"
        )
    cuts = np.array([split_point(n, val_fraction) for n in lengths], dtype=np.int64)
    cut = cuts[windows.series]  # (N,)
    train = windows.start + horizon <= cut
    val = windows.start >= cut
    return windows.take(train), windows.take(val)
