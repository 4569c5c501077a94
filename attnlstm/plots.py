"""The article's two figures (truth vs forecast; attention heatmap) and the loss curves.

matplotlib is imported when a figure is drawn, never at package import, and always
with the Agg backend: the worker runs on servers without a display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_forecast(
    truth: np.ndarray,
    forecast: np.ndarray,
    path: str | Path,
    *,
    x: np.ndarray | None = None,
    naive: np.ndarray | None = None,
    title: str = "True vs predicted",
    split: float | None = None,
) -> Path:
    """The series and the forecasts over it, and below them the absolute errors (with
    the naive forecast's for scale, when given); ``split`` marks the held-out tail."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    xs = np.arange(len(truth)) if x is None else x
    top.plot(xs, truth, label="true", color="tab:blue", linewidth=2.0)
    top.plot(xs, forecast, label="predicted", color="tab:orange", linewidth=1.0, linestyle="--")
    bottom.semilogy(xs, np.abs(forecast - truth), color="tab:orange", label="|model error|")
    if naive is not None:
        bottom.semilogy(xs, np.abs(naive - truth), color="grey", label="|naive error|")
    for ax in (top, bottom):
        if split is not None:
            ax.axvline(split, color="grey", linestyle=":")
        ax.legend(loc="upper right", fontsize="small")
    top.set_title(title)
    top.set_ylabel("value")
    bottom.set_ylabel("abs. error")
    bottom.set_xlabel("step (dotted line: held-out tail starts)")
    return _save(plt, fig, path)


def plot_attention(weights: np.ndarray, path: str | Path, *, title: str = "Attention") -> Path:
    """Heatmap of attention weights: one row per forecast, one column per window step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    image = ax.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("window position (oldest left, newest right)")
    ax.set_ylabel("sample")
    fig.colorbar(image, ax=ax, label="weight")
    return _save(plt, fig, path)


def plot_series_forecasts(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """One panel per series, ``(name, time, actual, forecast)``: the values that arrived
    and the one-step forecasts made for them, by time (``datetime64``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(10, 2.4 * len(panels) + 0.6), squeeze=False, sharex=False
    )
    for ax, (name, when, actual, forecast) in zip(axes[:, 0], panels, strict=True):
        ax.plot(when, actual, color="tab:blue", linewidth=2.0, label="actual")
        ax.plot(when, forecast, color="tab:orange", linewidth=1.0, linestyle="--", label="forecast")
        ax.set_title(name, fontsize="medium", loc="left")
        ax.set_ylabel("value")
        ax.legend(loc="upper right", fontsize="small")
    fig.suptitle(title)
    return _save(plt, fig, path)


def plot_error_over_time(
    when: np.ndarray,
    mae: np.ndarray,
    naive: np.ndarray,
    path: str | Path,
    *,
    title: str,
    marks: Sequence[tuple[np.datetime64, str]] = (),
) -> Path:
    """One-step MAE (and the naive forecast's) over time (``datetime64``), log scale,
    with vertical lines at ``marks`` (time, label): model promotions, a drift."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.semilogy(when, naive, color="grey", linewidth=1.0, label="naive (last value)")
    ax.semilogy(when, mae, color="tab:orange", linewidth=1.5, label="model")
    styles = {"drift": ("tab:red", "--")}
    for at, label in marks:
        color, style = styles.get(label, ("tab:green", ":"))
        ax.axvline(at, color=color, linestyle=style, linewidth=1.2)
        ax.annotate(
            label,
            (at, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize="small",
            color=color,
        )
    ax.set_title(title)
    ax.set_ylabel("MAE per second, every series")
    ax.legend(loc="lower right", fontsize="small")
    return _save(plt, fig, path)


LATENCY_BINS = 150  # at most, in a latency histogram


def plot_latency(latency_ms: np.ndarray, path: str | Path, *, title: str) -> Path:
    """Histogram of end-to-end latencies (whole ms), with p50 and p99 marked: a bin a
    millisecond where they span fewer than :data:`LATENCY_BINS` ms, else bins that widen
    with the latency, on a log scale (one forecast an hour late made 3.6 M bins of a
    millisecond: minutes and GBs to draw)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    p50, p99 = np.percentile(latency_ms, [50, 99])
    low, top = float(latency_ms.min()), float(latency_ms.max())
    if top - low < LATENCY_BINS:
        edges = np.arange(low, top + 2)
    else:  # whole numbers of ms: the first bins still one millisecond each
        edges = np.unique(np.round(np.geomspace(low + 1, top + 2, LATENCY_BINS))) - 1
        if low < 1:  # log, with a place for 0 ms
            ax.set_xscale("symlog", linthresh=1.0)
        else:
            ax.set_xscale("log")
    ax.hist(latency_ms, bins=edges - 0.5)
    for value, name, style in ((p50, "p50", "--"), (p99, "p99", ":")):
        ax.axvline(value, color="black", linestyle=style, label=f"{name} {value:.0f} ms")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("end-to-end latency (ms): forecast written - input written")
    ax.set_ylabel("forecasts")
    ax.legend()
    return _save(plt, fig, path)


def plot_losses(train_loss: list[float], val_loss: list[float], path: str | Path) -> Path:
    """Training and validation loss per epoch, on a log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    epochs = np.arange(1, len(train_loss) + 1)
    ax.semilogy(epochs, train_loss, label="train")
    ax.semilogy(epochs, val_loss, label="validation")
    ax.set_title("Loss (MSE in window-standardised units)")
    ax.set_xlabel("epoch")
    ax.legend()
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
