"""The model's contract: shapes, attention, scaling inside the call path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlstm import model as model_module
from attnlstm.device import cpu_info
from attnlstm.model import CLIP, AttentionLSTM, ModelConfig, one_step_reads
from attnlstm.synthetic import article_sine
from attnlstm.train import new_model
from attnlstm.windows import sliding_windows


def _sine_windows(window: int = 20) -> torch.Tensor:
    return torch.as_tensor(sliding_windows(article_sine(), window).x[::7], dtype=torch.float64)


@pytest.mark.parametrize(("horizon", "lags"), [(1, ()), (3, ()), (3, (5, 7))])
def test_forward_shapes_and_attention_is_a_distribution(horizon: int, lags: tuple[int]) -> None:
    config = ModelConfig(window=12, horizon=horizon, lags=lags)
    model = new_model(config, seed=1)
    assert config.context == 12 + max(lags, default=0)
    yhat, attn = model(torch.randn(5, config.context))
    assert yhat.shape == (5, horizon)
    assert attn.shape == (5, 12)  # over the LSTM's steps, not the lags' reach
    assert torch.all(attn >= 0)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(5), atol=1e-6, rtol=0)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = new_model(ModelConfig(window=12, lags=(3,)), seed=1)
    for shape in [(5, 12, 1), (5, 12), (5, 16)]:
        with pytest.raises(ValueError, match=r"expected windows of shape \(B, 15\)"):
            model(torch.randn(*shape))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_windows_that_are_not_floating_point_are_refused(dtype: torch.dtype) -> None:
    """Forecasts come back in the input's dtype: integer windows were forecast, then
    truncated to whole numbers (68 for 68.79), without a word."""
    for scaling in ("window", "none"):
        model = new_model(ModelConfig(window=12, horizon=3, scaling=scaling), seed=1)
        with pytest.raises(TypeError, match=f"floating-point values, got {dtype}"):
            model(torch.ones(2, 12, dtype=dtype))


def test_a_lag_feature_is_the_value_that_many_steps_before() -> None:
    # Weights that forecast the last step's lag feature alone: x[t - 3], for window 4.
    model = new_model(ModelConfig(window=4, lags=(3,), hidden_size=4, attention_size=4), seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.linear.weight.zero_()
        model.linear.weight[0, 6] = -1.0  # (last step, the value): cancels the skip
        model.linear.weight[0, 7] = 1.0  # (last step, lag 3)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 8.0, 6.0, 7.0], [5.0, -1.0, 0.0, 2.0, 2.5, 3.0, 1.0]])
    yhat, _ = model(x.double())
    torch.testing.assert_close(yhat[:, 0], x[:, 3].double())


def _profile_change(x: np.ndarray, period: int, weeks: int, horizon: int) -> np.ndarray:
    """S(t+h) - S(t) for each row of raw contexts x, from the profile's definition: the
    mean of the same hour over the seven days before, plus the mean over ``weeks`` weeks
    of that weekday's distance from the mean of the same hour over the seven days centred
    on it."""
    week, t = 7 * period, x.shape[1] - 1

    def profile(u: int) -> np.ndarray:
        daily = np.mean([x[:, u - i * period] for i in range(1, 8)], axis=0)
        weekday = [
            x[:, u - j * week]
            - np.mean([x[:, u - j * week + i * period] for i in range(-3, 4)], axis=0)
            for j in range(1, weeks + 1)
        ]
        return np.asarray(daily + np.mean(weekday, axis=0))

    return np.stack([profile(t + h) - profile(t) for h in range(1, horizon + 1)], axis=1)


def test_the_profile_forecasts_the_seasonal_profile_where_it_is_given_the_share() -> None:
    config = ModelConfig(window=4, horizon=4, period=4, profile_weeks=2, hidden_size=4)
    assert config.context == (7 * 2 + 3) * 4 + 1  # two weeks and three days back
    model = new_model(config, seed=0)
    rng = np.random.default_rng(0)
    t = np.arange(config.context)
    x = 10 + np.sin(2 * np.pi * t / 4) + 0.5 * np.sin(2 * np.pi * t / 28)
    x = x[None, :] + 0.1 * rng.normal(size=(6, t.size))
    xt = torch.as_tensor(x)
    untouched, attn = model(xt)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.profile_share.fill_(1.0)  # the profile alone: last + S(t+h) - S(t)
    profiled, attn_after = model(xt)
    expected = x[:, -1:] + _profile_change(x, 4, 2, 4)
    np.testing.assert_allclose(profiled.detach().numpy(), expected, atol=1e-5)
    torch.testing.assert_close(attn_after, attn)  # the LSTM and attention see no change
    assert not torch.allclose(untouched, profiled)
    # The share is part of the checkpoint; the profile itself is the config's.
    assert {k for k in model.state_dict() if "profile" in k} == {"profile_share"}


def test_the_profile_forecasts_a_series_that_repeats_weekly_exactly() -> None:
    # Each day its own shape and level, the same every week: the weekday effect is what
    # lies between a weekday and the mean of its week. Taken against the other six days
    # alone, it came out 7/6 of that (and the electricity demand's day-ahead profile
    # forecast 36% worse: MASE 0.0514 against 0.0378).
    config = ModelConfig(window=4, horizon=4, period=4, profile_weeks=2, hidden_size=4)
    model = new_model(config, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.profile_share.fill_(1.0)
    hours = np.sin(2 * np.pi * (np.arange(4) + 0.5) / 4)
    week = np.concatenate([(1 + 0.2 * d) * hours + 0.3 * d for d in (0, 4, 2, 6, 1, 5, 3)])
    series = 100 + np.tile(week, config.context // week.size + 2)
    x = np.stack([series[s : s + config.context] for s in range(8)])
    after = np.stack([series[s + config.context : s + config.context + 4] for s in range(8)])
    forecast, _ = model(torch.as_tensor(x))
    np.testing.assert_allclose(forecast.detach().numpy(), after, atol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(window=5, hidden_size=4),
        ModelConfig(window=4, horizon=4, lags=(4, 24, 28), period=4, profile_weeks=2),
    ],
    ids=["window", "lags and profile"],
)
def test_one_step_reads_are_the_values_the_first_step_depends_on(config: ModelConfig) -> None:
    # Each value of the context moved in turn: the first step's forecast moves exactly
    # when one_step_reads says the model reads it (the scorer leaves the values whose
    # forecasts read an anomaly unjudged, and judges the rest).
    model = new_model(config, seed=0).double()
    with torch.no_grad():
        model.linear.weight.normal_()
        if config.profile_weeks:
            model.profile_share.fill_(1.0)
    # A cycle of 4 with noise: every value within CLIP window deviations (a clipped
    # value moves nothing, read or not).
    steps = torch.arange(config.context, dtype=torch.float64)
    noise = torch.randn(
        config.context, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    x = (torch.sin(steps * torch.pi / 2) + 0.1 * noise)[None, :]
    first = model(x)[0][0, 0]
    moved = []
    for back in range(config.context):
        nudged = x.clone()
        nudged[0, -1 - back] += 0.01
        moved.append(bool(model(nudged)[0][0, 0] != first))
    np.testing.assert_array_equal(one_step_reads(config), moved)
    assert 0 < sum(moved) < config.context or not config.lags


def test_glitches_in_the_lagged_values_are_clipped() -> None:
    # A week-old glitch at a thousand window deviations moves the forecast as much as one
    # at CLIP deviations: not a thousand times more.
    model = new_model(ModelConfig(window=4, lags=(3,), hidden_size=4, attention_size=4), seed=0)
    with torch.no_grad():
        model.linear.weight.fill_(0.1)
    x = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    glitch, at_clip = x.clone(), x.clone()
    glitch[0, 0] = -1000.0
    at_clip[0, 0] = 0.5 - CLIP * 0.5  # CLIP deviations below the window's mean
    torch.testing.assert_close(model(glitch)[0], model(at_clip)[0])


def test_scale_equivariance_on_a_trained_model(trained_sines: AttentionLSTM) -> None:
    x = _sine_windows()
    yhat, attn = trained_sines(x)
    yhat_big, attn_big = trained_sines(1000.0 * x + 500.0)
    expected = 1000.0 * yhat + 500.0
    rel = torch.abs(yhat_big - expected) / torch.abs(expected)
    assert rel.max().item() <= 1e-4
    torch.testing.assert_close(attn_big, attn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lags", [(), (10, 30)])
def test_scale_equivariance_holds_for_any_weights(lags: tuple[int]) -> None:
    # The property is structural: it must not depend on what training happened to learn.
    for seed in range(3):
        config = ModelConfig(hidden_size=8, attention_size=8, lags=lags)
        model = new_model(config, seed=seed).eval()
        with torch.no_grad():
            model.linear.weight.normal_(0.0, 0.1)  # trained weights, not the zeros it starts at
        x = _sine_windows(config.context)
        yhat, _ = model(x)
        yhat_big, _ = model(1000.0 * x + 500.0)
        expected = 1000.0 * yhat + 500.0
        assert (torch.abs(yhat_big - expected) / torch.abs(expected)).max().item() <= 1e-4


def test_constant_window_forecasts_its_level_not_nan() -> None:
    model = new_model(ModelConfig(window=20, horizon=2), seed=0).eval()
    x = torch.tensor([[3.25] * 20, [0.0] * 20, [-1e9] * 20])
    yhat, attn = model(x)
    assert torch.isfinite(yhat).all()
    assert torch.isfinite(attn).all()
    torch.testing.assert_close(yhat, x[:, :2])


@pytest.mark.parametrize("level", [0.11, 0.22, 0.42, 0.81, 0.1])
def test_a_constant_window_forecasts_its_level_exactly(level: float) -> None:
    """Its mean, which it forecast, rounds (twenty 0.11s: 0.11000000000000001), and a
    value on the level then fell off its zero-wide interval: an anomaly of score inf."""
    model = new_model(ModelConfig(window=20, horizon=2), seed=0).eval()
    x = torch.full((1, 20), level, dtype=torch.float64)
    yhat, _ = model(x)
    assert yhat.tolist() == [[level, level]]


def test_large_level_small_swing_keeps_its_signal(trained_sines: AttentionLSTM) -> None:
    # float32 statistics would cancel 1e6 + sin(t) down to noise.
    x = _sine_windows()
    yhat, _ = trained_sines(x)
    yhat_high, _ = trained_sines(x + 1e6)
    torch.testing.assert_close(yhat_high - 1e6, yhat, atol=1e-6, rtol=0)


def test_a_series_of_tiny_values_forecasts_as_it_would_scaled_up(
    trained_sines: AttentionLSTM,
) -> None:
    """Valid values go down to 1e-300, and the windows are scaled in float32, where the
    inverse of a deviation below about 3e-39 is infinite: such a series was forecast at
    +-inf, and its entries went to the dead stream. It now forecasts as the series scaled
    up by a power of two does, bit for bit."""
    x = _sine_windows()
    yhat, attn = trained_sines(x)
    for scale in (2.0**-130, 2.0**-500):
        tiny_yhat, tiny_attn = trained_sines(x * scale)
        assert torch.equal(tiny_yhat, yhat * scale)
        assert torch.equal(tiny_attn, attn)
    spike = torch.zeros(1, trained_sines.config.context, dtype=torch.float64)
    spike[0, -1] = 1e-38  # zeros, then one tiny value
    assert torch.isfinite(trained_sines(spike)[0]).all()


def test_predicting_does_not_change_the_input(trained_sines: AttentionLSTM) -> None:
    x = _sine_windows().float()
    before = x.clone()
    trained_sines(x)
    assert torch.equal(x, before)


def test_forecast_dtype_follows_the_input(trained_sines: AttentionLSTM) -> None:
    x = _sine_windows()
    assert trained_sines(x)[0].dtype == torch.float64
    assert trained_sines(x.float())[0].dtype == torch.float32


def test_unscaled_mode_runs_in_raw_units() -> None:
    model = new_model(ModelConfig(scaling="none"), seed=0).eval()
    yhat, attn = model(_sine_windows())
    assert yhat.shape == (len(attn), 1)
    assert torch.isfinite(yhat).all()


def test_unscaled_mode_reads_raw_values_unclipped_and_leaves_them_as_they_are() -> None:
    """Raw values were clipped to +-CLIP as if they were window deviations: any two
    windows past 5 in the series' own units gave one forecast. Inputs are clipped in
    place in scaled mode; unscaled, the caller's own tensor reaches the model."""
    model = new_model(ModelConfig(scaling="none"), seed=0).eval()
    x = _sine_windows().float() * 10 * CLIP
    x = x[x[:, 0].abs() > CLIP]  # windows whose oldest value is past 5
    before = x.clone()
    further = x.clone()
    further[:, 0] *= 2  # the oldest value only, further past 5
    with torch.no_grad():
        moved = (model(further)[0] - model(x)[0]).abs()
    assert torch.equal(x, before)
    assert len(x)
    assert (moved > 1e-4).all()


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="not Linux")
def test_cpu_info_reads_the_first_of_a_field_and_nothing_for_one_not_there() -> None:
    """What picks the tanh below (``vendor_id``) and names the bench's CPU."""
    assert cpu_info("processor") == "0"
    assert cpu_info("no such field") == ""


