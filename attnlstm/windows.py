"""Sliding windows over one series or many, vectorised, with a leak-free time split.

Every window records where its targets start (``start``) and which series it came
from (``series``), so baselines and plots can go back to the raw values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    def take(self, mask: np.ndarray) -> Windows:
        return Windows(self.x[mask], self.y[mask], self.start[mask], self.series[mask])


def sliding_windows(values: np.ndarray, window: int, horizon: int = 1) -> Windows:
    """All (window -> horizon) pairs of one series, as views copied once.

    >>> w = sliding_windows(np.arange(6.0), window=3, horizon=2)
    >>> w.x.tolist(), w.y.tolist(), w.start.tolist()
    ([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], [[3.0, 4.0], [4.0, 5.0]], [3, 4])
    """
    if window < 1 or horizon < 1:
        raise ValueError(f"window and horizon must be >= 1, got {window} and {horizon}")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D series, got shape {values.shape}")
    n = values.shape[0] - window - horizon + 1
    if n < 1:
        return Windows(
            np.empty((0, window)),
            np.empty((0, horizon)),
            np.empty(0, np.int64),
            np.empty(0, np.int64),
        )
    views = sliding_window_view(values, window + horizon)  # (n, window + horizon)
    return Windows(
        x=np.ascontiguousarray(views[:, :window]),
        y=np.ascontiguousarray(views[:, window:]),
        start=np.arange(window, window + n, dtype=np.int64),
        series=np.zeros(n, dtype=np.int64),
    )


def sliding_windows_many(series: Sequence[np.ndarray], window: int, horizon: int = 1) -> Windows:
    """Windows of several series (of any lengths), concatenated, tagged by series."""
    parts = [sliding_windows(s, window, horizon) for s in series]
    if not parts:
        raise ValueError("no series given")
    return Windows(
        x=np.concatenate([p.x for p in parts]),
        y=np.concatenate([p.y for p in parts]),
        start=np.concatenate([p.start for p in parts]),
        series=np.concatenate([np.full(len(p), i, dtype=np.int64) for i, p in enumerate(parts)]),
    )


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
    cuts = np.array([split_point(n, val_fraction) for n in lengths], dtype=np.int64)
    cut = cuts[windows.series]  # (N,)
    horizon = windows.y.shape[1]
    train = windows.start + horizon <= cut
    val = windows.start >= cut
    return windows.take(train), windows.take(val)
