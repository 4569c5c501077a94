"""Offline train and evaluate on a dataset: windowing, split, fit, score, in one place.

The command line and the fine-tuner call these; neither repeats the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from attnlstm.checkpoint import CONFIG_BOUNDS, check_config
from attnlstm.data import Dataset, fingerprint
from attnlstm.metrics import score
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import TrainConfig, TrainResult, fit, new_model, predict
from attnlstm.windows import (
    HELD_OUT,
    SeriesWindows,
    evenly,
    series_windows,
    split_point,
    split_windows,
)


@dataclass(frozen=True)
class Split:
    train: SeriesWindows
    val: SeriesWindows


# Validation windows that training reads at most, evenly spaced over every series and
# time: the loss is taken over all of them after each epoch, in one pass. 100 series of
# 4,032 half-hourly values give the day-ahead model 59,800 (413 MB built, and the pass
# as much again); the recordings in data/ give 180-3,029, the 50 sines 8,000.
MAX_VAL_WINDOWS = 8192


def split_dataset(
    dataset: Dataset,
    context: int,
    horizon: int,
    val_fraction: float,
    *,
    where: str = "",
    training: bool = True,
) -> Split:
    """The windows (``context`` values each, ``horizon`` targets) before each series' last
    ``val_fraction``, and those in it. ``where`` says which part of the data ``dataset``
    is, for the error when either has none (or the last, when not for ``training``)."""
    train, val = split_windows(dataset.series, context, horizon, val_fraction)
    shortest = min(dataset.lengths)
    points = f"{shortest} point{'' if shortest == 1 else 's'}{where}"
    if len(val) == 0 and not training:  # evaluate or plot: no training part is needed
        raise ValueError(
            f"too little data to score: the shortest series has {points}, "
            f"and its last {val_fraction:g} holds no forecast that reads {context} values "
            f"and {horizon} ahead: a larger val_fraction, or more data"
        )
    if len(val) == 0 or (training and len(train) == 0):
        raise ValueError(
            f"too little data: the shortest series has {points}, and "
            f"forecasts that read {context} values and {horizon} ahead leave {len(train)} "
            f"training and {len(val)} validation windows at val_fraction {val_fraction}"
        )
    return Split(train, val)


# Adam's weight decay for a model with a period: its many inputs per step and a few
# weeks of data overfit without it (day-ahead MASE on the electricity demand 0.044 without,
# 0.037 with). Without a period it only shrinks the LSTM and attention to nothing: on the
# sines the linear map then does it all, every attention weight is 1/window, and the
# one-step MASE is 10x worse (0.054 against 0.005).
SEASONAL_WEIGHT_DECAY = 1e-4

# LSTM units (and attention width) for a model with a period. On the first three recordings
# in data/ the linear map and the blend carry the forecast: 16 units scored what 32 did
# (one step and a day ahead, within 0.003 MASE on each, two seeds), and the model alone
# runs 1.9x as many windows a second.
SEASONAL_HIDDEN = 16

MAX_CONTEXT = CONFIG_BOUNDS["context"][1]  # values a model may read: what the worker keeps

# Weeks that the seasonal profile (attnlstm.model) averages, for data with a weekly cycle.
# On the electricity demand, blended with the model (two seeds), one step ahead: MASE
# 0.171-0.178 with one week, 0.161-0.163 with two, 0.156-0.157 with three or four; a day
# ahead 0.040-0.041 with one, 0.037-0.038 with two to four. Each week grows the context
# (1,489 values with four against 817) and with it what the worker keeps and copies per
# series, for one step ahead alone.
PROFILE_WEEKS = 2


def has_weekly_cycle(series: Sequence[np.ndarray], period: int, val_fraction: float) -> bool:
    """Whether, on the part of the series before their held-out tails, the value a week
    (7 periods) before forecasts better than the value a period before (summed absolute
    errors). The electricity demand's ratio of the two is 0.30; the water flow's 1.10, the
    electricity load's 1.66 and the sea temperature's 2.40, where a profile chosen on
    validation windows fits noise (day-ahead MASE 0.983 -> 0.999 on the sea temperature)."""
    if period < 1:
        return False
    week = 7 * period
    weekly = daily = 0.0
    for y in series:
        y = np.asarray(y[: split_point(len(y), val_fraction)], dtype=np.float64)
        if len(y) > week:
            weekly += float(np.abs(y[week:] - y[:-week]).sum())
            daily += float(np.abs(y[week:] - y[week - period : -period]).sum())
    return weekly < daily


def dataset_config(
    dataset: Dataset, period: int, *, val_fraction: float = HELD_OUT, **fields: Any
) -> ModelConfig:
    """:func:`seasonal_config` for ``dataset``, with a profile where it has a weekly cycle."""
    weekly = has_weekly_cycle(dataset.series, period, val_fraction)
    return seasonal_config(
        period, dataset.lengths, val_fraction=val_fraction, weekly_cycle=weekly, **fields
    )


def seasonal_config(
    period: int,
    lengths: list[int],
    *,
    val_fraction: float = HELD_OUT,
    weekly_cycle: bool = False,
    **fields: Any,
) -> ModelConfig:
    """The default model for data whose main cycle is ``period`` steps (0: none).

    With a period P: a window of one cycle, forecasts one cycle ahead, and as lags the
    cycle before (P) and, when half the series' training parts hold three weeks, the
    same hours a week (6P) and a week and a cycle (7P) before: for each step ahead, the
    same hour yesterday, a week ago, and a week before yesterday, and with
    ``weekly_cycle`` a seasonal profile over PROFILE_WEEKS weeks (not for a horizon past
    a period, which a profile cannot forecast); and an LSTM of
    SEASONAL_HIDDEN units. Without a period, a short window: 20 steps, one ahead.
    ``fields`` override any of these. The profile, then the weekly lags, are left out
    where they would reach further back than a checkpoint's context may: with a window
    of one period, the profile past 588 steps, the lags past 1,250 (a day of minutes
    has 1,440).
    """
    if period == 0:
        return ModelConfig(**fields)
    # At least half the series', not the shortest's: one short column (a sensor added late)
    # took the weekly lags from every series; `train` names the series too short for them.
    training = sorted(split_point(n, val_fraction) for n in lengths)[len(lengths) // 2]
    weekly = training >= 21 * period
    ahead = fields.get("horizon", period)
    base = {
        "window": period,
        "horizon": period,
        "lags": (period, 6 * period, 7 * period) if weekly else (period,),
        "period": period,
        # A profile forecasts at most a period ahead: none for a longer --horizon.
        "profile_weeks": PROFILE_WEEKS if weekly and weekly_cycle and ahead <= period else 0,
        "hidden_size": SEASONAL_HIDDEN,
        "attention_size": SEASONAL_HIDDEN,
    }
    config = ModelConfig(**(base | fields))
    for shorter in ({"profile_weeks": 0}, {"profile_weeks": 0, "lags": (period,)}):
        if config.context <= MAX_CONTEXT:
            break
        config = ModelConfig(**(base | shorter | fields))
    return config


def train_model(
    dataset: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    val_fraction: float = HELD_OUT,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[AttentionLSTM, TrainResult, dict[str, float]]:
    """Train a new model on the part of each series before its held-out tail, stopping
    early on that part's own last ``val_fraction``; score it on the tail, which no step
    of the training has seen. A config that no checkpoint would load is refused first
    (CheckpointError), not once the model is trained and saved."""
    check_config(model_config, "the model")
    context, horizon = model_config.context, model_config.horizon
    early = Dataset(
        dataset.names,
        [s[: split_point(len(s), val_fraction)] for s in dataset.series],
        dataset.step_s,
    )
    split = split_dataset(early, context, horizon, val_fraction, where=" before its held-out tail")
    model = new_model(model_config, seed=train_config.seed)
    val = split.val.build(evenly(len(split.val), MAX_VAL_WINDOWS))
    result = fit(model, split.train, val, train_config, device=device, progress=progress)
    tail = split_dataset(dataset, context, horizon, val_fraction).val
    return model, result, _score(model, tail, dataset, None, device)


def evaluate_model(
    model: AttentionLSTM,
    dataset: Dataset,
    *,
    val_fraction: float = HELD_OUT,
    period: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Every metric on each series' held-out tail, against naive baselines."""
    config = model.config
    # Held-out windows only: scored, a tail needs no training windows before it.
    split = split_dataset(dataset, config.context, config.horizon, val_fraction, training=False)
    return _score(model, split.val, dataset, period, device)


