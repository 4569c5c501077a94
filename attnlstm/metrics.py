"""Forecast error metrics and the naive baselines they are scaled by.

MASE here divides the model's MAE by the MAE of a naive forecaster on the very same
held-out targets (out-of-sample scaling), so MASE < 1 means "beats naive" on the
points that were scored. With several series it is the mean of the per-series ratios,
so a series with a large amplitude does not drown the others.
"""

from __future__ import annotations

import math

import numpy as np

from attnlstm.windows import Windows


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    # The article's bug was exactly this: (N, 1, 1) targets against (N, 1)
    # predictions broadcast to (N, N, 1) and the loss measured nonsense.
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch: targets {y_true.shape} vs predictions {y_pred.shape}")


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    _check(y_true, y_pred)
    return float(np.mean((y_true - y_pred) ** 2))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    _check(y_true, y_pred)
    return float(np.mean(np.abs(y_true - y_pred)))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return math.sqrt(mse(y_true, y_pred))


def smape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Symmetric MAPE in percent, 0..200; points where both are 0 count as 0 error, and a
    NaN anywhere makes it NaN (``denom > 0`` is False for NaN: such points scored 0)."""
    _check(y_true, y_pred)
    denom = np.abs(y_true) + np.abs(y_pred)
    ratio = np.divide(
        2.0 * np.abs(y_true - y_pred), denom, out=np.zeros_like(denom), where=denom != 0
    )
    return float(100.0 * np.mean(ratio))


def mase(
    y_true: np.ndarray, y_pred: np.ndarray, y_base: np.ndarray, groups: np.ndarray | None = None
) -> float:
    """MAE of ``y_pred`` over MAE of the baseline ``y_base``, per group then averaged.

    Groups whose baseline is perfect (MAE 0) are skipped; if all are, the result is
    0 for a perfect forecast and infinity otherwise.
    """
    _check(y_true, y_pred)
    _check(y_true, y_base)
    if groups is None:
        groups = np.zeros(y_true.shape[0], dtype=np.int64)
    ratios = []
    for g in np.unique(groups):
        rows = groups == g
        base = float(np.mean(np.abs(y_true[rows] - y_base[rows])))
        if base > 0:
            ratios.append(float(np.mean(np.abs(y_true[rows] - y_pred[rows]))) / base)
    if ratios:
        return float(np.mean(ratios))
    return 0.0 if mae(y_true, y_pred) == 0 else math.inf


def naive_last(windows: Windows) -> np.ndarray:
    """The last observed value, repeated over the horizon: (N, horizon)."""
    horizon = windows.y.shape[1]
    return np.repeat(windows.x[:, -1:], horizon, axis=1)


def seasonal_naive(windows: Windows, series: list[np.ndarray], period: int) -> np.ndarray:
    """The value one season before each target, from the raw series: (N, horizon).

    For target step k (0-based) at index t = start + k, the forecaster knows values up
    to start - 1, so it uses index t - period * ceil((k + 1) / period).
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    horizon = windows.y.shape[1]
    k = np.arange(horizon)
    lag = period * np.ceil((k + 1) / period).astype(np.int64)  # (horizon,)
    idx = windows.start[:, None] + k[None, :] - lag[None, :]  # (N, horizon)
    if len(windows) and idx.min() < 0:
        raise ValueError(f"period {period} reaches before the start of a series")
    out = np.empty_like(windows.y)
    for s in np.unique(windows.series):
        rows = windows.series == s
        out[rows] = series[int(s)][idx[rows]]
    return out


def score(
    windows: Windows,
    y_pred: np.ndarray,
    series: list[np.ndarray] | None = None,
    period: int | None = None,
) -> dict[str, float]:
    """Every metric of ``y_pred`` against the windows' targets, with naive baselines."""
    y = windows.y
    naive = naive_last(windows)
    report = {
        "val_mse": mse(y, y_pred),
        "val_mae": mae(y, y_pred),
        "val_rmse": rmse(y, y_pred),
        "val_smape": smape(y, y_pred),
        "naive_mse": mse(y, naive),
        "naive_mae": mae(y, naive),
        "mase": mase(y, y_pred, naive, windows.series),
    }
    if period is not None:
        if series is None:
            raise ValueError("seasonal naive needs the raw series")
        seasonal = seasonal_naive(windows, series, period)
        report["seasonal_naive_mae"] = mae(y, seasonal)
        report["mase_seasonal"] = mase(y, y_pred, seasonal, windows.series)
    return report
