"""Online scoring: every one-step forecast against the value that arrives next.

Pure numpy over series slots, no I/O. Per series (:class:`Scorer`, one per partition
a worker serves), an exponential moving average of the absolute error (and of the naive
forecast's, the last value); overall (:class:`Overall`, one per worker), two moving
averages over time: a fast one (the rolling MAE) and a slow one (its recent level).
The fast one running well above the slow one is drift.
"""

from __future__ import annotations

import math

import numpy as np

from worker.state import rounds

SERIES_ALPHA = 0.05  # per-series EMA weight of each new error (about 14 values' half-life)
LEVEL_SLOWER = 10.0  # the level's half-life, in rolling-MAE half-lives


class Overall:
    """The worker's errors over time, whichever partition they came from."""

    def __init__(self, *, halflife_s: float) -> None:
        self.halflife_s = halflife_s
        self.mae = math.nan  # fast
        self.naive_mae = math.nan
        self.level = math.nan  # slow: what "usual" looks like
        self.scored = 0
        self._since = math.nan  # time of the last update
        self._started = math.nan

    def add(self, err: np.ndarray, naive: np.ndarray, now: float) -> None:
        """One batch's absolute errors, and the naive forecast's."""
        self.scored += err.size
        e, n = float(err.mean()), float(naive.mean())
        if math.isnan(self.mae):
            self.mae, self.naive_mae, self.level = e, n, e
            self._since = self._started = now
            return
        dt = max(now - self._since, 0.0)
        self._since = now
        fast = 1.0 - 0.5 ** (dt / self.halflife_s)
        slow = 1.0 - 0.5 ** (dt / (self.halflife_s * LEVEL_SLOWER))
        self.mae += fast * (e - self.mae)
        self.naive_mae += fast * (n - self.naive_mae)
        self.level += slow * (e - self.level)

    def drifting(self, ratio: float) -> bool:
        """The rolling MAE is ``ratio`` times its recent level, after at least one
        half-life of scores."""
        warmed = self._since - self._started >= self.halflife_s
        return bool(ratio > 0 and warmed and self.mae > ratio * self.level)

    def settle(self) -> None:
        """After a new model starts serving: its errors are the new usual."""
        self.level = self.mae


class Scorer:
    """The series of one partition, by slot; their errors also go to ``overall``."""

    def __init__(self, overall: Overall) -> None:
        self.overall = overall
        self._forecast = np.full(0, np.nan)  # (S,) the pending one-step forecast per slot
        self._last = np.full(0, np.nan)  # (S,) the last value per slot
        self.series_mae = np.full(0, np.nan)  # (S,) EMA of |error|
        self.series_naive_mae = np.full(0, np.nan)  # (S,) EMA of |naive error|

    def _fit(self, size: int) -> None:
        if size <= self._forecast.size:
            return
        grow = max(size, 2 * self._forecast.size, 64) - self._forecast.size
        pad = np.full(grow, np.nan)
        self._forecast = np.r_[self._forecast, pad]
        self._last = np.r_[self._last, pad]
        self.series_mae = np.r_[self.series_mae, pad]
        self.series_naive_mae = np.r_[self.series_naive_mae, pad]

    def forget(self, slots: np.ndarray) -> None:
        """Slots freed (their series idle): whoever takes one next starts unscored."""
        slots = slots[slots < self._forecast.size]
        for per_slot in (self._forecast, self._last, self.series_mae, self.series_naive_mae):
            per_slot[slots] = np.nan

    def update(
        self, slots: np.ndarray, values: np.ndarray, forecasts: np.ndarray, now: float
    ) -> int:
        """Score ``values`` (in stream order) against each slot's pending forecast, then
        make ``forecasts`` (NaN: none was made) the pending ones. Returns how many
        values were scored."""
        if slots.size == 0:
            return 0
        self._fit(int(slots.max()) + 1)
        errors, naive = [], []
        for idx in rounds(slots):
            s, v = slots[idx], values[idx]
            ok = ~np.isnan(self._forecast[s])
            if ok.any():
                so = s[ok]
                err = np.abs(v[ok] - self._forecast[so])
                nerr = np.abs(v[ok] - self._last[so])
                self.series_mae[so] = _ema(self.series_mae[so], err)
                self.series_naive_mae[so] = _ema(self.series_naive_mae[so], nerr)
                errors.append(err)
                naive.append(nerr)
            self._forecast[s] = forecasts[idx]
            self._last[s] = v
        if not errors:
            return 0
        err = np.concatenate(errors)
        self.overall.add(err, np.concatenate(naive), now)
        return int(err.size)


def _ema(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(old), new, old + SERIES_ALPHA * (new - old))
