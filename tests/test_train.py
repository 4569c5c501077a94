"""Training really forecasts, is reproducible, and keeps its best weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlstm.data import Dataset, load_dataset
from attnlstm.experiment import (
    PROFILE_WEEKS,
    SEASONAL_HIDDEN,
    dataset_config,
    evaluate_model,
    has_weekly_cycle,
    seasonal_config,
    series_forecast,
    split_dataset,
    train_model,
)
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import article_sine
from attnlstm.train import (
    TrainConfig,
    auto_epochs,
    fit,
    lead_weights,
    new_model,
    predict,
    scaled_loss,
)
from attnlstm.windows import (
    SeriesWindows,
    Windows,
    sliding_windows,
    sliding_windows_many,
    split_windows,
    time_split,
)


def test_loss_refuses_the_articles_broadcasting_shapes() -> None:
    model = new_model(ModelConfig(), seed=0)
    x = torch.randn(8, 20)
    with pytest.raises(ValueError, match="do not match"):
        scaled_loss(model, x, torch.randn(8, 1, 1))
    assert scaled_loss(model, x, torch.randn(8, 1)).shape == ()


def test_article_sine_is_forecast_not_flattened() -> None:
    # The article's code reaches a loss of 0.507, the sine's variance: a flat line.
    dataset = load_dataset("sine")
    model, result, metrics = train_model(dataset, ModelConfig(), TrainConfig(epochs=60, seed=0))
    assert metrics["val_mse"] < metrics["naive_mse"] / 20
    val = split_dataset(dataset, 20, 1, 0.2).val.build()
    yhat, _ = predict(model, val.x)
    assert yhat.shape == val.y.shape
    # a flat line has no spread; a forecast has the truth's
    assert np.std(yhat) == pytest.approx(np.std(val.y), rel=0.05)
    assert result.epochs_run <= 60


def _small_split() -> tuple[Windows, Windows]:
    s = article_sine()
    return time_split(sliding_windows_many([s], 20, 1), [len(s)], 0.2)


def test_same_seed_same_model() -> None:
    train, val = _small_split()
    runs = []
    for _ in range(2):
        model = new_model(ModelConfig(hidden_size=8, attention_size=8), seed=5)
        result = fit(model, train, val, TrainConfig(epochs=3, seed=5))
        runs.append((result.train_loss, result.val_loss, model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert runs[0][1] == runs[1][1]
    for name, tensor in runs[0][2].items():
        assert torch.equal(tensor, runs[1][2][name]), name


def test_unbuilt_windows_train_the_model_built_ones_do() -> None:
    # Gathered a batch at a time from the series' values, the training windows of a
    # seasonal model (lags and a profile: a context of 10 periods) are the same values,
    # so the same model, loss for loss and weight for weight.
    rng = np.random.default_rng(4)
    t = np.arange(400)
    series = [a * np.sin(2 * np.pi * t / 8) + rng.normal(0, 0.1, t.size) for a in (1, 3)]
    config = ModelConfig(
        window=8, horizon=4, lags=(8, 48, 56), period=8, profile_weeks=1, hidden_size=4
    )
    lazy, val = split_windows(series, config.context, config.horizon, 0.2)
    built = lazy.build()
    runs = []
    for train in (lazy, built):
        model = new_model(config, seed=1)
        result = fit(model, train, val.build(), TrainConfig(epochs=2, seed=1))
        runs.append((result.train_loss, result.val_loss, model.state_dict()))
    assert runs[0][:2] == runs[1][:2]
    for name, tensor in runs[0][2].items():
        assert torch.equal(tensor, runs[1][2][name]), name
    np.testing.assert_array_equal(
        predict(model, val, batch_size=7)[0], predict(model, val.build().x)[0]
    )


def test_values_that_are_not_finite_are_refused_not_forecast_as_nan() -> None:
    """A NaN in a series made the training "diverge", an inf in the tail a NaN score,
    and predict forecast NaN around one: each is now said where it is."""
    series = [np.sin(np.arange(300) * 0.2), np.sin(np.arange(300) * 0.3)]
    series[1][100] = np.nan
    with pytest.raises(ValueError, match="series 1 has a value that is not finite at 100: nan"):
        split_windows(series, 20, 3, 0.2)
    with pytest.raises(ValueError, match="series 1 has a value that is not finite at 100"):
        train_model(Dataset(["a", "b"], series), ModelConfig(window=20), TrainConfig(epochs=1))
    model = new_model(ModelConfig(window=20, hidden_size=4, attention_size=4), seed=0)
    windows = np.tile(np.linspace(0.0, 1.0, 20), (3, 1))
    windows[2, 5] = np.inf
    with pytest.raises(
        ValueError, match=r"window 2 has a value that is not finite or beyond \+-1e\+30 at 5: inf"
    ):
        predict(model, windows)
    # ... however the windows come: unbuilt ones made directly (as heldout makes them),
    # built ones given to fit (whose NaN was "training diverged"), a tensor.
    values = np.sin(np.arange(60) * 0.2)
    values[30] = np.nan
    points = np.arange(40, 60)
    unbuilt = SeriesWindows(values, points, points, np.zeros_like(points), 20, 1)
    with pytest.raises(
        ValueError, match=r"the series hold a value that is not finite or beyond \+-1e\+30 at 30"
    ):
        predict(model, unbuilt)
    train, val = split_windows([np.sin(np.arange(300) * 0.2)], 20, 1, 0.2)
    built = train.build()
    built.y[7, 0] = -np.inf
    with pytest.raises(
        ValueError,
        match=r"window 7 has a target that is not finite or beyond \+-1e\+30 at 0: -inf",
    ):
        fit(model, built, val, TrainConfig(epochs=1))
    with pytest.raises(
        ValueError, match=r"window 2 has a value that is not finite or beyond \+-1e\+30 at 5: inf"
    ):
        predict(model, torch.as_tensor(windows))


def test_values_past_value_max_are_refused_not_forecast_as_nan() -> None:
    """1e160 is finite, and its square in the model's deviation is not: predict gave NaN
    forecasts, and training said it diverged."""
    model = new_model(ModelConfig(window=5, hidden_size=4, attention_size=4), seed=0)
    with pytest.raises(ValueError, match=r"window 0 has a value .* beyond \+-1e\+30 at 0: 1e\+160"):
        predict(model, np.array([[1e160, -1e160, 1e160, 1.0, 0.0]]))
    series = np.sin(np.arange(200) * 0.3) * 1e160
    with pytest.raises(ValueError, match=r"the series hold a value .* beyond \+-1e\+30 at 1:"):
        train_model(Dataset(["a"], [series]), ModelConfig(window=5), TrainConfig(epochs=1))
    assert np.isfinite(predict(model, np.array([[1e30, -1e30, 1e30, 1.0, 0.0]]))[0]).all()
    # In float16, 1e30 is inf: the bound alone let its inf through.
    with pytest.raises(ValueError, match=r"window 0 has a value .* at 1: inf"):
        predict(model, torch.tensor([[1.0, float("inf"), 0.0, 1.0, 0.0]], dtype=torch.float16))


def test_predict_takes_built_windows_and_refuses_a_batch_size_below_one() -> None:
    """Built windows were "not subscriptable"; -1 gave no forecasts, and 0 range()'s error."""
    model = new_model(ModelConfig(window=5, hidden_size=4, attention_size=4), seed=0)
    windows = sliding_windows(np.sin(np.arange(40) * 0.3), 5)
    np.testing.assert_array_equal(predict(model, windows)[0], predict(model, windows.x)[0])
    for size in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {size}"):
            predict(model, windows, batch_size=size)


