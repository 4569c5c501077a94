"""The offline commands: train, evaluate, plot. Each returns the figures it reports."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from attnlstm.checkpoint import Checkpoint, CheckpointError, load, save
from attnlstm.data import Dataset
from attnlstm.experiment import evaluate_model, series_forecast, train_model, training_meta
from attnlstm.model import ModelConfig
from attnlstm.plots import plot_attention, plot_forecast, plot_losses
from attnlstm.train import TrainConfig
from attnlstm.windows import split_point

MODEL_HINT = "train one with: attnlstm train --out PATH"


def run_train(
    dataset: Dataset,
    *,
    data_spec: str,
    model_config: ModelConfig,
    train_config: TrainConfig,
    out: Path,
    val_fraction: float,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    model, result, metrics = train_model(
        dataset,
        model_config,
        train_config,
        val_fraction=val_fraction,
        device=device,
        progress=progress,
    )
    version = save(out, model, training_meta(data_spec, train_config, result, metrics))
    return {
        **metrics,
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(result.seconds, 3),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "params": model.num_params(),
        "model": str(out),
        "version": version,
    }


def open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"no model at {path}: {MODEL_HINT}")
    return load(path)


def run_evaluate(
    dataset: Dataset, *, model_path: Path, val_fraction: float, period: int | None, device: str
) -> dict[str, Any]:
    started = time.perf_counter()
    checkpoint = open_checkpoint(model_path)
    checkpoint.model.to(device)
    metrics = evaluate_model(
        checkpoint.model, dataset, val_fraction=val_fraction, period=period, device=device
    )
    return {
        **metrics,
        "seconds": round(time.perf_counter() - started, 3),
        "params": checkpoint.model.num_params(),
        "model": str(model_path),
        "version": checkpoint.version,
    }


def run_plot(
    dataset: Dataset, *, model_path: Path, out_dir: Path, val_fraction: float, device: str
) -> dict[str, Any]:
    """The article's figures for the dataset's first series, and the loss curves."""
    checkpoint = open_checkpoint(model_path)
    checkpoint.model.to(device)
    name, values = dataset.names[0], dataset.series[0]
    steps, forecast, attention = series_forecast(checkpoint.model, values, device=device)
    cut = split_point(len(values), val_fraction)
    written = [
        plot_forecast(
            values[steps],
            forecast,
            out_dir / "forecast.png",
            x=steps,
            naive=values[steps - 1],
            title=f"{name}: true vs predicted (one step ahead, model {checkpoint.version})",
            split=cut,
        ),
        plot_attention(
            attention[steps >= cut],
            out_dir / "attention.png",
            title=f"{name}: attention over the window, held-out forecasts",
        ),
    ]
    train_loss, val_loss = checkpoint.meta.get("train_loss"), checkpoint.meta.get("val_loss")
    if train_loss and val_loss:
        written.append(plot_losses(train_loss, val_loss, out_dir / "loss.png"))
    return {"written": [str(p) for p in written], "series": name, "version": checkpoint.version}
