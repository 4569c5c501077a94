"""The model's contract: shapes, attention, scaling inside the call path."""

from __future__ import annotations

import pytest
import torch

from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import article_sine
from attnlstm.train import new_model
from attnlstm.windows import sliding_windows


def _sine_windows(window: int = 20) -> torch.Tensor:
    return torch.as_tensor(sliding_windows(article_sine(), window).x[::7], dtype=torch.float64)


@pytest.mark.parametrize("horizon", [1, 3])
def test_forward_shapes_and_attention_is_a_distribution(horizon: int) -> None:
    model = new_model(ModelConfig(window=12, horizon=horizon), seed=1)
    x = torch.randn(5, 12)
    yhat, attn = model(x)
    assert yhat.shape == (5, horizon)
    assert attn.shape == (5, 12)
    assert torch.all(attn >= 0)
    torch.testing.assert_close(attn.sum(dim=1), torch.ones(5), atol=1e-6, rtol=0)
    yhat3, attn3 = model(x.unsqueeze(-1))  # (B, T, 1) is the same input
    torch.testing.assert_close(yhat3, yhat)
    torch.testing.assert_close(attn3, attn)


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = new_model(ModelConfig(window=12), seed=1)
    with pytest.raises(ValueError, match=r"expected windows of shape"):
        model(torch.randn(5, 12, 2))


def test_scale_equivariance_on_a_trained_model(trained_sines: AttentionLSTM) -> None:
    x = _sine_windows()
    yhat, attn = trained_sines(x)
    yhat_big, attn_big = trained_sines(1000.0 * x + 500.0)
    expected = 1000.0 * yhat + 500.0
    rel = torch.abs(yhat_big - expected) / torch.abs(expected)
    assert rel.max().item() <= 1e-4
    torch.testing.assert_close(attn_big, attn, atol=1e-5, rtol=0)


def test_scale_equivariance_holds_for_any_weights() -> None:
    # The property is structural: it must not depend on what training happened to learn.
    for seed in range(3):
        model = new_model(ModelConfig(hidden_size=8, attention_size=8), seed=seed).eval()
        x = _sine_windows()
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


def test_large_level_small_swing_keeps_its_signal(trained_sines: AttentionLSTM) -> None:
    # float32 statistics would cancel 1e6 + sin(t) down to noise.
    x = _sine_windows()
    yhat, _ = trained_sines(x)
    yhat_high, _ = trained_sines(x + 1e6)
    torch.testing.assert_close(yhat_high - 1e6, yhat, atol=1e-6, rtol=0)


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


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("window", 0, "window must be >= 1"),
        ("horizon", 0, "horizon must be >= 1"),
        ("hidden_size", 0, "hidden_size must be >= 1"),
        ("dropout", 1.0, "dropout must be in"),
        ("scaling", "minmax", "scaling must be"),
        ("window", 1, "window scaling needs a window of at least 2"),
    ],
)
def test_config_rejects_nonsense(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})  # type: ignore[arg-type]


def test_config_round_trips_through_a_dict() -> None:
    config = ModelConfig(window=30, horizon=4, num_layers=2, dropout=0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model config fields"):
        ModelConfig.from_dict({**config.to_dict(), "extra": 1})
