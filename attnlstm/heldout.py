"""Every forecaster on the same held-out points: the model beside naive, seasonal naive
and (with ``attnlstm[baselines]``) statsforecast's AutoETS, MSTL and AutoARIMA.

Each series' held-out tail starts at its cut (the last ``val_fraction`` of it). One step
ahead, every forecaster forecasts every tail value from the values before it. Multi-step,
each forecasts the ``horizon`` values after each origin in :func:`day_origins` (the cut,
then every period after it), from the values before the origin. The statistical models
are refitted at each origin, at most once a period (:mod:`attnlstm.baselines`); the model
is the checkpoint as trained. MASE divides by the naive forecast's MAE at the same points
and steps ahead (the last value, repeated), per series, then averages over series.

Beside the scores, each forecaster's margin to the model: the model's MASE over its, with
a 95% interval from resampling whole held-out days (a day's errors move together, so the
days, not the points, are the independent draws), and on how many days the model was
the better of the two. Sixteen days are few: a margin of a few percent either way is
often inside its interval, and the interval says so.
"""

from __future__ import annotations

import dataclasses
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
from attnlstm.intervals import Spread, adapted, online_intervals, window_scale
from attnlstm.metrics import seasonal_naive, smape
from attnlstm.model import AttentionLSTM
from attnlstm.train import predict
from attnlstm.windows import SeriesWindows, Windows, split_point

Forecaster = Callable[[np.ndarray, int], Rolled]  # (series, cut) -> its forecasts
RESAMPLES = 2_000  # bootstrap resamples of the held-out days behind each margin's interval
# Days a series' tail is resampled in at most: a longer tail (steps without a period, or
# years of them) is cut into this many runs of consecutive days, which bounds the memory a
# resample takes (RESAMPLES x MAX_DAYS indices, 16 MB) whatever the data's length.
MAX_DAYS = 1_000
# A day counts as the model's only where its error is the smaller by more than this share
# of the naive forecast's: a model that forecasts the last value, as naive does, differs
# from it by float32 rounding alone, and won 9 of 14 days of the margins against naive.
TIE = 1e-6


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


@dataclass(frozen=True)
class Margin:
    """The model's MASE over one other forecaster's, on the same points: below 1 the
    model's error is the smaller. ``low`` and ``high`` bound a 95% interval from
    resampling the held-out days; ``wins`` counts the days (one step ahead: the values
    between two origins; multi-step: the origins' forecasts) on which the model's error
    was the smaller (beyond TIE), of ``days``. A tail of more than MAX_DAYS days is resampled and
    counted in runs of consecutive days instead."""

    name: str
    ratio: float  # one step ahead
    low: float
    high: float
    wins: int
    days: int
    ahead_ratio: float  # over every step of the multi-step forecasts (NaN: none)
    ahead_low: float
    ahead_high: float
    ahead_wins: int
    origins: int


@dataclass(frozen=True)
class Comparison:
    rows: list[Row]  # every forecaster's scores
    margins: list[Margin]  # every forecaster but the model, against the model


