"""Every forecaster scored on the same held-out points and steps ahead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlstm.baselines import available
from attnlstm.data import Dataset
from attnlstm.heldout import compare, format_table
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
        for r in compare(_seasonal_naive_model(), _data(), spread=_spread(), period=PERIOD)
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
    )
    ets = next(r for r in rows if r.name == "AutoETS")
    assert 0 < ets.mase < 1  # a seasonal series: better than the last value
    assert 0.5 < ets.coverage <= 1.0
    assert ets.width > 0
    # the progress bar counts the refits: one a period from the cut (240) while a
    # horizon fits, 240 to 294
    last = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "baselines: 100%" in last
    assert "| 10/10 " in last