def test_predict_runs_where_the_model_is_unless_told() -> None:
    """It ran on "cpu" whatever the model's device: after fit(device="cuda"), predict
    failed on torch's "Input and parameter tensors are not at the same device". A model
    on the meta device stands in for one on a GPU: predict goes there, and fails there."""
    model = new_model(ModelConfig(window=5, hidden_size=4, attention_size=4), seed=0)
    x = np.tile(np.linspace(0.0, 1.0, 5), (2, 1))
    assert predict(model, x)[0].shape == (2, 1)
    model.to("meta")
    with pytest.raises(NotImplementedError, match="meta"):  # its forecasts are on meta
        predict(model, x)


def test_fit_refuses_windows_of_another_width_than_the_model_reads() -> None:
    """Windows narrower than the model's context failed in the step weights, on "window
    must be in [1, 3]", which named neither the windows nor the model."""
    model = new_model(ModelConfig(window=5, hidden_size=4, attention_size=4), seed=0)
    train, val = split_windows([np.sin(np.arange(200) * 0.3)], 3, 1, 0.2)
    with pytest.raises(
        ValueError, match="the training windows hold 3 values each, and the model reads 5"
    ):
        fit(model, train, val, TrainConfig(epochs=1))


def test_predict_takes_a_tensor_that_requires_grad() -> None:
    """The finite check read it through numpy, which refuses such a tensor."""
    model = new_model(ModelConfig(window=20, hidden_size=4, attention_size=4), seed=0)
    x = torch.linspace(0.0, 1.0, 40, dtype=torch.float64).reshape(2, 20).requires_grad_()
    assert predict(model, x)[0].shape == (2, 1)


