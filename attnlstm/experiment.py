"""Offline train and evaluate on a dataset: windowing, split, fit, score, in one place.

The command line and the fine-tuner call these; neither repeats the steps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from attnlstm.data import Dataset
from attnlstm.metrics import score
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import TrainConfig, TrainResult, fit, new_model, predict
from attnlstm.windows import Windows, sliding_windows, sliding_windows_many, time_split


@dataclass(frozen=True)
class Split:
    train: Windows
    val: Windows


def split_dataset(dataset: Dataset, window: int, horizon: int, val_fraction: float) -> Split:
    windows = sliding_windows_many(dataset.series, window, horizon)
    train, val = time_split(windows, dataset.lengths, val_fraction)
    if len(train) == 0 or len(val) == 0:
        shortest = min(dataset.lengths)
        raise ValueError(
            f"too little data: the shortest series has {shortest} points, and window "
            f"{window} + horizon {horizon} leaves {len(train)} training and {len(val)} "
            f"validation windows at val_fraction {val_fraction}"
        )
    return Split(train, val)


def train_model(
    dataset: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    val_fraction: float = 0.2,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[AttentionLSTM, TrainResult, dict[str, float]]:
    """Train a new model on the dataset's early part; score it on each series' tail."""
    split = split_dataset(dataset, model_config.window, model_config.horizon, val_fraction)
    model = new_model(model_config, seed=train_config.seed)
    result = fit(model, split.train, split.val, train_config, device=device, progress=progress)
    return model, result, _score(model, split.val, dataset, None, device)


def evaluate_model(
    model: AttentionLSTM,
    dataset: Dataset,
    *,
    val_fraction: float = 0.2,
    period: int | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Every metric on each series' held-out tail, against naive baselines."""
    config = model.config
    val = split_dataset(dataset, config.window, config.horizon, val_fraction).val
    return _score(model, val, dataset, period, device)


def _score(
    model: AttentionLSTM, val: Windows, dataset: Dataset, period: int | None, device: str
) -> dict[str, float]:
    yhat, _ = predict(model, val.x, device=device)
    return score(val, yhat, dataset.series, period)


def series_forecast(
    model: AttentionLSTM, values: np.ndarray, *, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-step forecasts along a whole series: (index of each forecast step, forecasts,
    attention) with the forecast of step ``start`` made from the window before it."""
    windows = sliding_windows(values, model.config.window, model.config.horizon)
    yhat, attn = predict(model, windows.x, device=device)
    return windows.start, yhat[:, 0], attn


def training_meta(
    dataset_spec: str, train_config: TrainConfig, result: TrainResult, metrics: dict[str, float]
) -> dict[str, Any]:
    """What a checkpoint records about how its model was made."""
    return {
        "data": dataset_spec,
        "train_config": asdict(train_config),
        "epochs_planned": result.epochs_planned,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.seconds, 3),
        "train_loss": result.train_loss,
        "val_loss": result.val_loss,
        "metrics": metrics,
    }