@dataclass(frozen=True)
class _Days:
    """One forecaster's absolute errors on one series, summed per held-out day (one
    step ahead) and per origin (every step of its multi-step forecast), and the naive
    forecast's at the same points: MASE over any set of days is the ratio of their sums."""

    one: np.ndarray  # (days,)
    one_naive: np.ndarray
    ahead: np.ndarray  # (origins,)
    ahead_naive: np.ndarray


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
) -> Comparison:
    """The model (its intervals from ``spread``, adapted online as the worker does), the
    naive forecasts and ``stat_models`` (their intervals adapted the same way, so that
    every coverage is reached on the same terms), scored on the same points, and each
    one's margin to the model; with ``progress``, a bar over the statistical models'
    refits on stderr (the sea temperature's 240 take minutes).

    MSTL has seasons P and 7P where the data is long enough for the model's weekly lags,
    and is scored again with P alone ("MSTL (P)"): given a weekly season the data does
    not have, it forecast the water flow a day ahead 3.3x worse than with the daily one
    alone; the electricity load, which has one, 7% better."""
    horizon = model.config.horizon
    step = period or horizon
    cuts = [split_point(len(y), val_fraction) for y in dataset.series]
    short = [n for n, cut in zip(dataset.names, cuts, strict=True) if cut < model.config.context]
    if short:
        raise ValueError(
            f"series {short[0]!r} has fewer values before its held-out tail than the model "
            f"reads ({model.config.context}): lower val_fraction (--val-fraction) or use "
            "longer data"
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
    stats = [(name, weekly) for name in stat_models]
    if weekly and "MSTL" in stat_models:
        stats.append(("MSTL", False))
    bar = tqdm(
        total=origins * len(stats),
        desc="baselines",
        unit="refit",
        disable=not progress or not stat_models,
    )
    forecasters += [
        (
            name if weekly_season == weekly else f"{name} ({period})",
            functools.partial(_stat, name, period, horizon, weekly_season, level, bar),
        )
        for name, weekly_season in stats
    ]
    rows, days = [], []
    with bar:
        for name, forecast in forecasters:
            bar.set_postfix_str(name)
            started = time.perf_counter()
            runs = [forecast(y, cut) for y, cut in zip(dataset.series, cuts, strict=True)]
            seconds = time.perf_counter() - started
            per_series = zip(runs, dataset.series, cuts, strict=True)
            days.append([_days(run, y, cut, step) for run, y, cut in per_series])
            rows.append(_row(name, runs, days[-1], dataset.series, cuts, seconds))
    margins = [
        _margin(row.name, days[0], other) for row, other in zip(rows[1:], days[1:], strict=True)
    ]
    return Comparison(rows, margins)


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
    """``name``'s forecasts, its one-step intervals adapted online as the model's are:
    as fitted, MSTL's covered 80% of the electricity demand's tail and AutoETS's 99% of
    the water flow's, where the model's, adapted, covered 89%."""
    run = rolled(
        name,
        y,
        cut=cut,
        period=period,
        horizon=horizon,
        weekly=weekly,
        level=level,
        refitted=bar.update,
    )
    centre, half = (run.one_hi + run.one_lo) / 2, (run.one_hi - run.one_lo) / 2
    lo, hi, _ = adapted(y[cut:], centre, half, level / 100)
    return dataclasses.replace(run, one_lo=lo, one_hi=hi)


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


def _days(run: Rolled, y: np.ndarray, cut: int, step: int) -> _Days:
    """``run``'s errors on ``y``'s tail summed per day: the values from each ``step``
    after the cut (the last day may be short), and each origin's forecast; in at most
    MAX_DAYS runs of consecutive days."""
    tail = len(y) - cut
    days = -(-tail // step)
    day = np.arange(tail) // (step * -(-days // MAX_DAYS))  # whole days to a run
    origins = day_origins(len(y), cut, step, run.ahead.shape[1])
    target = y[origins[:, None] + np.arange(run.ahead.shape[1])]
    run_of = np.arange(origins.size) // max(1, -(-origins.size // MAX_DAYS))
    return _Days(
        one=np.bincount(day, np.abs(y[cut:] - run.one_step)),
        one_naive=np.bincount(day, np.abs(y[cut:] - y[cut - 1 : -1])),
        ahead=np.bincount(run_of, np.abs(target - run.ahead).sum(axis=1)),
        ahead_naive=np.bincount(run_of, np.abs(target - y[origins - 1, None]).sum(axis=1)),
    )


def _row(
    name: str,
    runs: list[Rolled],
    days: list[_Days],
    series: list[np.ndarray],
    cuts: list[int],
    seconds: float,
) -> Row:
    """The scores of one forecaster. A series whose naive forecast makes no error (a
    constant tail) has no ratio to it, and is left out of the ratios, as
    :func:`attnlstm.metrics.mase` leaves it out (one such series made every ratio NaN);
    NaN where every series is one, without numpy's warning for each."""
    smapes, coverage, width = [], [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for run, d, y, cut in zip(runs, days, series, cuts, strict=True):
            truth = y[cut:]
            smapes.append(smape(truth, run.one_step))
            coverage.append(float(np.mean((run.one_lo <= truth) & (truth <= run.one_hi))))
            # the mean width over the naive MAE, as the ratio of their sums over the tail
            if d.one_naive.sum() > 0:
                width.append(float(np.sum(run.one_hi - run.one_lo)) / d.one_naive.sum())
        ahead = [
            d.ahead.sum() / d.ahead_naive.sum()
            for d in days
            if d.ahead.size and d.ahead_naive.sum() > 0
        ]
        one = [d.one.sum() / d.one_naive.sum() for d in days if d.one_naive.sum() > 0]
        mase = float(np.mean(one)) if one else math.nan
    no_interval = bool(np.isnan(runs[0].one_lo).all())
    return Row(
        name=name,
        mase=mase,
        smape=float(np.mean(smapes)),
        ahead_mase=float(np.mean(ahead)) if ahead else math.nan,
        coverage=math.nan if no_interval else float(np.mean(coverage)),
        width=math.nan if no_interval or not width else float(np.mean(width)),
        seconds=seconds,
    )


def _margin(name: str, model: list[_Days], other: list[_Days]) -> Margin:
    """The model's margin to ``other``, series by series."""
    pairs = [(m, o) for m, o in zip(model, other, strict=True) if m.one_naive.sum() > 0]
    ahead = [(m, o) for m, o in pairs if m.ahead.size and m.ahead_naive.sum() > 0]
    ratio, low, high = _ratio([(m.one, o.one, m.one_naive) for m, o in pairs])
    ahead_ratio, ahead_low, ahead_high = _ratio(
        [(m.ahead, o.ahead, m.ahead_naive) for m, o in ahead]
    )
    return Margin(
        name,
        ratio=ratio,
        low=low,
        high=high,
        wins=sum(int(np.sum(m.one < o.one - TIE * m.one_naive)) for m, o in pairs),
        days=sum(m.one.size for m, _ in pairs),
        ahead_ratio=ahead_ratio,
        ahead_low=ahead_low,
        ahead_high=ahead_high,
        ahead_wins=sum(int(np.sum(m.ahead < o.ahead - TIE * m.ahead_naive)) for m, o in ahead),
        origins=sum(m.ahead.size for m, _ in ahead),
    )


def _ratio(
    per_series: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> tuple[float, float, float]:
    """The model's mean MASE over the other's, from each series' errors per day (the
    model's, the other's, the naive forecast's): over every day, and the 2.5 and 97.5
    percentiles over RESAMPLES resamples of the days. Series k's days are drawn from a
    generator seeded with k, so that every forecaster meets the model on the same
    resampled days, and a run gives the same intervals as the one before. NaN where
    there are no days."""
    if not per_series:
        return math.nan, math.nan, math.nan
    model, other = np.zeros(RESAMPLES + 1), np.zeros(RESAMPLES + 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # a flat tail: no naive error
        for k, (ours, theirs, naive) in enumerate(per_series):
            picks = np.random.default_rng(k).integers(0, naive.size, (RESAMPLES, naive.size))
            picks = np.vstack([np.arange(naive.size), picks])  # every day once, first
            total = naive[picks].sum(axis=1)
            model += ours[picks].sum(axis=1) / total
            other += theirs[picks].sum(axis=1) / total
        ratio = model / other  # of the sums over the series, as of their means
        low, high = np.percentile(ratio[1:], [2.5, 97.5])  # inf - inf: a perfect other
    return float(ratio[0]), float(low), float(high)


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


def format_margins(comparison: Comparison, *, horizon: int) -> str:
    """The margins as a Markdown table, in the scores' order (best one-step MASE first)."""
    order = [r.name for r in sorted(comparison.rows, key=lambda r: r.mase)]
    lines = [
        f"| the model's MASE over | 1 step (95% interval) | days the model is better "
        f"| 1-{horizon} steps (95% interval) | forecasts the model is better |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m in sorted(comparison.margins, key=lambda m: order.index(m.name)):
        ahead = (
            "-"
            if math.isnan(m.ahead_ratio)
            else f"{m.ahead_ratio:.2f}x ({m.ahead_low:.2f}-{m.ahead_high:.2f})"
        )
        lines.append(
            f"| {m.name} | {m.ratio:.2f}x ({m.low:.2f}-{m.high:.2f}) | {m.wins} of {m.days} "
            f"| {ahead} | {m.ahead_wins} of {m.origins} |"
        )
    return "\n".join(lines)


def _cell(value: float, form: str) -> str:
    return "-" if math.isnan(value) else form.format(value)
