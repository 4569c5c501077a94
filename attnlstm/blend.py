"""A trained model's forecasts, shrunk toward what simple forecasters say where the
validation windows show that they say it better.

Per step ahead h (1 to horizon), the forecast becomes

    last + a_h * (model - last) + b_h * (seasonal naive - last)
         + c_h * (profile - last)
         + (phi + phi**2 + ... + phi**h) * (last - the value before it)

with ``a_h, b_h, c_h >= 0`` and ``a_h + b_h + c_h <= 1``: ``a_h`` keeps as much of the
model as it earns, ``b_h`` moves toward the value one period before the target, ``c_h``
toward the model's seasonal profile (only where its config has ``profile_weeks``; see
:mod:`attnlstm.model`), and the last term is a damped trend (ETS's, with one factor
``phi`` in [0, 0.95] for every step: what AutoETS and ARIMA find on data close to a
random walk). They are chosen from grids to minimise the absolute error on the
validation windows, in the data's own units (each window weighed by its deviation, up
to WEIGHT_CAP times the median, over its series' mean deviation, so that every series
weighs the same and a glitch's few windows do not decide for the rest): ``phi`` by the error
over all steps, then the shares per step.

On a recording whose training part teaches the model a pattern its later part does not
keep (the sea temperature's summer daily cycle, gone in winter), the fit sets ``a`` near
0 and the forecast falls back to the last value and its trend instead of forecasting a
cycle that is not there; where the model is right (the sines) it keeps ``a = 1``,
``b = 0`` and ``phi = 0``. On the electricity demand the profile takes 0.6 of the first
step (``c = 0.6``) and 0.4-0.7 of the others: MASE one step ahead 0.204 -> 0.163, a day
ahead 0.042 -> 0.037.

Every term is linear in the model's input features (the window's standardised values,
clipped as the model clips them), so the coefficients are folded into the head and the
linear map (the profile's share into ``profile_share``): a blended model costs what it
did, and its checkpoint is an ordinary one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlstm.model import CLIP, AttentionLSTM, profile_changes
from attnlstm.windows import Windows, evenly

GRID = np.linspace(0.0, 1.0, 11)  # the values of the shares a, b and c
DAMPING = np.linspace(0.0, 0.95, 20)  # the damped trend's factors phi, as in ETS: 0 is none
MAX_WINDOWS = 2048  # validation windows the fit reads at most (evenly spaced)
# A window's deviation weighs at most this many times its series' median window
# deviation. The water flow's validation part holds a drop to a quarter of the flow,
# whose windows deviate 10-30x the others: weighed in full, they took the fit over,
# and a day ahead the blend lost to seasonal naive on the calm tail (MASE 0.698 against
# 0.647; capped, 0.630). The electricity demand and the sea temperature, with no such
# windows, blend as before.
WEIGHT_CAP = 3.0


@dataclass(frozen=True)
class Blend:
    """Per step ahead (horizon,): the model's share, the seasonal naive's, the profile's
    (zeros without one), and the damped trend's multiple of the last change."""

    model: np.ndarray
    seasonal: np.ndarray
    profile: np.ndarray
    trend: np.ndarray

    def to_meta(self) -> dict[str, list[float]]:
        return {name: getattr(self, name).round(4).tolist() for name in self.__dataclass_fields__}