@pytest.mark.parametrize("sigmoid", [False, True])
def test_both_ways_of_taking_tanh_agree(monkeypatch: pytest.MonkeyPatch, sigmoid: bool) -> None:
    """The attention's tanh is torch's, or on AMD CPUs, where that is slow, made from a
    sigmoid: the same within float32's rounding, and the forecasts with it. Each way
    against the other (against this machine's own, one case compared a way with itself)."""
    x = torch.linspace(-12, 12, 10_001)
    model = new_model(ModelConfig(window=48, lags=(48,)), seed=0).eval()
    windows = torch.as_tensor(sliding_windows(article_sine(), 96).x[::7], dtype=torch.float64)
    with torch.no_grad():
        monkeypatch.setattr(model_module, "_SIGMOID_TANH", not sigmoid)
        reference = model(windows)
        monkeypatch.setattr(model_module, "_SIGMOID_TANH", sigmoid)
        torch.testing.assert_close(model_module._tanh(x), torch.tanh(x), atol=3e-7, rtol=0)
        yhat, attn = model(windows)
    torch.testing.assert_close(yhat, reference[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(attn, reference[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("field", "value", "message", "other"),
    [
        ("window", 0, "window must be >= 1", {}),
        ("horizon", 0, "horizon must be >= 1", {}),
        ("hidden_size", 0, "hidden_size must be >= 1", {}),
        ("dropout", 1.0, "dropout must be in", {}),
        ("scaling", "minmax", "scaling must be", {}),
        ("window", 1, "a window needs at least 2 steps", {}),
        # Unscaled, a window of 1 trained to its end, then the blend's trend failed.
        ("window", 1, "a window needs at least 2 steps", {"scaling": "none"}),
        ("lags", (0,), "lags must be whole numbers >= 1", {}),
        ("period", -1, "period must be >= 0", {}),
        ("profile_weeks", -1, "profile_weeks must be >= 0", {}),
        ("profile_weeks", 1, "a profile needs a period of at least the horizon", {}),
    ],
)
def test_config_rejects_nonsense(
    field: str, value: object, message: str, other: dict[str, object]
) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value, **other})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [("window", 20.5), ("horizon", 2.0), ("period", 1.5), ("profile_weeks", True),
     ("hidden_size", "32"), ("attention_size", None)],
)  # fmt: skip
def test_config_sizes_must_be_whole_numbers(field: str, value: object) -> None:
    """A float window was a torch error at the model's build, a float period taken."""
    with pytest.raises(TypeError, match=f"{field} must be a whole number, got {value!r}"):
        ModelConfig(**{field: value})  # type: ignore[arg-type]


