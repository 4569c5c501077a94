"""The blend: chosen on validation windows, folded into the weights exactly."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from attnlstm.blend import Blend, fit_blend, fold
from attnlstm.model import ModelConfig
from attnlstm.train import TrainConfig, fit, new_model, predict
from attnlstm.windows import Windows, sliding_windows, sliding_windows_many, time_split
from tests.test_model import _profile_change

PERIOD = 8


def _windows(y: np.ndarray, config: ModelConfig) -> Windows:
    return sliding_windows(y, config.context, config.horizon)


def _mae(y: np.ndarray, yhat: np.ndarray) -> float:
    return float(np.mean(np.abs(y - yhat)))


@pytest.mark.parametrize("weeks", [0, 1])
def test_a_folded_blend_forecasts_what_it_says(weeks: int) -> None:
    config = ModelConfig(
        window=PERIOD, horizon=PERIOD, lags=(PERIOD,), period=PERIOD, profile_weeks=weeks
    )
    model = new_model(config, seed=3)
    with torch.no_grad():  # a linear map and a profile share that are not zero, so that
        model.linear.weight.normal_(std=0.05)  # scaling them shows
        if weeks:
            model.profile_share.uniform_(0, 0.5)
    rng = np.random.default_rng(0)
    t = np.arange(400)
    windows = _windows(np.sin(2 * np.pi * t / PERIOD) + 0.3 * rng.normal(size=t.size), config)
    before, _ = predict(model, windows.x)
    blend = Blend(
        model=rng.uniform(0, 1, PERIOD),
        seasonal=rng.uniform(0, 0.5, PERIOD),
        profile=rng.uniform(0, 0.5, PERIOD) if weeks else np.zeros(PERIOD),
        trend=rng.uniform(-1, 1, PERIOD),
    )
    fold(model, blend)
    after, _ = predict(model, windows.x)
    expected = _blended(blend, windows, before, weeks)
    np.testing.assert_allclose(after, expected, atol=1e-5 * np.abs(expected).max())


def test_a_profile_share_needs_a_model_with_a_profile() -> None:
    config = ModelConfig(window=PERIOD, horizon=2, period=PERIOD)
    blend = Blend(np.ones(2), np.zeros(2), np.full(2, 0.5), np.zeros(2))
    with pytest.raises(ValueError, match="the model has none"):
        fold(new_model(config), blend)


def _blended(blend: Blend, windows: Windows, yhat: np.ndarray, weeks: int = 0) -> np.ndarray:
    """The blend's formula, for a window of one period and a horizon of one period."""
    recent = windows.x[:, -PERIOD:]
    last, prev = recent[:, -1:], recent[:, -2:-1]
    seasonal = recent.copy()  # the value one period before each step's target
    seasonal[:, -1] = last[:, 0]  # the last step's is the last value: no seasonal term
    out = last + blend.model * (yhat - last) + blend.seasonal * (seasonal - last)
    if weeks:
        out += blend.profile * _profile_change(windows.x, PERIOD, weeks, PERIOD)
    return np.asarray(out + blend.trend * (last - prev))


def test_right_forecasts_are_kept_and_noise_falls_back_to_the_last_value() -> None:
    config = ModelConfig(window=20, horizon=3)
    model = new_model(config)
    rng = np.random.default_rng(1)
    windows = _windows(np.cumsum(rng.normal(size=2_000)), config)

    right = fit_blend(model, windows, windows.y)
    np.testing.assert_array_equal(right.model, 1.0)
    np.testing.assert_array_equal(right.trend, 0.0)

    noise = windows.y + 5 * rng.normal(size=windows.y.shape)
    wrong = fit_blend(model, windows, noise)
    # Noise 5x the walk's steps: the optimum keeps about var(step)/var(noise) of it
    assert (wrong.model <= 0.15).all()
    assert np.abs(wrong.trend).max() < 0.1


def test_windows_that_cannot_tell_keep_the_model_as_it_is() -> None:
    config = ModelConfig(window=PERIOD, horizon=2, period=PERIOD)
    windows = _windows(np.full(200, 7.0), config)  # flat: each weighs nothing
    blend = fit_blend(new_model(config), windows, windows.y + 1.0)
    np.testing.assert_array_equal(blend.model, 1.0)
    np.testing.assert_array_equal(blend.seasonal, 0.0)
    np.testing.assert_array_equal(blend.trend, 0.0)