def _score(
    model: AttentionLSTM, val: SeriesWindows, dataset: Dataset, period: int | None, device: str
) -> dict[str, float]:
    yhat, _ = predict(model, val, device=device)
    return score(val.recent(1).build(), yhat, dataset.series, period)


def series_forecast(
    model: AttentionLSTM, values: np.ndarray, *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-step forecasts along a whole series: (index of each forecast step, forecasts,
    attention) with the forecast of step ``start`` made from the window before it. Every
    step a window reaches: the first step ahead needs no later targets."""
    windows = series_windows([values], model.config.context, 1)
    yhat, attn = predict(model, windows, device=device)
    return windows.start, yhat[:, 0], attn


def training_meta(
    dataset_spec: str,
    dataset: Dataset,
    train_config: TrainConfig,
    result: TrainResult,
    metrics: dict[str, float],
    *,
    val_fraction: float,
) -> dict[str, Any]:
    """What a checkpoint records about how its model was made: the data's tail it never
    saw (``val_fraction``) included, which `evaluate` scores it on, and each series'
    training part, [values, fingerprint], by which it refuses a tail that reaches into
    one, however long the series has grown since."""
    cuts = (split_point(len(s), val_fraction) for s in dataset.series)
    return {
        "data": dataset_spec,
        "trained_values": [
            [n, fingerprint(s[:n])] for s, n in zip(dataset.series, cuts, strict=True)
        ],
        "val_fraction": val_fraction,
        "train_config": asdict(train_config),
        "epochs_planned": result.epochs_planned,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.seconds, 3),
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "metrics": metrics,
        **({"spread": result.spread.to_meta()} if result.spread is not None else {}),
        **({"blend": result.blend.to_meta()} if result.blend is not None else {}),
    }
