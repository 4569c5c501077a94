"""Rolling-origin statistical baselines: shapes, no look-ahead, the cheap update against
statsforecast's own forward, and interval coverage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

pytest.importorskip("statsforecast")

from statsforecast.arima import forecast_arima, forward_arima
from statsforecast.models import MSTL, AutoARIMA, AutoETS

from attnlstm.baselines import (
    FIT_DAYS,
    STAT_MODELS,
    Rolled,
    available,
    day_origins,
    rolled,
)
from attnlstm.data import load_dataset

PERIOD = 12  # "a day" of the synthetic series
N, CUT, HORIZON, LEVEL = 360, 240, 12, 90


def seasonal(n: int, weekly: float = 0.0, seed: int = 0) -> np.ndarray:
    """A daily cycle, optionally a weekly one, a slow trend and unit Gaussian noise."""
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    cycles = 10 * np.sin(2 * np.pi * t / PERIOD) + weekly * np.sin(2 * np.pi * t / (7 * PERIOD))
    return 100 + 0.01 * t + cycles + rng.normal(0, 1, n)


def roll(name: str, y: np.ndarray, *, weekly: bool, cut: int = CUT) -> Rolled:
    return rolled(name, y, cut=cut, period=PERIOD, horizon=HORIZON, weekly=weekly, level=LEVEL)


@pytest.fixture(scope="module")
def results() -> dict[str, Rolled]:
    """Each model over ten days of held-out points of the daily-only series."""
    y = seasonal(N)
    return {name: roll(name, y, weekly=False) for name in STAT_MODELS}


def test_available() -> None:
    assert available()


@pytest.mark.parametrize(
    ("n", "cut", "expected"),
    [(100, 60, [60, 72]), (96, 60, [60, 72]), (95, 60, [60]), (71, 60, [])],
)
def test_day_origins_stop_where_the_horizon_runs_out(n: int, cut: int, expected: list[int]) -> None:
    assert day_origins(n, cut, 12, 24).tolist() == expected


def test_unknown_model_and_no_origin_are_errors() -> None:
    y = seasonal(N)
    with pytest.raises(ValueError, match="unknown"):
        roll("Theta", y, weekly=False)
    with pytest.raises(ValueError, match="no origin"):
        roll("AutoETS", y, weekly=False, cut=N - HORIZON + 1)


def test_a_fit_statsforecast_refuses_is_a_value_error_naming_the_model_and_period() -> None:
    """statsforecast raises a bare Exception, which `attnlstm evaluate --baselines
    --period 450` on one sine printed as a traceback."""
    y = load_dataset("sines", n_series=1).series[0]
    with pytest.raises(
        ValueError,
        match=r"^AutoETS cannot be fitted with period 450 on 800 values: Parameters out of range$",
    ):
        rolled("AutoETS", y, cut=800, period=450, horizon=1, weekly=False)


@pytest.mark.parametrize("name", STAT_MODELS)
def test_shapes_and_origins_agree(results: dict[str, Rolled], name: str) -> None:
    r = results[name]
    origins = day_origins(N, CUT, PERIOD, HORIZON)
    assert len(origins) == 10
    for a in (r.one_step, r.one_lo, r.one_hi):
        assert a.shape == (N - CUT,)
        assert np.isfinite(a).all()
    for a in (r.ahead, r.ahead_lo, r.ahead_hi):
        assert a.shape == (len(origins), HORIZON)
        assert np.isfinite(a).all()
    assert r.fit_seconds > 0
    # At an origin both forecasts come from the same fit and the same data.
    first = (r.one_step[origins - CUT], r.one_lo[origins - CUT], r.one_hi[origins - CUT])
    np.testing.assert_allclose(first, (r.ahead[:, 0], r.ahead_lo[:, 0], r.ahead_hi[:, 0]))


@pytest.mark.parametrize("name", STAT_MODELS)
def test_one_step_uses_only_the_past(name: str) -> None:
    n, t = CUT + 3 * PERIOD, CUT + PERIOD + 5  # t inside the second day
    y = seasonal(n, weekly=3.0)
    changed = y.copy()
    changed[t:] += np.random.default_rng(1).normal(0, 20, n - t)
    before, after = roll(name, y, weekly=True), roll(name, changed, weekly=True)
    k = t - CUT
    np.testing.assert_array_equal(before.one_step[: k + 1], after.one_step[: k + 1])
    np.testing.assert_array_equal(before.one_hi[: k + 1], after.one_hi[: k + 1])
    np.testing.assert_array_equal(before.ahead[:2], after.ahead[:2])  # origins <= t
    assert not np.allclose(before.one_step[k + 1 :], after.one_step[k + 1 :])
    assert not np.allclose(before.ahead[2], after.ahead[2])


Bands = dict[str, Any]  # statsforecast's result: mean, lo-90, hi-90


def statsforecast_forward(
    name: str, window: np.ndarray, weekly: bool
) -> Callable[[np.ndarray], Bands]:
    """statsforecast's own forecast of the value after `seen`, which follows `window`: the
    model fitted on `window`, applied with its parameters fixed to window + seen."""
    if name == "AutoETS":
        ets = AutoETS(season_length=PERIOD).fit(window)
        return lambda seen: ets.forward(np.r_[window, seen], h=1, level=[LEVEL])
    if name == "MSTL":
        seasons = [PERIOD, 7 * PERIOD] if weekly else [PERIOD]
        mstl = MSTL(season_length=seasons, trend_forecaster=AutoETS(model="ZZN")).fit(window)
        trend = mstl.trend_forecaster
        # MSTL's own forward redoes the decomposition; without a refit the seasonal part is
        # the fit's, repeated (what predict adds), and the trend model runs forward.
        season = mstl.predict(h=HORIZON)["mean"] - trend.predict(h=HORIZON)["mean"]
        deseasoned = mstl.model_[["trend", "remainder"]].sum(axis=1).to_numpy()

        def reseasoned(seen: np.ndarray) -> Bands:
            x = np.r_[deseasoned, seen - season[: len(seen)]]
            res = trend.forward(x, h=1, level=[LEVEL])
            return {k: v + season[len(seen)] for k, v in res.items()}

        return reseasoned
    arima = AutoARIMA(season_length=PERIOD, method="CSS").fit(window).model_

    def refiltered(seen: np.ndarray) -> Bands:
        # method="ML" with every coefficient fixed: the exact filter over all the data.
        res = forecast_arima(forward_arima(arima, np.r_[window, seen], method="ML"), 1, [LEVEL])
        lo, hi = res["lower"][f"{LEVEL}%"], res["upper"][f"{LEVEL}%"]
        return {"mean": res["mean"], f"lo-{LEVEL}": lo, f"hi-{LEVEL}": hi}

    return refiltered


@pytest.mark.filterwarnings("ignore:possible convergence problem")
@pytest.mark.parametrize(
    ("name", "weekly"), [("AutoETS", False), ("MSTL", False), ("MSTL", True), ("AutoARIMA", False)]
)
def test_cheap_update_matches_statsforecast_forward(
    results: dict[str, Rolled], name: str, weekly: bool
) -> None:
    if weekly:
        y = seasonal(CUT + 2 * PERIOD, weekly=3.0)
        r = roll(name, y, weekly=True)
    else:
        y, r = seasonal(N), results[name]
    origin = CUT + PERIOD  # the second fit: a trailing window but for MSTL's 56 days
    window = y[max(0, origin - FIT_DAYS[name] * PERIOD) : origin]
    forward = statsforecast_forward(name, window, weekly)
    for k in (0, 1, 5, PERIOD - 1):
        res, i = forward(y[origin : origin + k]), origin - CUT + k
        expected = [np.asarray(res[key])[0] for key in ("mean", f"lo-{LEVEL}", f"hi-{LEVEL}")]
        got = [r.one_step[i], r.one_lo[i], r.one_hi[i]]
        np.testing.assert_allclose(got, expected, rtol=1e-9, err_msg=f"{name} at +{k}")


@pytest.mark.parametrize("name", STAT_MODELS)
def test_intervals_hold_the_forecast_and_cover_about_the_level(
    results: dict[str, Rolled], name: str
) -> None:
    y, r = seasonal(N), results[name]
    assert (r.one_lo < r.one_step).all()
    assert (r.one_step < r.one_hi).all()
    assert (r.ahead_lo < r.ahead).all()
    assert (r.ahead < r.ahead_hi).all()
    truth = y[CUT:]
    one = np.mean((r.one_lo <= truth) & (truth <= r.one_hi))
    origins = day_origins(N, CUT, PERIOD, HORIZON)
    rows = np.stack([y[o : o + HORIZON] for o in origins])
    ahead = np.mean((r.ahead_lo <= rows) & (rows <= r.ahead_hi))
    # 120 points each. MSTL's bands run narrow: its seasonal LOESS absorbs some noise, so
    # the residuals it takes its spread from are smaller than the errors it makes.
    assert 0.75 <= one <= 0.98, one
    assert 0.75 <= ahead <= 0.98, ahead
    assert np.mean(np.abs(r.one_step - truth)) < 1.0  # the noise alone: 0.8; the cycle: 10