def test_configs_take_numpy_integers_as_the_whole_numbers_they_are() -> None:
    """`for seed in np.arange(5)` and sizes read from an array: refused by a type check
    that took only Python's int."""
    config = ModelConfig(window=np.int64(20), horizon=np.int32(3), lags=np.arange(1, 3))  # type: ignore[arg-type]
    assert (config.window, config.horizon, config.lags) == (20, 3, (1, 2))
    assert type(config.window) is int
    assert all(type(lag) is int for lag in config.lags)
    assert type(TrainConfig(epochs=np.int64(2), seed=np.int64(4)).seed) is int  # type: ignore[arg-type]


def test_fit_takes_the_validation_windows_split_windows_gives() -> None:
    """Unbuilt, as split_windows returns them: an AttributeError ('no attribute x')."""
    train, val = split_windows([np.sin(np.arange(300) * 0.2)], 20, 3, 0.2)
    config = TrainConfig(epochs=1, blend=False)
    lazy = fit(new_model(ModelConfig(window=20, horizon=3), seed=0), train, val, config)
    built = fit(new_model(ModelConfig(window=20, horizon=3), seed=0), train, val.build(), config)
    assert lazy.val_loss == built.val_loss


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({"batch_size": 2.5}, TypeError, "batch_size must be a whole number, got 2.5"),
        ({"epochs": 1.5}, TypeError, "epochs must be a whole number, got 1.5"),
        ({"weight_decay": -1.0}, ValueError, "weight_decay must be >= 0 and finite, got -1.0"),
        ({"lr": float("inf")}, ValueError, "lr and clip_norm must be > 0 and finite"),
    ],
)
def test_train_config_refuses_what_the_training_would_fail_on(
    fields: dict[str, float], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        TrainConfig(**fields)  # type: ignore[arg-type]


def test_time_split_refuses_fewer_lengths_than_series() -> None:
    windows = sliding_windows_many([np.arange(10.0), np.arange(10.0)], 3)
    with pytest.raises(ValueError, match="windows of 2 series, but 1 lengths"):
        time_split(windows, [10], 0.2)
    # Lengths of other series: 276 of 295 windows were "validation", without a word.
    windows = sliding_windows(np.sin(np.linspace(0, 50, 300)), 5)
    with pytest.raises(ValueError, match="window 25 of series 0 has targets up to 31, past"):
        time_split(windows, [30], 0.2)


def test_a_flag_that_is_no_bool_is_refused() -> None:
    """linear="no" and blend="no" were taken as true; linear=0 was another version."""
    with pytest.raises(TypeError, match="linear must be True or False, got 'no'"):
        ModelConfig(linear="no")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="linear must be True or False, got 0"):
        ModelConfig(linear=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="blend must be True or False, got 'no'"):
        TrainConfig(blend="no")  # type: ignore[arg-type]


def test_best_weights_are_kept_and_patience_stops_early() -> None:
    train, val = _small_split()
    model = new_model(ModelConfig(hidden_size=8, attention_size=8), seed=0)
    # An absurd learning rate makes validation loss bounce, so patience gets used.
    config = TrainConfig(epochs=40, lr=0.5, patience=3, seed=0, blend=False)
    result = fit(model, train, val, config)
    assert result.epochs_run < 40
    assert result.epochs_run - result.best_epoch == 3
    best = min(result.val_loss)
    assert result.val_loss[result.best_epoch - 1] == best
    vx = torch.as_tensor(val.x, dtype=torch.float32)
    vy = torch.as_tensor(val.y, dtype=torch.float32)
    with torch.inference_mode():
        assert scaled_loss(model, vx, vy).item() == pytest.approx(best, rel=1e-6)


