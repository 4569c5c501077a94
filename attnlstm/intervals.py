"""Prediction intervals: split-conformal spreads per step ahead, adapted online per series.

A forecast's error, divided by its window's standard deviation (the scale the model
standardises by), has much the same distribution on every series. So a model carries,
per step ahead, quantiles of that scaled error, measured on windows it did not train on
(:func:`calibrate`): its :class:`Spread`. An interval at coverage c is the forecast plus
or minus the spread's c-quantile times the window's deviation, times a per-series
multiplier.

The multiplier is adaptive conformal inference (Gibbs and Candes, 2021) on its logarithm:
after each value, ``log m += gamma * (missed - (1 - c))``. A series whose values keep
falling outside widens its intervals within a few dozen values; one whose values all fall
inside narrows them slowly; over any long stretch the share missed tends to 1 - c, however
the data drifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

LEVELS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)  # the coverages a spread is measured at
# The multiplier's step: how fast intervals follow a change. Over T values the share
# missed is within (the swing of log m) / (GAMMA T) of 1 - c: on a held-out tail of 254
# values (the water flow's), whose windows were calmer than the validation ones, 0.05
# left 87.4% of them inside 90% intervals, 0.1 88.6%.
GAMMA = 0.1
# |log m| at most: a multiplier within e^10 (22,000 times) of the spread either way. Past
# that an interval says nothing, and a series missed value after value would otherwise
# reach exp(710) = inf, its bounds no longer numbers.
LOG_M_LIMIT = 10.0
# A window's deviation, as a share of its level, that is rounding error at most: float64
# keeps about 16 digits, so 1e-12 of the level is thousands of times what rounding leaves.
FLAT = 1e-12


@dataclass(frozen=True)
class Spread:
    """Quantiles of the scaled absolute error: (len(LEVELS), horizon)."""

    q: np.ndarray

    def at(self, coverage: float) -> np.ndarray:
        """The scaled half-width per step ahead at ``coverage``, interpolated (horizon,)
        between the :data:`LEVELS` it was measured at; a coverage outside them is refused
        (ValueError): it was given their end's width, 99.99% the width of 99%."""
        if not LEVELS[0] <= coverage <= LEVELS[-1]:
            raise ValueError(
                f"coverage must be from {LEVELS[0]} to {LEVELS[-1]}, the levels a spread is "
                f"measured at; got {coverage}"
            )
        return np.array([np.interp(coverage, LEVELS, col) for col in self.q.T])

    def to_meta(self) -> dict[str, Any]:
        return {"levels": list(LEVELS), "q": self.q.round(6).tolist()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], horizon: int) -> Spread:
        """A checkpoint's spread, or for one without (made before intervals) or with one
        that is not a table of numbers of its shape, a spread of about one window
        deviation that the online multiplier then corrects."""
        stored = meta.get("spread")
        if isinstance(stored, dict) and stored.get("levels") == list(LEVELS):
            try:
                q = np.asarray(stored.get("q"), dtype=np.float64)
            except (ValueError, TypeError, OverflowError):  # ragged, not numbers, 10**400
                q = np.empty(0)
            if q.shape == (len(LEVELS), horizon) and np.isfinite(q).all() and (q >= 0).all():
                return cls(q)
        return cls(np.repeat(np.asarray(LEVELS)[:, None], horizon, axis=1) * 1.5)


def window_scale(windows: np.ndarray, window: int) -> np.ndarray:
    """The deviation of each window's last ``window`` values (N,): what the model scales by.

    A deviation under FLAT of the window's level is 0, as the model's is: a constant
    window at a level with no exact binary form (0.1, 1e6 + 0.1) has one of rounding
    error (1e-17, 2e-10), and an interval that wide taught the multiplier, where a
    flat window's zero-wide one teaches it nothing (:func:`online_intervals`, and the
    worker): through a flat stretch at 1e6 + 0.1, the intervals after it came out 40%
    narrower, and 83% of the next 100 values inside, not 88%."""
    recent = windows[:, -window:]
    mean = recent.mean(axis=1, keepdims=True)
    std = np.sqrt(np.square(recent - mean).mean(axis=1))
    return np.where(std <= FLAT * np.abs(mean[:, 0]), 0.0, std)


