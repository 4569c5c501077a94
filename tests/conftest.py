"""Shared fixtures. Torch gets one thread on purpose: tests never run in parallel,
and the CLI tests start torch in child processes beside this one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from attnlstm.data import load_dataset
from attnlstm.experiment import train_model
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.train import TrainConfig

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
CLI = [sys.executable, "-m", "worker.cli"]


@pytest.fixture(scope="session")
def trained_sines() -> AttentionLSTM:
    """A model trained briefly on many sines: not the best, but a real forecaster."""
    dataset = load_dataset("sines", n_series=8, seed=3)
    model, _, metrics = train_model(
        dataset, ModelConfig(hidden_size=16, attention_size=16), TrainConfig(epochs=4, seed=3)
    )
    assert metrics["mase"] < 0.5, metrics  # it learned something, or the fixture is useless
    return model
