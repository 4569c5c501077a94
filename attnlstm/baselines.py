"""Classical statistical forecasters from statsforecast, scored like the neural model.

Rolling origin: the held-out points ``y[cut:]`` are forecast exactly as the neural model
sees them, each one-step forecast of ``y[t]`` made with ``y[:t]`` known and nothing
after. Refitting at every ``t`` would take hours, so a model is refitted once a day: at
each origin ``cut, cut + period, ...`` (see `day_origins`), on the trailing ``max_fit``
points before it. From each origin comes the multi-step forecast ``y[o : o + horizon]``
(the fitted model's own ``predict``), and until the next origin the one-step forecasts
come from the same parameters, the model's state updated with each new value.

The cheap update. statsforecast's ``forward(y[:t], h=1)`` reruns the model's filter over
the whole history for every ``t``; that is what made a daily-refit AutoETS take 49 s on
the electricity data and MSTL, which also redoes its LOESS decomposition, far longer.
Here one filter pass per origin carries the fitted state across the new values instead:

- AutoETS: the ETS recursion (statsforecast's own C routine) from the fit's last state,
  with ``sigma2`` recomputed from all residuals so far, as ``forward`` does.
- MSTL: the seasonal components of the fit repeated periodically (what MSTL's
  ``predict`` does), and the AutoETS update above on the deseasonalised values. MSTL's
  own ``forward`` re-decomposes the series, so this is the refit-free version of it:
  ``trend_forecaster.forward`` on the fitted deseasonalised series extended this way.
- AutoARIMA: the Kalman filter from the fit's last state ``(a, P)``; ``sigma2`` stays
  the fit's, as in ``forward``. Fitted by conditional sum of squares: the default
  (CSS then exact likelihood) took ten minutes for one fit of two weeks of half-hours.
  statsforecast's CSS fit skips the filter pass over the data that R's arima makes,
  leaving the state (and its own ``predict``) at zero; `_ARIMA` makes that pass.

The tests check each update against statsforecast's ``forward`` to within rounding.
``max_fit`` bounds the fit time; `FIT_DAYS` gives each model's default window.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Protocol

import numpy as np

STAT_MODELS = ("AutoETS", "MSTL", "AutoARIMA")
# Default trailing fit window in days (periods), by measurement on the data files: twice
# these windows cost twice the time and gained nothing (ETS: MASE within 1%, AutoARIMA:
# one-step MASE 0.31 -> 0.59 on electricity), while MSTL lost 20% multi-step MASE at 28.
FIT_DAYS = {"AutoETS": 14, "MSTL": 56, "AutoARIMA": 14}
INSTALL_HINT = "pip install 'attnlstm[baselines]'"

Bands = tuple[np.ndarray, np.ndarray, np.ndarray]  # mean, lo, hi


@dataclass(frozen=True)
class Rolled:
    one_step: np.ndarray  # (n - cut,) forecast of y[t] made with y[:t] known
    one_lo: np.ndarray  # (n - cut,) lower bound of the level% interval
    one_hi: np.ndarray  # (n - cut,)
    ahead: np.ndarray  # (len(origins), horizon) forecasts of y[o : o + horizon]
    ahead_lo: np.ndarray  # (len(origins), horizon)
    ahead_hi: np.ndarray  # (len(origins), horizon)
    fit_seconds: float  # wall time in this model, all refits and updates together


def available() -> bool:
    return importlib.util.find_spec("statsforecast") is not None


def day_origins(n: int, cut: int, period: int, horizon: int) -> np.ndarray:
    """The multi-step origins: cut, cut + period, ... while o + horizon <= n.

    >>> day_origins(100, 60, 12, 24).tolist()
    [60, 72]
    """
    return np.arange(cut, n - horizon + 1, period)


def rolled(
    name: str,
    y: np.ndarray,
    *,
    cut: int,
    period: int,
    horizon: int,
    weekly: bool,
    level: int = 90,
    max_fit: int | None = None,
    refitted: Callable[[], object] | None = None,
) -> Rolled:
    """Rolling-origin forecasts of the statistical model `name` (one of STAT_MODELS).

    Refit at each of `day_origins` on ``y[max(0, o - max_fit) : o]``; from it the
    multi-step forecast of ``y[o : o + horizon]`` and the one-step forecasts of every
    ``t`` up to the next origin (or ``n - 1`` after the last). ``max_fit=None`` takes
    ``FIT_DAYS[name] * period`` points; pass ``len(y)`` to fit on the whole history.
    ``refitted`` is called after each refit (a progress bar's update).
    """
    if name not in STAT_MODELS:
        raise ValueError(f"unknown statistical model {name!r}: use one of {STAT_MODELS}")
    y = np.asarray(y, dtype=np.float64)
    origins = day_origins(len(y), cut, period, horizon)
    if len(origins) == 0:
        raise ValueError(f"no origin: cut {cut} + horizon {horizon} > {len(y)} points")
    window = FIT_DAYS[name] * period if max_fit is None else max_fit
    started = time.perf_counter()
    one = np.empty((3, len(y) - cut))
    ahead = np.empty((3, len(origins), horizon))
    ends = [*origins[1:].tolist(), len(y)]
    for k, (o, end) in enumerate(zip(origins.tolist(), ends, strict=True)):
        fitted = _fit(name, y[max(0, o - window) : o], period, weekly)
        ahead[:, k] = fitted.ahead(horizon, level)
        one[:, o - cut : end - cut] = fitted.one_step(y[o:end], level)
        if refitted is not None:
            refitted()
    seconds = time.perf_counter() - started
    return Rolled(one[0], one[1], one[2], ahead[0], ahead[1], ahead[2], fit_seconds=seconds)


class _Fitted(Protocol):
    def ahead(self, horizon: int, level: int) -> Bands: ...

    def one_step(self, new: np.ndarray, level: int) -> Bands:
        """Forecasts of new[i] from the fit's data and new[:i], for every i."""
        ...


def _fit(name: str, y: np.ndarray, period: int, weekly: bool) -> _Fitted:
    """``name`` fitted to ``y``; a ValueError naming it and the period where statsforecast
    raises a bare Exception (AutoETS of period 450 on 800 values: "Parameters out of
    range"), which no caller could tell from a bug."""
    sf = _statsforecast()
    try:
        return _fitted(sf, name, y, period, weekly)
    except Exception as e:
        if type(e) is not Exception:  # a narrower type says what it is already
            raise
        raise ValueError(
            f"{name} cannot be fitted with period {period} on {len(y):,} values: {e}"
        ) from e


def _fitted(sf: Any, name: str, y: np.ndarray, period: int, weekly: bool) -> _Fitted:
    if name == "AutoETS":
        return _ETS(sf.AutoETS(season_length=period).fit(y))
    if name == "MSTL":
        seasons = [period, 7 * period] if weekly else [period]
        trend = sf.AutoETS(model="ZZN")
        return _MSTL(sf.MSTL(season_length=seasons, trend_forecaster=trend).fit(y))
    with warnings.catch_warnings():
        # The stepwise search tries orders whose optimiser stops early; it says so each time.
        warnings.filterwarnings("ignore", "possible convergence problem")
        return _ARIMA(sf.AutoARIMA(season_length=period, method="CSS").fit(y), y)


def _statsforecast() -> Any:
    try:
        import statsforecast.models
    except ImportError as e:
        raise ImportError(f"statistical baselines need statsforecast: {INSTALL_HINT}") from e
    return statsforecast.models


def _bands(res: dict[str, np.ndarray], level: int) -> Bands:
    return res["mean"], res[f"lo-{level}"], res[f"hi-{level}"]


class _ETS:
    def __init__(self, model: Any) -> None:
        self.model = model

    def ahead(self, horizon: int, level: int) -> Bands:
        return _bands(self.model.predict(h=horizon, level=[level]), level)

    def one_step(self, new: np.ndarray, level: int) -> Bands:
        return _ets_one_step(self.model.model_, new, level)


class _MSTL(_ETS):
    """As AutoETS, but one step ahead the trend model's filter runs on the deseasonalised
    values."""

    def one_step(self, new: np.ndarray, level: int) -> Bands:
        seasonal = _mstl_seasonal(self.model, len(new))
        bands = _ets_one_step(self.model.trend_forecaster.model_, new - seasonal, level)
        mean, lo, hi = (b + seasonal for b in bands)
        return mean, lo, hi


def _mstl_seasonal(model: Any, h: int) -> np.ndarray:
    """The fit's seasonal components, each its last cycle repeated over the next h steps."""
    columns = model.model_.filter(regex="^seasonal").columns  # one per sorted period
    cycles = zip(columns, model.season_length, strict=True)
    total: np.ndarray = np.sum(
        [np.resize(model.model_[c].to_numpy()[-p:], h) for c, p in cycles], axis=0
    )
    return total


def _ets_one_step(mod: dict[str, Any], new: np.ndarray, level: int) -> Bands:
    from statsforecast.ets import forecast_ets, pegelsresid_C

    error, trend, season, damped = mod["components"]
    alpha, beta, gamma, phi = mod["par"][:4]
    _, e, states, _ = pegelsresid_C(
        new, mod["m"], mod["states"][-1], error, trend, season, damped != "N",
        alpha, beta, gamma, phi, nmse=1,
    )  # fmt: skip
    # forward's sigma2: squared residuals of all data so far, fit window and new values.
    sq = np.concatenate([mod["residuals"], e[:-1]]) ** 2
    sse = np.cumsum(np.where(np.isinf(sq), 0.0, sq))[len(mod["residuals"]) - 1 :]
    dof = np.arange(len(mod["residuals"]), len(mod["residuals"]) + len(new)) - mod["n_params"]
    out = np.empty((3, len(new)))
    for i in range(len(new)):
        now = {**mod, "states": states[i : i + 1], "sigma2": sse[i] / (dof[i] - 1)}
        out[:, i] = np.ravel(_bands(forecast_ets(now, h=1, level=[level]), level))
    return out[0], out[1], out[2]


class _ARIMA:
    """AutoARIMA fitted by CSS, with the filter pass over the fit data that CSS skips.

    statsforecast's CSS fit leaves the Kalman state at zero, so its own predict gives
    zeros; R's arima, which it ports, runs this pass after a CSS fit.
    """

    def __init__(self, model: Any, y: np.ndarray) -> None:
        from statsforecast.arima import arima_like

        self.mod = model.model_
        self.n_fit = len(y)
        self.state = {k: np.copy(v) for k, v in self.mod["model"].items()}
        s = self.state  # arima_like updates a, P and Pn in place
        x = y - self._regression(np.arange(1, len(y) + 1))
        arima_like(x, s["phi"], s["theta"], s["delta"], s["a"], s["P"], s["Pn"], 0, False)

    def _regression(self, steps: np.ndarray) -> np.ndarray:
        coef = self.mod["coef"]  # drift's regressor is the step count 1, 2, ...
        return float(coef.get("intercept", 0.0)) + float(coef.get("drift", 0.0)) * steps

    def ahead(self, horizon: int, level: int) -> Bands:
        from statsforecast.arima import forecast_arima

        res = forecast_arima({**self.mod, "model": self.state}, h=horizon, level=[level])
        return (
            res["mean"],
            res["lower"][f"{level}%"].to_numpy(),
            res["upper"][f"{level}%"].to_numpy(),
        )

    def one_step(self, new: np.ndarray, level: int) -> Bands:
        """One Kalman filter step per value, from the fit's final state (as forward does)."""
        s = self.state
        z, t, v, h = s["Z"], s["T"], s["V"], s["h"]
        a, p = s["a"], s["P"]
        xm = self._regression(np.arange(self.n_fit + 1, self.n_fit + len(new) + 1))
        mean, var = np.empty(len(new)), np.empty(len(new))
        for i, value in enumerate(new - xm):
            a = t @ a
            p = v + t @ p @ t.T
            m = p @ z
            mean[i], var[i] = a @ z, h + z @ m
            a = a + m * ((value - mean[i]) / var[i])
            p = p - np.outer(m, m) / var[i]
        spread = NormalDist().inv_cdf(0.5 + level / 200) * np.sqrt(var * self.mod["sigma2"])
        return mean + xm, mean + xm - spread, mean + xm + spread