def fit_blend(model: AttentionLSTM, windows: Windows, yhat: np.ndarray) -> Blend:
    """The blend that minimises the absolute error of ``model``'s forecasts ``yhat``
    (N, horizon) of ``windows``: one damping factor over all steps, then per step the
    model's and the seasonal naive's shares."""
    config = model.config
    keep = evenly(len(windows), MAX_WINDOWS)
    windows, yhat = windows.take(keep), yhat[keep]
    scaled = config.scaling == "window"
    z, mean, std = _standardised(windows.x, config.window, scaled)
    last = z[:, -1:]  # the model's skip reads it unclipped, its linear map clipped
    clipped = np.clip(z, -CLIP, CLIP) if scaled else z  # as the model clips
    features = clipped[:, -config.window :]
    profile = (
        profile_changes(torch.from_numpy(clipped), config).numpy() if config.profile_weeks else None
    )
    weight = _weights(std[:, 0], windows.series)
    std = np.where(std > 0, std, 1.0)  # flat windows weigh nothing: their forecast is the level
    target = (windows.y - mean) / std - last  # the change from the last value, as it was
    change = (yhat - mean) / std - last  # and as the model forecast it
    trend = features[:, -1] - features[:, -2]
    horizon = config.horizon
    # Every (a, b, c) summing to at most 1, the model alone first: where the windows
    # cannot tell them apart (all flat, say), argmin keeps the model as it is.
    shares = [
        (a, b, c)
        for a in GRID[::-1]
        for b in GRID
        for c in (GRID if profile is not None else GRID[:1])
        if a + b + c <= 1.0 + 1e-9
    ]
    share, toward, profiled = np.array(shares).T  # (K,)
    none = toward == 0  # the choices left where a step has no seasonal value
    slopes = np.cumsum(DAMPING[:, None] ** np.arange(1, horizon + 1)[None, :], axis=1)  # (D, H)
    # loss[d, h, k]: weighted absolute error at damping d, step h, choice k
    loss = np.full((DAMPING.size, horizon, share.size), np.inf)
    for h in range(horizon):
        at = _seasonal_index(config.window, config.period, h)
        seasonal = features[:, at] - features[:, -1] if at is not None else np.zeros(len(last))
        fitted = share[:, None] * change[None, :, h] + toward[:, None] * seasonal[None, :]
        if profile is not None:
            fitted += profiled[:, None] * profile[None, :, h]
        usable = slice(None) if at is not None else none
        for d, slope in enumerate(slopes[:, h]):
            rest = target[:, h] - slope * trend
            loss[d, h, usable] = (np.abs(rest[None, :] - fitted[usable]) * weight).sum(axis=1)
    best = loss.min(axis=2).sum(axis=1).argmin()  # one damping for every step
    pick = loss[best].argmin(axis=1)  # then per step, the shares
    return Blend(share[pick], toward[pick], profiled[pick], slopes[best])


def fold(model: AttentionLSTM, blend: Blend) -> None:
    """Rewrite ``model``'s head and linear map so that it forecasts as blended."""
    config = model.config
    if not config.linear:
        raise ValueError("only a model with the linear map can carry a blend")
    features = config.input_size  # the linear map reads (window, features), flattened
    last, prev = (config.window - 1) * features, (config.window - 2) * features
    with torch.no_grad():
        for h in range(config.horizon):
            share = float(blend.model[h])
            for layer in (model.head, model.linear):
                layer.weight[h] *= share
                layer.bias[h] *= share
            weights = model.linear.weight[h]
            at = _seasonal_index(config.window, config.period, h)
            if at is not None:
                weights[at * features] += float(blend.seasonal[h])
                weights[last] -= float(blend.seasonal[h])
            weights[last] += float(blend.trend[h])
            weights[prev] -= float(blend.trend[h])
        if config.profile_weeks:
            profile = model.profile_share
            profile.mul_(profile.new_tensor(blend.model)).add_(profile.new_tensor(blend.profile))
        elif blend.profile.any():
            raise ValueError("the blend gives the profile a share, but the model has none")


def _seasonal_index(window: int, period: int, h: int) -> int | None:
    """The window position of the value one period before step ``h``'s target, where it
    is in the window and is not the last value (whose seasonal term would be nothing)."""
    if period < 1:
        return None
    at = window - period + h
    return at if 0 <= at < window - 1 else None


def _standardised(
    x: np.ndarray, window: int, scaled: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The context's values in the model's units (standardised by the window's own
    statistics, or as they are), with the mean and deviation that map them back (N, 1)."""
    if not scaled:
        ones = np.ones((x.shape[0], 1))
        return x, np.zeros_like(ones), ones
    recent = x[:, -window:]
    mean = recent.mean(axis=1, keepdims=True)
    std = recent.std(axis=1, keepdims=True)
    return (x - mean) / np.where(std > 0, std, 1.0), mean, std


def _weights(std: np.ndarray, series: np.ndarray) -> np.ndarray:
    """Each window's deviation over its series' mean deviation: errors in the data's units,
    every series weighing the same. A flat window (deviation 0) weighs nothing. A
    deviation counts up to WEIGHT_CAP times its series' median: the few windows of a
    glitch would otherwise set the blend for the rest."""
    counts = np.bincount(series)
    cap = np.zeros(counts.size)
    for k in np.flatnonzero(counts):
        moving = std[(series == k) & (std > 0)]
        cap[k] = WEIGHT_CAP * np.median(moving) if moving.size else 0.0
    std = np.minimum(std, cap[series])
    means = np.bincount(series, weights=std) / np.maximum(counts, 1)
    return np.asarray(std / np.where(means > 0, means, 1.0)[series] / counts[series])
