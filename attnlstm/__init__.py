"""attnlstm: an Attention-LSTM forecaster that really forecasts.

The model library: torch, numpy and the standard library only (matplotlib is
imported lazily by :mod:`attnlstm.plots`). It never imports redis or the worker.

>>> import torch
>>> from attnlstm import AttentionLSTM, ModelConfig
>>> model = AttentionLSTM(ModelConfig(window=20, horizon=3))
>>> yhat, attn = model(torch.randn(4, 20))
>>> tuple(yhat.shape), tuple(attn.shape)
((4, 3), (4, 20))
"""

from attnlstm.checkpoint import Checkpoint, CheckpointError, load, loads, save, version_of
from attnlstm.data import DataError, Dataset, load_dataset
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.partition import partition_of
from attnlstm.train import TrainConfig, TrainResult, fit, new_model, predict
from attnlstm.windows import (
    SeriesWindows,
    Windows,
    series_windows,
    sliding_windows,
    sliding_windows_many,
    split_windows,
    time_split,
)

__all__ = [
    "AttentionLSTM",
    "Checkpoint",
    "CheckpointError",
    "DataError",
    "Dataset",
    "ModelConfig",
    "SeriesWindows",
    "TrainConfig",
    "TrainResult",
    "Windows",
    "fit",
    "load",
    "load_dataset",
    "loads",
    "new_model",
    "partition_of",
    "predict",
    "save",
    "series_windows",
    "sliding_windows",
    "sliding_windows_many",
    "split_windows",
    "time_split",
    "version_of",
]