def test_a_cycle_the_model_missed_and_a_trend_it_ignored_are_found() -> None:
    rng = np.random.default_rng(2)
    config = ModelConfig(window=PERIOD, horizon=PERIOD, period=PERIOD)
    t = np.arange(3_000)
    cycle = np.sin(2 * np.pi * t / PERIOD) + 0.05 * rng.normal(size=t.size)
    windows = _windows(cycle, config)
    naive = np.repeat(windows.x[:, -1:], PERIOD, axis=1)
    seasonal = fit_blend(new_model(config), windows, naive)
    assert seasonal.seasonal[0] > 0.9
    # A sine's value a period back is also a mix of its last two: judge the forecasts
    assert _mae(windows.y, _blended(seasonal, windows, naive)) < _mae(windows.y, naive) / 10

    changes = np.zeros(t.size)  # differences that follow AR(1) with 0.6: a damped trend
    for i in range(1, t.size):
        changes[i] = 0.6 * changes[i - 1] + rng.normal()
    config = ModelConfig(window=20, horizon=1)
    windows = _windows(np.cumsum(changes), config)
    trend = fit_blend(new_model(config), windows, windows.x[:, -1:])
    assert trend.trend[0] == pytest.approx(0.6, abs=0.1)


def test_a_glitch_in_the_validation_windows_does_not_set_the_blend() -> None:
    """A cycle the model missed, and a tenth of the windows in a wild random walk where
    the value a period back is far off: those windows deviate 20x the others, and
    weighed in full they would decide against the cycle for every window."""
    rng = np.random.default_rng(4)
    config = ModelConfig(window=PERIOD, horizon=PERIOD, period=PERIOD)
    t = np.arange(3_000)
    y = np.sin(2 * np.pi * t / PERIOD) + 0.05 * rng.normal(size=t.size)
    y[1_500:1_800] += np.cumsum(10 * rng.normal(size=300))
    y[1_800:] += y[1_799] - y[1_800] + np.sin(2 * np.pi * 1_800 / PERIOD)  # back to the cycle
    windows = _windows(y, config)
    naive = np.repeat(windows.x[:, -1:], PERIOD, axis=1)
    blend = fit_blend(new_model(config), windows, naive)
    assert blend.seasonal[:3].min() >= 0.8  # weighed in full: 0.1, 0.3, 0.5
    calm = (windows.start < 1_400) | (windows.start > 1_900)
    blended = _blended(blend, windows, naive)
    assert _mae(windows.y[calm], blended[calm]) < _mae(windows.y[calm], naive[calm]) / 5


def test_a_weekly_profile_the_model_missed_is_found() -> None:
    # A daily cycle whose amplitude differs by weekday, and noise on every value:
    # yesterday's value (seasonal naive) has the wrong weekday's amplitude and its noise,
    # the profile has the weekday's and averages the noise down.
    rng = np.random.default_rng(5)
    config = ModelConfig(window=PERIOD, horizon=PERIOD, period=PERIOD, profile_weeks=2)
    t = np.arange(4_000)
    day = np.sin(2 * np.pi * t / PERIOD) * (1 + 0.4 * ((t // PERIOD) % 7))
    windows = _windows(day + 0.2 * rng.normal(size=t.size), config)
    naive = np.repeat(windows.x[:, -1:], PERIOD, axis=1)
    blend = fit_blend(new_model(config), windows, naive)
    assert (blend.profile > 0.5).all()
    profiled = _mae(windows.y, _blended(blend, windows, naive, weeks=2))
    without = fit_blend(new_model(replace(config, profile_weeks=0)), windows, naive)
    assert not without.profile.any()
    assert profiled < 0.8 * _mae(windows.y, _blended(without, windows, naive))


def test_training_blends_on_the_validation_windows_and_can_be_told_not_to() -> None:
    rng = np.random.default_rng(4)
    walk = np.cumsum(rng.normal(size=1_500))
    train, val = time_split(sliding_windows_many([walk], 20, 1), [walk.size], 0.2)
    naive = _mae(val.y, val.x[:, -1:])
    config = ModelConfig(hidden_size=8, attention_size=8)
    plain = new_model(config)
    assert fit(plain, train, val, TrainConfig(epochs=5, blend=False)).blend is None
    blended = new_model(config)
    result = fit(blended, train, val, TrainConfig(epochs=5))
    assert result.blend is not None
    assert _mae(val.y, predict(blended, val.x)[0]) <= min(
        naive, _mae(val.y, predict(plain, val.x)[0])
    ) * (1 + 1e-9)
