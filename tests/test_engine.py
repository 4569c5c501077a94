"""The inference engine: the offline model's numbers, batch-invariant, and on CUDA
through pinned buffers with one transfer each way per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlstm.checkpoint import Checkpoint, version_of
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import new_model, predict
from worker.engine import PAD_ROWS, Engine, batch_rows

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def _engine(model: AttentionLSTM, device: str = "cpu", max_batch: int = 1024) -> Engine:
    checkpoint = Checkpoint(model=model, version=version_of(model))
    return Engine(checkpoint, device=device, max_batch=max_batch)


def _windows(n: int, window: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, window)).cumsum(axis=1) + rng.uniform(-50, 50, size=(n, 1))


def test_forecasts_match_the_offline_model(trained_sines: AttentionLSTM) -> None:
    x = _windows(300, trained_sines.config.window)
    yhat, attn = _engine(trained_sines).forecast(x)
    want_y, want_a = predict(trained_sines, x)
    np.testing.assert_allclose(yhat, want_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(attn, want_a, atol=1e-6)
    np.testing.assert_allclose(attn.sum(axis=1), 1.0, atol=1e-6)


def test_a_batch_holds_at_most_batch_values_values_in_whole_pads_of_rows() -> None:
    assert batch_rows(1024, 2**19, 20) == 1024  # the 20-step model: max_batch
    assert batch_rows(1024, 2**19, 817) == 640  # the day-ahead model: 641, rounded down
    assert batch_rows(8, 2**19, 817) == 8  # max_batch still caps
    assert batch_rows(1024, 100, 817) == PAD_ROWS  # never below one pad of rows
    assert batch_rows(1024, 2**19, 2**19 // 40) % PAD_ROWS == 0


def test_a_window_gets_the_same_bits_in_any_batch(trained_sines: AttentionLSTM) -> None:
    """What lets a run with crashes publish exactly what a run without does."""
    engine = _engine(trained_sines)
    x = _windows(1024, trained_sines.config.window, seed=1)
    all_y, all_a = engine.forecast(x)
    rng = np.random.default_rng(2)
    for _ in range(60):
        start = int(rng.integers(0, 1000))
        size = int(rng.integers(1, 1024 - start))
        y, a = engine.forecast(x[start : start + size])
        assert np.array_equal(y, all_y[start : start + size]), (start, size)
        assert np.array_equal(a, all_a[start : start + size]), (start, size)


def test_a_model_with_a_profile_matches_offline_in_any_batch() -> None:
    config = ModelConfig(window=8, horizon=8, lags=(8,), period=8, profile_weeks=2, hidden_size=8)
    model = new_model(config, seed=0)
    with torch.no_grad():
        model.profile_share.fill_(0.5)
    x = _windows(700, config.context, seed=4)  # 700 windows of 145 values
    yhat, _ = _engine(model).forecast(x)
    np.testing.assert_allclose(yhat, predict(model, x)[0], rtol=1e-6, atol=1e-6)
    engine = _engine(model)
    for start, size in [(0, 1), (3, 17), (100, 600)]:
        y, _ = engine.forecast(x[start : start + size])
        assert np.array_equal(y, yhat[start : start + size]), (start, size)


def test_more_windows_than_one_call_takes_are_split(trained_sines: AttentionLSTM) -> None:
    engine = _engine(trained_sines, max_batch=10)
    assert engine.rows == PAD_ROWS
    x = _windows(100, trained_sines.config.window, seed=3)
    y, _ = engine.forecast(x)
    np.testing.assert_array_equal(y, _engine(trained_sines).forecast(x)[0])


def test_an_empty_batch(trained_sines: AttentionLSTM) -> None:
    y, a = _engine(trained_sines).forecast(np.empty((0, trained_sines.config.window)))
    assert y.shape == (0, 1)
    assert a.shape == (0, trained_sines.config.window)


def test_an_engine_on_cuda_turns_tf32_off(trained_sines: AttentionLSTM) -> None:
    """cuDNN runs an LSTM in TF32 unless told not to, and the forecasts then depend on
    the batch. The flags are set before the model moves, so this runs without CUDA too."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    before = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = True
    try:
        _engine(trained_sines)
        assert cudnn.allow_tf32  # a CPU engine leaves the process's flags alone
        model = AttentionLSTM(trained_sines.config)  # its own: an engine moves its model
        try:
            _engine(model, "cuda")
        except (AssertionError, RuntimeError):  # what torch raises where there is no CUDA
            assert not torch.cuda.is_available()
        assert not cudnn.allow_tf32
        assert not matmul.allow_tf32
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = before


@CUDA
def test_cuda_agrees_with_the_cpu(trained_sines: AttentionLSTM) -> None:
    x = _windows(777, trained_sines.config.window, seed=4)
    cpu_y, cpu_a = _engine(trained_sines).forecast(x)
    model = AttentionLSTM(trained_sines.config)
    model.load_state_dict(trained_sines.state_dict())
    gpu_y, gpu_a = _engine(model, "cuda").forecast(x)
    # float32 kernels differ between the devices: 1e-6 of the window's scale.
    np.testing.assert_allclose(gpu_y, cpu_y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu_a, cpu_a, atol=1e-5)


@CUDA
def test_cuda_uses_pinned_buffers_and_one_copy_each_way(trained_sines: AttentionLSTM) -> None:
    model = AttentionLSTM(trained_sines.config)
    model.load_state_dict(trained_sines.state_dict())
    engine = _engine(model, "cuda", max_batch=512)
    assert engine._x.is_pinned()
    assert engine._y.is_pinned()
    assert engine._a.is_pinned()
    x = _windows(500, trained_sines.config.window, seed=5)
    engine.forecast(x)  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        engine.forecast(x)
    names = [event.name for event in prof.events()]
    host_to_device = [n for n in names if "HtoD" in n]
    device_to_host = [n for n in names if "DtoH" in n]
    assert len(host_to_device) == 1, host_to_device  # the whole batch at once
    assert len(device_to_host) == 2, device_to_host  # forecasts and attention


@CUDA
def test_a_seasonal_model_on_cuda_agrees_with_the_cpu_in_any_batch() -> None:
    """The day-ahead default's shape: lags, a profile that reads two weeks, 48 steps."""
    config = ModelConfig(
        window=48, horizon=48, lags=(48, 288, 336), period=48, profile_weeks=2, hidden_size=16
    )

    def model() -> AttentionLSTM:  # one each: an engine moves its model to its device
        built = new_model(config, seed=0)
        with torch.no_grad():
            built.profile_share.fill_(0.5)
        return built

    x = _windows(1500, config.context, seed=6)  # 1,500 windows of 817 values
    cpu_y, cpu_a = _engine(model()).forecast(x)
    gpu = _engine(model(), "cuda")
    gpu_y, gpu_a = gpu.forecast(x)
    assert gpu_y.shape == (1500, 48)
    # With cuDNN's LSTM in TF32 (torch's default, which the engine now turns off), on an
    # H200, forecasts of windows whose scale was about 1.7 came out up to 4.3e-4 apart
    # from the CPU's; the bound has not been measured again since.
    scale = x[:, -config.window :].std(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(gpu_y - cpu_y) / scale, 1e-3)
    np.testing.assert_allclose(gpu_a, cpu_a, atol=1e-3)
    for start, size in [(0, 1), (5, 300), (200, 1024)]:
        y, a = gpu.forecast(x[start : start + size])
        np.testing.assert_array_less(
            np.abs(y - gpu_y[start : start + size]) / scale[start : start + size], 1e-3
        )
        np.testing.assert_allclose(a, gpu_a[start : start + size], atol=1e-3)