def test_an_attention_of_no_width_is_refused_and_lags_are_kept_as_a_tuple() -> None:
    """Width 0 trained, and no checkpoint of it loaded; -1 was a torch error."""
    for size in (0, -1):
        with pytest.raises(ValueError, match=f"attention_size must be >= 1, got {size}"):
            ModelConfig(attention_size=size)
    config = ModelConfig(lags=[3, 6])  # type: ignore[arg-type]
    assert config.lags == (3, 6)
    assert hash(config) == hash(ModelConfig(lags=(3, 6)))  # it was unhashable


def test_config_round_trips_through_a_dict() -> None:
    config = ModelConfig(window=30, horizon=4, num_layers=2, dropout=0.1, lags=(30, 60), period=30)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**config.to_dict(), "extra": 1})


def test_a_config_from_before_lags_reads_as_the_model_it_was() -> None:
    old = {"window": 20, "horizon": 1, "input_size": 1, "hidden_size": 32, "num_layers": 1}
    config = ModelConfig.from_dict({**old, "dropout": 0.0, "attention_size": 32})
    assert (config.lags, config.linear, config.context) == ((), False, 20)
    assert not hasattr(AttentionLSTM(config), "linear")
    with pytest.raises(ValueError, match="input_size is derived from lags"):
        ModelConfig.from_dict({**old, "input_size": 2})