def test_training_with_no_finite_validation_loss_is_an_error() -> None:
    """The first weights were kept as if trained (no loss is below inf but a finite one),
    and `train` wrote them out, exit 0, every score null."""
    train, val = _small_split()
    model = new_model(ModelConfig(hidden_size=4, attention_size=4), seed=0)
    with pytest.raises(ValueError, match=r"^training diverged: no epoch's validation loss was"):
        fit(model, train, val, TrainConfig(epochs=3, lr=1e20, seed=0, blend=False))


def test_progress_bar_is_silent_when_off(capsys: pytest.CaptureFixture[str]) -> None:
    train, val = _small_split()
    fit(new_model(ModelConfig(hidden_size=4, attention_size=4)), train, val, TrainConfig(epochs=2))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_auto_epochs_aims_at_a_step_budget() -> None:
    assert auto_epochs(784, 64) == 231  # the article's sine: 13 steps an epoch
    assert auto_epochs(39_000, 64) == 5
    assert auto_epochs(10_000_000, 64) == 3
    assert auto_epochs(10, 64) == 300


def test_no_validation_windows_is_a_clear_error() -> None:
    dataset = load_dataset("sine")
    dataset.series[0] = dataset.series[0][:22]
    with pytest.raises(ValueError, match=r"too little data: .* leave 0 training and 2 val"):
        split_dataset(dataset, 20, 1, 0.2)
    # Scoring needs no training part: "0 training windows" was no reason there.
    dataset.series[0] = dataset.series[0][:20]
    with pytest.raises(ValueError, match=r"too little data to score: .* its last 0\.2 holds no"):
        split_dataset(dataset, 20, 1, 0.2, training=False)


def test_a_tail_is_scored_and_forecast_to_its_last_step() -> None:
    """`evaluate` refused a tail with no training windows before it (the cut inside the
    first window's targets), which it never reads; and the plot's one-step forecasts
    stopped horizon - 1 steps short of the series' end, those steps need no targets."""
    model = new_model(ModelConfig(window=10, horizon=5), seed=0)
    values = np.sin(np.arange(20) / 3)
    dataset = Dataset(["s"], [values])
    with pytest.raises(ValueError, match="0 training and 4 validation windows"):
        split_dataset(dataset, 10, 5, 0.4)
    metrics = evaluate_model(model, dataset, val_fraction=0.4)
    assert np.isfinite(metrics["val_mse"])
    assert np.isfinite(metrics["mase"])
    steps, forecast, attention = series_forecast(model, values)
    assert steps.tolist() == list(range(10, 20))
    assert forecast.shape == (10,)
    assert attention.shape == (10, 10)


def test_a_high_level_series_keeps_its_small_swing(trained_sines: AttentionLSTM) -> None:
    # float32 windows would round 1e6 + sin(t) to steps of 0.0625 before the model
    # ever saw them.
    x = sliding_windows(article_sine(), 20).x[::5]
    yhat, _ = predict(trained_sines, x)
    yhat_high, _ = predict(trained_sines, x + 1e6)
    np.testing.assert_allclose(yhat_high - 1e6, yhat, atol=1e-6)


def test_the_seasonal_default_sees_a_day_and_the_same_hours_a_week_before() -> None:
    assert seasonal_config(48, [4032], weekly_cycle=True) == ModelConfig(
        window=48,
        horizon=48,
        lags=(48, 288, 336),
        period=48,
        profile_weeks=PROFILE_WEEKS,
        hidden_size=SEASONAL_HIDDEN,
        attention_size=SEASONAL_HIDDEN,
    )
    # The profile reaches furthest: PROFILE_WEEKS weeks and three days before the last value
    reach = (7 * PROFILE_WEEKS + 3) * 48 + 1
    assert seasonal_config(48, [4032], weekly_cycle=True).context == reach
    assert seasonal_config(48, [4032]).context == 48 + 336  # no weekly cycle: no profile
    # Less than three weeks before the held-out tail: yesterday only, and no profile.
    assert seasonal_config(24, [600]).lags == (24,)
    assert seasonal_config(24, [600], weekly_cycle=True).profile_weeks == 0
    # Two days ahead on a weekly cycle: no profile (it forecasts a period ahead at most).
    # Before, `train --horizon 96` on the electricity demand ended in a ValueError.
    two_days = seasonal_config(48, [4032], weekly_cycle=True, horizon=96)
    assert (two_days.horizon, two_days.profile_weeks, two_days.lags) == (96, 0, (48, 288, 336))


