"""Every forecaster scored on the same held-out points and steps ahead."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnlstm.baselines import available
from attnlstm.data import Dataset
from attnlstm.heldout import MAX_DAYS, _ratio, compare, format_margins, format_table
from attnlstm.intervals import LEVELS, Spread
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import new_model

PERIOD = 6


def _seasonal_naive_model() -> AttentionLSTM:
    """A model whose weights make it the seasonal naive forecast: step k ahead is the
    value one period before it, the window's position k - 1."""
    config = ModelConfig(window=PERIOD, horizon=PERIOD, lags=(PERIOD,), period=PERIOD)
    model = new_model(config, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.linear.weight.zero_()
        features = config.input_size
        for k in range(PERIOD):
            model.linear.weight[k, (PERIOD - 1) * features] -= 1.0  # cancels the last value
            model.linear.weight[k, k * features] += 1.0  # the value one period back
    return model.eval()


def _data(seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    t = np.arange(3000)
    values = [10 + np.sin(2 * np.pi * t / PERIOD) + rng.normal(0, 0.3, t.size) for _ in range(2)]
    return Dataset(["a", "b"], values)


def _spread() -> Spread:
    return Spread(np.repeat(np.asarray(LEVELS)[:, None], PERIOD, axis=1) * 2)


def test_the_model_is_scored_on_the_same_points_as_the_baselines() -> None:
    rows = {
        r.name: r
        for r in compare(_seasonal_naive_model(), _data(), spread=_spread(), period=PERIOD).rows
    }
    assert set(rows) == {"model", "naive", f"seasonal naive ({PERIOD})"}
    seasonal = rows[f"seasonal naive ({PERIOD})"]
    assert rows["model"].mase == pytest.approx(seasonal.mase, rel=1e-6)  # float32 weights
    assert rows["model"].ahead_mase == pytest.approx(
        seasonal.ahead_mase, rel=1e-6
    )  # float32 weights
    assert rows["model"].smape == pytest.approx(seasonal.smape, rel=1e-6)  # float32 weights
    assert rows["naive"].mase == rows["naive"].ahead_mase == 1.0  # its own scale
    assert np.isnan(seasonal.coverage)  # no intervals
    assert 0.85 <= rows["model"].coverage <= 0.95  # adapted online from a wrong spread
    table = format_table(list(rows.values()), horizon=PERIOD)
    assert table.splitlines()[0].startswith("| forecaster | MASE, 1 step")
    assert f"| seasonal naive ({PERIOD}) | {seasonal.mase:.3f} |" in table


def test_each_margin_is_the_ratio_of_the_scores_with_an_interval_over_the_days() -> None:
    comparison = compare(_seasonal_naive_model(), _data(), spread=_spread(), period=PERIOD)
    rows = {r.name: r for r in comparison.rows}
    margins = {m.name: m for m in comparison.margins}
    assert set(margins) == set(rows) - {"model"}
    # Two series, 600 held-out values each: 100 days of 6 values, and 100 origins whose
    # 6 steps ahead fit before the end.
    naive, seasonal = margins["naive"], margins[f"seasonal naive ({PERIOD})"]
    assert (naive.days, naive.origins) == (200, 200)
    assert naive.ratio == pytest.approx(rows["model"].mase / rows["naive"].mase)
    assert naive.ahead_ratio == pytest.approx(rows["model"].ahead_mase / rows["naive"].ahead_mase)
    # The model is seasonal naive (to float32): a margin of 1, and an interval as narrow.
    assert seasonal.ratio == pytest.approx(1, rel=1e-5)
    assert 1 - 1e-5 < seasonal.low <= seasonal.high < 1 + 1e-5
    # Nor does it win a day from it by rounding (it won some, as naive, of its own).
    assert (seasonal.wins, seasonal.ahead_wins) == (0, 0)
    # Against naive the seasonal forecast is better on most days, and the interval,
    # around the ratio, stays clear of 1: the noise is a third of the season's swing.
    assert naive.low < naive.ratio < naive.high < 1
    assert naive.wins > naive.days * 0.8
    table = format_margins(comparison, horizon=PERIOD)
    assert f"| naive | {naive.ratio:.2f}x ({naive.low:.2f}-{naive.high:.2f}) | " in table
    assert f"| {naive.wins} of 200 |" in table


def test_the_interval_spans_one_where_the_days_disagree_and_not_where_they_agree() -> None:
    """Per-day errors (the naive forecast's 1 on every day) of a model better by half
    on 40 days and worse by half on 40, against the other forecaster: a margin of 1, and
    an interval either side of it. Twice as good on every day: 0.5, and no spread."""
    naive, half, whole = np.ones(80), np.full(40, 0.5), np.ones(40)
    ratio, low, high = _ratio([(np.r_[half, whole], np.r_[whole, half], naive)])
    assert ratio == 1.0
    assert 0.8 < low < 0.95
    assert 1.05 < high < 1.25
    assert _ratio([(np.full(80, 0.5), np.ones(80), naive)]) == (0.5, 0.5, 0.5)
    with np.errstate(all="raise"):  # another forecaster with no error (a perfect cycle):
        ratio, low, high = _ratio([(np.full(80, 0.5), np.zeros(80), naive)])  # no warning
    assert ratio == math.inf
    assert all(np.isnan(_ratio([])))  # no multi-step forecasts


def test_a_long_tail_is_resampled_in_runs_of_days() -> None:
    """A series of 200,000 values without a period, forecast one step ahead: its 40,000
    held-out days of one value each are resampled in MAX_DAYS runs of 40 (not 2,000 x
    40,000 indices, 640 MB)."""
    model = new_model(ModelConfig(window=4, hidden_size=2, attention_size=2), seed=0)
    y = np.random.default_rng(0).normal(size=200_000).cumsum()
    spread = Spread(np.asarray(LEVELS)[:, None] * 2.0)  # one step ahead
    comparison = compare(model.eval(), Dataset(["walk"], [y]), spread=spread, period=0)
    naive = next(m for m in comparison.margins if m.name == "naive")
    assert naive.days == naive.origins == MAX_DAYS
    assert naive.low <= naive.ratio <= naive.high


def test_a_model_that_needs_more_history_than_the_data_has_is_a_clear_error() -> None:
    short = Dataset(["a"], [np.arange(40.0)])
    with pytest.raises(ValueError, match="fewer values before its held-out tail"):
        compare(_seasonal_naive_model(), short, spread=_spread(), period=PERIOD, val_fraction=0.9)


@pytest.mark.skipif(not available(), reason="statsforecast is not installed")
def test_the_statistical_models_are_scored_beside_it(capsys: pytest.CaptureFixture[str]) -> None:
    data = Dataset(["a"], [_data().series[0][:300]])
    rows = compare(
        _seasonal_naive_model(),
        data,
        spread=_spread(),
        period=PERIOD,
        stat_models=("AutoETS",),
        progress=True,
    ).rows
    ets = next(r for r in rows if r.name == "AutoETS")
    assert 0 < ets.mase < 1  # a seasonal series: better than the last value
    assert 0.5 < ets.coverage <= 1.0
    assert ets.width > 0
    # the progress bar counts the refits: one a period from the cut (240) while a
    # horizon fits, 240 to 294
    last = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "baselines: 100%" in last
    assert "| 10/10 " in last


@pytest.mark.skipif(not available(), reason="statsforecast is not installed")
def test_mstl_is_also_scored_without_a_weekly_season_and_every_interval_adapts() -> None:
    """A model with weekly lags gave MSTL seasons P and 7P whether or not the data has
    a weekly cycle: it forecast the water flow a day ahead 3.3x worse than with P
    alone. And each statistical model's intervals adapt online as the model's do (as
    fitted, MSTL's covered 80% of the electricity demand's tail, the model's 89%)."""
    config = ModelConfig(window=PERIOD, horizon=PERIOD, lags=(PERIOD, 6 * PERIOD, 7 * PERIOD))
    model = new_model(config, seed=0).eval()
    data = Dataset(["a"], [_data().series[0][:1200]])
    rows = compare(
        model, data, spread=_spread(), period=PERIOD, stat_models=("MSTL",), val_fraction=0.5
    ).rows
    weekly, daily = (next(r for r in rows if r.name == n) for n in ("MSTL", f"MSTL ({PERIOD})"))
    # no weekly cycle here: the weekly season only adds noise
    assert daily.ahead_mase < weekly.ahead_mase
    for row in (weekly, daily):
        assert 0.85 <= row.coverage <= 0.95, row


def test_a_constant_series_beside_others_is_left_out_of_the_ratios() -> None:
    """One constant series among others: the ratios are the others', as `evaluate`'s
    own MASE takes them (it made every ratio of the table NaN)."""
    t = np.arange(600.0)
    noise = 0.1 * np.random.default_rng(3).standard_normal(600)
    wave = 10 + np.sin(2 * np.pi * t / PERIOD) + noise
    model, spread = _seasonal_naive_model(), _spread()
    alone = compare(model, Dataset(["wave"], [wave]), spread=spread, period=PERIOD)
    flat = np.full(600, 5.0)
    both = compare(model, Dataset(["wave", "flat"], [wave, flat]), spread=spread, period=PERIOD)
    for one, two in zip(alone.rows, both.rows, strict=True):
        assert np.isfinite(two.mase), two
        assert two.mase == pytest.approx(one.mase)
        assert two.ahead_mase == pytest.approx(one.ahead_mase, nan_ok=True)
    assert [m.ratio for m in both.margins] == pytest.approx([m.ratio for m in alone.margins])
    # the days of the series in the ratios: those of both series made it "10 of 20"
    assert [m.days for m in both.margins] == [m.days for m in alone.margins]


def test_a_constant_series_has_no_ratio_to_naive_and_says_so_quietly() -> None:
    """The naive forecast of a constant makes no error: each ratio to it is NaN, which
    numpy warned of, once for every one, in the middle of `evaluate --baselines`."""
    flat = Dataset(["flat"], [np.full(600, 5.0)])
    with np.errstate(all="raise"):  # a warning here would be an error
        rows = compare(_seasonal_naive_model(), flat, spread=_spread(), period=PERIOD).rows
    assert all(np.isnan(row.mase) for row in rows)