def calibrate(y: np.ndarray, yhat: np.ndarray, scale: np.ndarray) -> Spread | None:
    """The spread of forecasts ``yhat`` (N, horizon) of ``y``, from windows of deviation
    ``scale`` (N,); flat windows (deviation 0) carry no information and are left out.
    None when every window is flat. ValueError when the shapes differ: a ``y`` of (N, 1, 1)
    against a ``yhat`` of (N, 1) broadcast to a spread of another shape, without a word."""
    y, yhat, scale = np.asarray(y), np.asarray(yhat), np.asarray(scale)
    if yhat.ndim != 2 or y.shape != yhat.shape or scale.shape != yhat.shape[:1]:
        raise ValueError(
            f"need y and yhat of one shape (N, horizon) and scale (N,); got y {y.shape}, "
            f"yhat {yhat.shape}, scale {scale.shape}"
        )
    ok = scale > 0
    if not ok.any():
        return None
    err = np.abs(y[ok] - yhat[ok]) / scale[ok, None]
    return Spread(np.quantile(err, LEVELS, axis=0))


class Adaptive:
    """Per-series interval multipliers, by slot, adapted online."""

    def __init__(self, coverage: float, gamma: float = GAMMA) -> None:
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must be in (0, 1), got {coverage}")
        self.miss_target = 1.0 - coverage
        self.gamma = gamma
        self.log_m = np.zeros(0)

    def fit(self, size: int) -> None:
        if size > self.log_m.size:
            grow = max(size, 2 * self.log_m.size, 64) - self.log_m.size
            self.log_m = np.r_[self.log_m, np.zeros(grow)]

    def multiplier(self, slots: np.ndarray) -> np.ndarray:
        self.fit(int(slots.max(initial=-1)) + 1)
        return np.asarray(np.exp(self.log_m[slots]))

    def update(self, slots: np.ndarray, missed: np.ndarray) -> None:
        """Each slot's outcome (distinct slots): its value fell outside its interval."""
        self.fit(int(slots.max(initial=-1)) + 1)
        step = self.gamma * (missed.astype(np.float64) - self.miss_target)
        self.log_m[slots] = np.clip(self.log_m[slots] + step, -LOG_M_LIMIT, LOG_M_LIMIT)

    def forget(self, slots: np.ndarray) -> None:
        self.log_m[slots[slots < self.log_m.size]] = 0.0

    def reset(self) -> None:
        """Every multiplier back to 1: for another model, whose spread fits the series
        otherwise."""
        self.log_m[:] = 0.0


def online_intervals(
    y: np.ndarray, one_step: np.ndarray, scale: np.ndarray, spread: Spread, coverage: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One series' one-step intervals, adapted online value by value, as the worker does:
    (lo, hi, the multiplier each was made with, as it stood before its value arrived)."""
    return adapted(y, one_step, spread.at(coverage)[0] * scale, coverage)


def adapted(
    y: np.ndarray, centre: np.ndarray, half: np.ndarray, coverage: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intervals ``centre`` +- ``half`` of one series, their width adapted online value by
    value as the worker adapts its own: (lo, hi, the multiplier of each, as it stood
    before its value arrived). Any forecaster's intervals can be put through it, so that
    their coverage is compared with the model's on the same terms. ValueError unless all
    three have one length (a shorter ``y`` left the last bounds as uninitialised memory)."""
    if not len(y) == len(centre) == len(half):
        raise ValueError(
            f"need one value, centre and half-width for each step; got {len(y)} values, "
            f"{len(centre)} centres and {len(half)} half-widths"
        )
    adaptive = Adaptive(coverage)
    slot = np.zeros(1, dtype=np.int64)
    lo, hi, m = np.empty_like(centre), np.empty_like(centre), np.empty_like(centre)
    for t in range(len(y)):
        m[t] = adaptive.multiplier(slot)[0]
        lo[t], hi[t] = centre[t] - half[t] * m[t], centre[t] + half[t] * m[t]
        if hi[t] > lo[t]:  # a flat window's interval teaches nothing, as in the worker
            adaptive.update(slot, np.array([not lo[t] <= y[t] <= hi[t]]))
    return lo, hi, m
