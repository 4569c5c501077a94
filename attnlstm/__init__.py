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

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, for type checkers (``as``: re-exported)
    from attnlstm.checkpoint import Checkpoint as Checkpoint
    from attnlstm.checkpoint import load as load
    from attnlstm.checkpoint import loads as loads
    from attnlstm.checkpoint import save as save
    from attnlstm.checkpoint import version_of as version_of
    from attnlstm.data import DataError as DataError
    from attnlstm.data import Dataset as Dataset
    from attnlstm.data import load_dataset as load_dataset
    from attnlstm.errors import CheckpointError as CheckpointError
    from attnlstm.model import AttentionLSTM as AttentionLSTM
    from attnlstm.model import ModelConfig as ModelConfig
    from attnlstm.partition import partition_of as partition_of
    from attnlstm.train import TrainConfig as TrainConfig
    from attnlstm.train import TrainResult as TrainResult
    from attnlstm.train import fit as fit
    from attnlstm.train import new_model as new_model
    from attnlstm.train import predict as predict
    from attnlstm.windows import SeriesWindows as SeriesWindows
    from attnlstm.windows import Windows as Windows
    from attnlstm.windows import series_windows as series_windows
    from attnlstm.windows import sliding_windows as sliding_windows
    from attnlstm.windows import sliding_windows_many as sliding_windows_many
    from attnlstm.windows import split_windows as split_windows
    from attnlstm.windows import time_split as time_split

# Each name's module, imported on first use (PEP 562): a program that needs one module
# of the library (the command line parsing its arguments, a producer computing
# partition_of) does not wait 1-2 s for torch.
_HOMES = {
    "attnlstm.checkpoint": ("Checkpoint", "load", "loads", "save", "version_of"),
    "attnlstm.data": ("DataError", "Dataset", "load_dataset"),
    "attnlstm.errors": ("CheckpointError",),
    "attnlstm.model": ("AttentionLSTM", "ModelConfig"),
    "attnlstm.partition": ("partition_of",),
    "attnlstm.train": ("TrainConfig", "TrainResult", "fit", "new_model", "predict"),
    "attnlstm.windows": (
        "SeriesWindows",
        "Windows",
        "series_windows",
        "sliding_windows",
        "sliding_windows_many",
        "split_windows",
        "time_split",
    ),
}
_HOME = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'attnlstm' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)


__all__ = sorted(_HOME)