def test_a_weekly_cycle_is_where_last_week_forecasts_better_than_yesterday() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(24 * 7 * 6)
    daily = np.sin(2 * np.pi * t / 24) + 0.1 * rng.normal(size=t.size)
    weekday = np.where((t // 24) % 7 >= 5, 0.5, 1.0)
    assert has_weekly_cycle([daily * weekday], 24, 0.2)
    assert not has_weekly_cycle([daily * weekday], 0, 0.2)  # no period, no week
    weekly = Dataset(["demand"], [daily * weekday], 3600.0)
    assert dataset_config(weekly, 24).profile_weeks == PROFILE_WEEKS
    wandering = Dataset(["temperature"], [daily + 0.3 * np.cumsum(rng.normal(size=t.size))])
    assert dataset_config(wandering, 24).profile_weeks == 0
    assert seasonal_config(0, [600]) == ModelConfig()  # no period: the short window
    assert seasonal_config(24, [4032], horizon=1, hidden_size=8).horizon == 1


def test_training_never_sees_the_held_out_tail() -> None:
    # Early stopping picks the epoch on the part before the tail: the tail's values
    # change nothing in the model, only its scores.
    values = article_sine()
    config, train_config = ModelConfig(hidden_size=8, attention_size=8), TrainConfig(epochs=3)
    first, _, scores = train_model(Dataset(["s"], [values]), config, train_config)
    changed = values.copy()
    changed[800:] += np.linspace(0.0, 5.0, 200)  # the last 20%
    second, _, changed_scores = train_model(Dataset(["s"], [changed]), config, train_config)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert changed_scores["val_mae"] > scores["val_mae"]


@pytest.mark.parametrize("level", [1000.0, 0.1])
def test_flat_windows_weigh_no_step_ahead(level: float) -> None:
    """Windows of one value (a sensor holding still) among a varied series: the steps'
    weights are those of the varied windows alone. Counted in the data's units, or over
    a deviation of rounding error (a constant 0.1's is 1e-17), 7 of 2,950 such windows
    had set the weight of every step."""
    rng = np.random.default_rng(5)
    t = np.arange(3000.0)
    series = level + np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(3000)
    varied = sliding_windows(series, 24, 24)
    held = series.copy()
    held[1500:1530] = level  # 30 values the same: 7 windows of 24 all flat
    windows = sliding_windows(held, 24, 24)
    keep = np.array([not np.all(w == level) for w in windows.x])
    assert (~keep).sum() == 7
    alone = Windows(windows.x[keep], windows.y[keep], windows.start[keep], windows.series[keep])
    np.testing.assert_allclose(lead_weights(windows, 24), lead_weights(alone, 24), rtol=1e-9)
    assert not np.allclose(lead_weights(varied, 24), lead_weights(windows, 24) * 0)


def test_a_constant_window_is_flat_whatever_the_batch() -> None:
    """24 values of 0.1 have a deviation of rounding error (1.4e-17) in a batch of one
    and 0 in a batch of two: the model standardised by it in the one and not the other,
    and the loss divided by it (1e15 for such a window in a last, one-row batch). Flat in
    both now (FLAT), as the worker's intervals take it."""
    model = AttentionLSTM(ModelConfig(window=24, horizon=3))
    one = torch.full((1, 24), 0.1, dtype=torch.float64)
    assert torch.std(one, dim=1, unbiased=False).item() > 0  # rounding error
    alone, _ = model(one)
    batched, _ = model(one.repeat(2, 1))
    assert torch.equal(alone[0], batched[0])
    torch.testing.assert_close(alone, one[:, :3], rtol=1e-15, atol=0)  # its own level
    assert scaled_loss(model, one, one[:, :3] + 1.0).item() < 1.0  # off by 1 in its units
