"""Every forecaster on the same held-out points: the model beside naive, seasonal naive
and (with ``attnlstm[baselines]``) statsforecast's AutoETS, MSTL and AutoARIMA.

Each series' held-out tail starts at its cut (the last ``val_fraction`` of it). One step
ahead, every forecaster forecasts every tail value from the values before it. Multi-step,
each forecasts the ``horizon`` values after each origin in :func:`day_origins` (the cut,
then every period after it), from the values before the origin. The statistical models
are refitted at each origin, at most once a period (:mod:`attnlstm.baselines`); the model
is the checkpoint as trained. MASE divides by the naive forecast's MAE at the same points
and steps ahead (the last value, repeated), per series, then averages over series.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm import tqdm

from attnlstm.baselines import Rolled, day_origins, rolled
from attnlstm.data import Dataset
from attnlstm.intervals import Spread, online_intervals, window_scale
from attnlstm.metrics import mae, seasonal_naive, smape
from attnlstm.model import AttentionLSTM
from attnlstm.train import predict
from attnlstm.windows import SeriesWindows, Windows, split_point

Forecaster = Callable[[np.ndarray, int], Rolled]  # (series, cut) -> its forecasts


@dataclass(frozen=True)
class Row:
    """One forecaster's scores on the held-out points of every series."""

    name: str
    mase: float  # one step ahead
    smape: float  # one step ahead, percent
    ahead_mase: float  # over every step of every multi-step forecast (NaN: none)
    coverage: float  # one step ahead, share of values inside the interval (NaN: none)
    width: float  # the interval's mean width, over the naive forecast's MAE (NaN: none)
    seconds: float


def compare(
    model: AttentionLSTM,
    dataset: Dataset,
    *,
    spread: Spread,
    val_fraction: float = 0.2,
    period: int = 0,
    stat_models: Sequence[str] = (),
    level: int = 90,
    device: str = "cpu",
    progress: bool = False,
) -> list[Row]:
    """The model (its intervals from ``spread``, adapted online as the worker does), the
    naive forecasts and ``stat_models``, scored on the same points; with ``progress``, a
    bar over the statistical models' refits on stderr (the sea temperature's 240 take
    minutes)."""
    horizon = model.config.horizon
    step = period or horizon
    cuts = [split_point(len(y), val_fraction) for y in dataset.series]
    short = [n for n, cut in zip(dataset.names, cuts, strict=True) if cut < model.config.context]
    if short:
        raise ValueError(
            f"series {short[0]!r} has fewer values before its held-out tail than the model "
            f"reads ({model.config.context}): lower --val-fraction or use longer data"
        )
    forecasters: list[tuple[str, Forecaster]] = [
        ("model", lambda y, c: _model(model, spread, level, y, c, step, device)),
        ("naive", lambda y, c: _naive(y, c, step, horizon)),
    ]
    if period:
        name = f"seasonal naive ({period})"
        forecasters.append((name, lambda y, c: _seasonal(y, c, period, horizon)))
    weekly = len(model.config.lags) > 1
    origins = sum(
        len(day_origins(len(y), cut, step, horizon))
        for y, cut in zip(dataset.series, cuts, strict=True)
    )
    bar = tqdm(
        total=origins * len(stat_models),
        desc="baselines",
        unit="refit",
        disable=not progress or not stat_models,
    )
    forecasters += [
        (name, functools.partial(_stat, name, period, horizon, weekly, level, bar))
        for name in stat_models
    ]
    rows = []
    with bar:
        for name, forecast in forecasters:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            runs = [forecast(y, cut) for y, cut in zip(dataset.series, cuts, strict=True)]
            seconds = time.perf_counter() - started
            rows.append(_row(name, runs, dataset.series, cuts, step, seconds))
    return rows


def _stat(
    name: str,
    period: int,
    horizon: int,
    weekly: bool,
    level: int,
    bar: tqdm[Any],
    y: np.ndarray,
    cut: int,
) -> Rolled:
    return rolled(
        name,
        y,
        cut=cut,
        period=period,
        horizon=horizon,
        weekly=weekly,
        level=level,
        refitted=bar.update,
    )


