"""Batched inference: windows in, forecasts and attention weights out.

Batches are padded to a multiple of ``PAD_ROWS`` rows (copies of the last window).
CPU matrix kernels handle a ragged tail of rows with a different code path, so the
same window can come out different in the last bit in a batch of 3 and a batch of
1,000; with every batch a multiple of 16 rows, each row's result depends on that row
alone. That is what lets a run interrupted by crashes publish, value for value, the
forecasts of an uninterrupted run (tests/test_engine.py checks it on this machine).

On CUDA the windows go through preallocated pinned host buffers with non-blocking
copies: one transfer in and two out per batch, none per entry. There the LSTM runs
in float32, not TF32.
"""

from __future__ import annotations

import numpy as np
import torch

from attnlstm.checkpoint import Checkpoint

PAD_ROWS = 16


def padded_rows(n: int) -> int:
    return -(-n // PAD_ROWS) * PAD_ROWS


def batch_rows(max_batch: int, batch_values: int, context: int) -> int:
    """Entries per batch, at most, for a model that reads ``context`` values per
    forecast: ``max_batch``, and no more than ``batch_values`` values in all (rounded
    down to a multiple of PAD_ROWS, at least PAD_ROWS).

    A batch's windows, the model's copies of them and its publish grow with the values
    each forecast reads and the steps it forecasts. On a 2-core Xeon (4 MB of L2 cache),
    the day-ahead model (817 values, 48 steps) drained about 28,500 entries/s in batches
    of 1,024 (6.7 MB of windows) and 30,000-34,500 in batches of 384 to 768; the 20-step
    model drained as fast in batches of 512 as of 1,024."""
    return min(max_batch, max(PAD_ROWS, batch_values // context // PAD_ROWS * PAD_ROWS))


class ShapeError(ValueError):
    """A model of another shape than the worker's, which :attr:`runs`: the values it
    reads, its window and its horizon."""

    def __init__(self, message: str, runs: tuple[int, int, int]) -> None:
        super().__init__(message)
        self.runs = runs


def check_fits(checkpoint: Checkpoint, *, context: int, window: int, horizon: int) -> None:
    """ShapeError unless the checkpoint's model reads ``context`` values, weighs
    ``window`` steps and forecasts ``horizon``: the values the worker keeps per series, and
    the forecasts it publishes."""
    config = checkpoint.config
    if (config.context, config.window, config.horizon) != (context, window, horizon):
        raise ShapeError(
            f"model {checkpoint.version} reads {config.context} values (window "
            f"{config.window}) and forecasts {config.horizon}; the worker runs {context} "
            f"(window {window}) and {horizon}",
            (context, window, horizon),
        )


class Engine:
    def __init__(self, checkpoint: Checkpoint, *, device: str, max_batch: int) -> None:
        self.checkpoint = checkpoint
        self.version = checkpoint.version
        self.context = checkpoint.config.context
        self.window = checkpoint.config.window
        self.horizon = checkpoint.config.horizon
        self.device = torch.device(device)
        if self.device.type == "cuda":
            # cuDNN runs the LSTM in TF32 (10-bit mantissas) unless told not to, and its
            # kernels then depend on the batch: on an H200, forecasts lay up to 4.3e-4
            # of the window's deviation from the CPU's. The flags are the process's; the
            # worker's process serves this one device.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.model = checkpoint.model.to(self.device).eval()
        self.rows = padded_rows(max_batch)  # the largest batch one model call takes
        pin = self.device.type == "cuda"
        self._x = torch.empty((self.rows, self.context), dtype=torch.float64, pin_memory=pin)
        if pin:
            self._y = torch.empty((self.rows, self.horizon), dtype=torch.float64, pin_memory=True)
            self._a = torch.empty((self.rows, self.window), dtype=torch.float32, pin_memory=True)

    def swap(self, checkpoint: Checkpoint) -> None:
        """Serve another model of the same shape from the next call on."""
        check_fits(checkpoint, context=self.context, window=self.window, horizon=self.horizon)
        self.model = checkpoint.model.to(self.device).eval()
        self.checkpoint, self.version = checkpoint, checkpoint.version

    def forecast(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forecasts (N, horizon) float64 and attention (N, window) for the last values of
        each series (N, context)."""
        n = windows.shape[0]
        ys = np.empty((n, self.horizon), dtype=np.float64)
        attns = np.empty((n, self.window), dtype=np.float32)
        for start in range(0, n, self.rows):
            stop = min(start + self.rows, n)
            ys[start:stop], attns[start:stop] = self._run(windows[start:stop])
        return ys, attns

    def _run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = windows.shape[0]
        rows = padded_rows(n)
        cpu = self.device.type != "cuda"
        if cpu and n == rows and windows.dtype == np.float64 and windows.flags.c_contiguous:
            x = torch.from_numpy(windows)  # no padding to add: read where they are
        else:
            host = self._x.numpy()
            host[:n] = windows
            host[n:rows] = windows[-1]
            x = self._x[:rows]
        with torch.inference_mode():
            if cpu:
                yhat, attn = self.model(x)
                return yhat.numpy()[:n], attn.numpy()[:n]
            x = x.to(self.device, non_blocking=True)
            yhat, attn = self.model(x)
            self._y[:rows].copy_(yhat, non_blocking=True)
            self._a[:rows].copy_(attn, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return self._y.numpy()[:n].copy(), self._a.numpy()[:n].copy()
