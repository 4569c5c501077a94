"""Metric values by hand, and the shape check that the article's code lacked."""

from __future__ import annotations

import math

import numpy as np
import pytest

from attnlstm.metrics import mae, mase, mse, naive_last, rmse, score, seasonal_naive, smape
from attnlstm.windows import sliding_windows, sliding_windows_many


def test_point_metrics_by_hand() -> None:
    y = np.array([[1.0], [2.0], [4.0]])
    p = np.array([[2.0], [2.0], [1.0]])
    assert mse(y, p) == pytest.approx((1 + 0 + 9) / 3)
    assert mae(y, p) == pytest.approx((1 + 0 + 3) / 3)
    assert rmse(y, p) == pytest.approx(math.sqrt(10 / 3))
    assert smape(y, p) == pytest.approx(100 * (2 / 3 + 0 + 6 / 5) / 3)
    assert smape(np.zeros((2, 1)), np.zeros((2, 1))) == 0.0


def test_broadcasting_shapes_are_refused() -> None:
    # The article's bug: (N, 1, 1) targets against (N, 1) predictions.
    y = np.zeros((10, 1, 1))
    p = np.zeros((10, 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        mse(y, p)


def test_mase_is_one_for_the_baseline_and_averages_per_series() -> None:
    y = np.array([[1.0], [2.0], [10.0], [20.0]])
    base = np.array([[0.0], [1.0], [0.0], [10.0]])
    pred = np.array([[1.5], [2.5], [10.0], [20.0]])
    groups = np.array([0, 0, 1, 1])
    assert mase(y, base, base, groups) == pytest.approx(1.0)
    # series 0: 0.5 / 1 = 0.5; series 1: 0 / 10 = 0 -> mean 0.25, not the pooled 1/22
    assert mase(y, pred, base, groups) == pytest.approx(0.25)
    assert mase(y, y, y) == 0.0
    assert mase(y, pred, y) == math.inf


def test_seasonal_naive_is_perfect_on_a_periodic_series() -> None:
    period = 12
    values = np.tile(np.arange(period, dtype=float), 10)
    w = sliding_windows_many([values], window=5, horizon=3)
    w = w.take(w.start >= period)
    np.testing.assert_array_equal(seasonal_naive(w, [values], period), w.y)
    with pytest.raises(ValueError, match="reaches before the start"):
        seasonal_naive(sliding_windows(values, 5, 1), [values], 40)


def test_naive_last_repeats_the_last_value() -> None:
    w = sliding_windows(np.arange(10.0), window=3, horizon=2)
    assert naive_last(w)[0].tolist() == [2.0, 2.0]


def test_score_reports_every_metric_and_seasonal_when_asked() -> None:
    values = np.sin(np.arange(200) * 2 * np.pi / 20)
    w = sliding_windows(values, 10, 1)
    w = w.take(w.start >= 20)
    report = score(w, w.y + 0.01, [values], period=20)
    assert set(report) >= {"val_mse", "val_mae", "naive_mse", "mase", "mase_seasonal"}
    assert report["val_mae"] == pytest.approx(0.01)
    assert report["seasonal_naive_mae"] == pytest.approx(0.0, abs=1e-12)


def test_smape_of_a_nan_forecast_is_nan() -> None:
    """NaN > 0 is False: a NaN forecast was skipped as if both were 0, and scored 0."""
    y = np.array([[1.0], [2.0]])
    assert math.isnan(smape(y, np.array([[math.nan], [2.0]])))
    assert math.isnan(smape(np.array([[math.nan], [2.0]]), y))