def _model(
    model: AttentionLSTM,
    spread: Spread,
    level: int,
    y: np.ndarray,
    cut: int,
    step: int,
    device: str,
) -> Rolled:
    config = model.config
    points = np.arange(cut, len(y))
    # The context before each point, built as predict reads it.
    windows = SeriesWindows(y, points, points, np.zeros_like(points), config.context, 1)
    one, _ = predict(model, windows, device=device)
    scale = window_scale(windows.recent(config.window).build().x, config.window)
    lo, hi, m = online_intervals(y[cut:], one[:, 0], scale, spread, level / 100)
    origins = day_origins(len(y), cut, step, config.horizon)
    ahead, _ = predict(model, windows.take(origins - cut), device=device)
    half = spread.at(level / 100)[None, :] * (m * scale)[origins - cut, None]
    return Rolled(one[:, 0], lo, hi, ahead, ahead - half, ahead + half, 0.0)


def _naive(y: np.ndarray, cut: int, step: int, horizon: int) -> Rolled:
    origins = day_origins(len(y), cut, step, horizon)
    return _rolled(y[cut - 1 : -1], np.repeat(y[origins - 1, None], horizon, axis=1))


def _seasonal(y: np.ndarray, cut: int, period: int, horizon: int) -> Rolled:
    """The value one period before; steps past a period ahead repeat the last period
    (:func:`attnlstm.metrics.seasonal_naive`, from each origin)."""
    origins = day_origins(len(y), cut, period, horizon)
    at = Windows(
        x=np.empty((origins.size, 0)),
        y=np.empty((origins.size, horizon)),
        start=origins,
        series=np.zeros(origins.size, dtype=np.int64),
    )
    return _rolled(y[cut - period : len(y) - period], seasonal_naive(at, [y], period))


def _rolled(one_step: np.ndarray, ahead: np.ndarray) -> Rolled:
    """Forecasts without intervals."""
    return Rolled(
        one_step=one_step,
        one_lo=np.full_like(one_step, np.nan),
        one_hi=np.full_like(one_step, np.nan),
        ahead=ahead,
        ahead_lo=np.full_like(ahead, np.nan),
        ahead_hi=np.full_like(ahead, np.nan),
        fit_seconds=0.0,
    )


def _row(
    name: str,
    runs: list[Rolled],
    series: list[np.ndarray],
    cuts: list[int],
    step: int,
    seconds: float,
) -> Row:
    mases, smapes, ahead, coverage, width = [], [], [], [], []
    for run, y, cut in zip(runs, series, cuts, strict=True):
        truth, naive_mae = y[cut:], mae(y[cut:], y[cut - 1 : -1])
        mases.append(mae(truth, run.one_step) / naive_mae)
        smapes.append(smape(truth, run.one_step))
        coverage.append(float(np.mean((run.one_lo <= truth) & (truth <= run.one_hi))))
        width.append(float(np.mean(run.one_hi - run.one_lo)) / naive_mae)
        origins = day_origins(len(y), cut, step, run.ahead.shape[1])
        if origins.size:
            target = y[origins[:, None] + np.arange(run.ahead.shape[1])]
            naive = np.repeat(y[origins - 1, None], target.shape[1], axis=1)
            ahead.append(mae(target, run.ahead) / mae(target, naive))
    no_interval = bool(np.isnan(runs[0].one_lo).all())
    return Row(
        name=name,
        mase=float(np.mean(mases)),
        smape=float(np.mean(smapes)),
        ahead_mase=float(np.mean(ahead)) if ahead else math.nan,
        coverage=math.nan if no_interval else float(np.mean(coverage)),
        width=math.nan if no_interval else float(np.mean(width)),
        seconds=seconds,
    )


def format_table(rows: list[Row], *, horizon: int, level: int = 90) -> str:
    """The rows as a Markdown table, best one-step MASE first."""
    lines = [
        f"| forecaster | MASE, 1 step | sMAPE, 1 step | MASE, 1-{horizon} steps "
        f"| {level}% coverage | width / naive MAE | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(rows, key=lambda r: r.mase):
        cells = [f"{r.mase:.3f}", f"{r.smape:.2f}%", _cell(r.ahead_mase, "{:.3f}")]
        cells += [_cell(r.coverage, "{:.1%}"), _cell(r.width, "{:.2f}"), f"{r.seconds:.1f}"]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float, form: str) -> str:
    return "-" if math.isnan(value) else form.format(value)
