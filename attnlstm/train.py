"""Mini-batch training: Adam, cosine learning-rate decay, early stopping on the
time-ordered validation tail, gradient clipping. Knows nothing of where data comes
from: it takes windows.

The loss is measured in each window's standardised units (error divided by the
window's standard deviation), so series of any amplitude weigh the same.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from attnlstm.blend import Blend, fit_blend, fold
from attnlstm.data import VALUE_MAX
from attnlstm.intervals import FLAT, Spread, calibrate, window_scale
from attnlstm.model import AttentionLSTM, ModelConfig, whole
from attnlstm.windows import SeriesWindows, Windows


@dataclass(frozen=True)
class TrainConfig:
    epochs: int | None = None  # None: enough for about 3,000 optimiser steps (3 to 300)
    batch_size: int = 64
    lr: float = 1e-2  # peak Adam learning rate, decayed by a cosine to lr * 1e-2
    # Adam's L2 penalty. `attnlstm train` and the demo give a model with a period
    # attnlstm.experiment.SEASONAL_WEIGHT_DECAY; train_model takes what is given here.
    weight_decay: float = 0.0
    patience: int = 40  # epochs without a better validation loss before stopping
    clip_norm: float = 1.0  # max global gradient norm
    seed: int = 0
    blend: bool = True  # shrink toward naive forecasts where validation says so (attnlstm.blend)

    def __post_init__(self) -> None:
        counts = ("batch_size", "patience", "seed") + ("epochs",) * (self.epochs is not None)
        for name in counts:  # a float batch size was a TypeError deep in the training
            object.__setattr__(self, name, whole(getattr(self, name), name))
        if (self.epochs is not None and self.epochs < 1) or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.patience < 1:
            raise ValueError("patience must be >= 1")
        if not 0 < self.lr < math.inf or not 0 < self.clip_norm < math.inf:
            raise ValueError("lr and clip_norm must be > 0 and finite")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not isinstance(self.blend, bool):  # ("no" blended)
            raise TypeError(f"blend must be True or False, got {self.blend!r}")


HUBER_DELTA = 1.0  # the loss is quadratic within this many window deviations, then linear
TARGET_STEPS = 3000  # optimiser steps that an automatic epoch count aims for


def auto_epochs(n_windows: int, batch_size: int, *, lo: int = 3, hi: int = 300) -> int:
    """Epochs for about TARGET_STEPS optimiser steps: many on small data, few on large."""
    steps_per_epoch = math.ceil(n_windows / batch_size)
    return max(lo, min(hi, math.ceil(TARGET_STEPS / steps_per_epoch)))


@dataclass
class TrainResult:
    epochs_planned: int  # the cosine schedule's length
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs_run: int
    seconds: float
    train_loss: list[float] = field(default_factory=list)  # per epoch
    val_loss: list[float] = field(default_factory=list)  # per epoch
    spread: Spread | None = None  # the kept weights' errors on the validation windows
    blend: Blend | None = None  # folded into the kept weights, fitted on the validation windows
    val_windows: int = 0  # how many the early stopping, the blend and the spread went by


def new_model(config: ModelConfig, seed: int = 0) -> AttentionLSTM:
    """A freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return AttentionLSTM(config)


def scaled_loss(
    model: AttentionLSTM, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Huber loss of the errors in window-standardised units (squared error / 2 below
    HUBER_DELTA, then linear: a glitch in the targets, a pipe's flow dropping to a quarter
    for a day, does not set the whole fit); ``y`` must match the forecasts' shape.

    ``weights`` (horizon,) weigh each step ahead (see :func:`lead_weights`)."""
    yhat, _ = model(x)
    if yhat.shape != y.shape:  # the article's bug: (N, 1) against (N, 1, 1)
        raise ValueError(f"targets {tuple(y.shape)} do not match forecasts {tuple(yhat.shape)}")
    if model.config.scaling == "none":
        err = yhat - y
    else:
        recent = x[:, -model.config.window :]  # the values the model standardises by
        std = recent.std(dim=1, unbiased=False, keepdim=True)  # (B, 1)
        level = recent.mean(dim=1, keepdim=True).abs()
        err = (yhat - y) / torch.where(std > FLAT * level, std, torch.ones_like(std))
    err = nn.functional.huber_loss(err, torch.zeros_like(err), reduction="none", delta=HUBER_DELTA)
    return torch.mean(err if weights is None else err * weights)


def lead_weights(windows: Windows | SeriesWindows, window: int) -> np.ndarray:
    """Per step ahead, the inverse of the naive forecast's mean squared error there (in
    window-standardised units), normalised to mean 1: without them, the far steps'
    errors, many times the next step's, would set the whole loss, and a day-ahead model
    would forecast the next value worse than a one-step model does. Flat windows
    (:data:`attnlstm.intervals.FLAT`) are left out: they have no units to measure in, and
    a handful, in the data's units or over a deviation of rounding error (1e-15), set
    the weights of every step."""
    if isinstance(windows, SeriesWindows):
        windows = windows.recent(window).build()
    recent = windows.x[:, -window:]
    std = recent.std(axis=1, keepdims=True)
    varied = std[:, 0] > FLAT * np.abs(recent.mean(axis=1))
    if not varied.any():
        return np.ones(windows.y.shape[1])
    err = ((windows.y[varied] - recent[varied, -1:]) / std[varied]) ** 2
    inverse = 1.0 / np.maximum(err.mean(axis=0), 1e-12)  # (horizon,)
    return np.asarray(inverse / inverse.mean())


def predict(
    model: AttentionLSTM,
    x: np.ndarray | torch.Tensor | Windows | SeriesWindows,
    *,
    batch_size: int = 4096,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Forecasts (N, horizon) and attention (N, window) for raw windows (N, context), an
    array or a tensor, or for windows built (their inputs) or unbuilt (built a batch at a
    time), on ``device`` (by default the model's own). A value that is not finite, or
    beyond +-:data:`attnlstm.data.VALUE_MAX`, is refused (ValueError): it made NaN
    forecasts, without a word."""
    batch_size = whole(batch_size, "batch_size")
    if batch_size < 1:  # (-1 gave no forecasts, and no error)
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(x, Windows):
        x = x.x
    refuse_non_finite(x)
    if device is None:
        device = str(next(model.parameters()).device)
    model.to(device)
    model.eval()
    ys, attns = [], []
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            part = slice(i, i + batch_size)
            rows = x.build(part).x if isinstance(x, SeriesWindows) else x[part]
            xb = torch.as_tensor(rows, dtype=torch.float64, device=device)
            yhat, attn = model(xb)
            ys.append(yhat.double().cpu().numpy())
            attns.append(attn.double().cpu().numpy())
    horizon, window = model.config.horizon, model.config.window
    if not ys:
        return np.empty((0, horizon)), np.empty((0, window))
    return np.concatenate(ys), np.concatenate(attns)


def refuse_non_finite(x: np.ndarray | torch.Tensor | Windows | SeriesWindows) -> None:
    """ValueError, saying where, unless every value of ``x`` is finite and within
    +-:data:`attnlstm.data.VALUE_MAX` (1e160 overflowed the model's deviation, to NaN
    forecasts): raw windows (N, context), built windows (their inputs and targets) or
    unbuilt ones (the values they are cut from)."""
    if isinstance(x, SeriesWindows):
        if found := _non_finite(x.values):
            (i,), value = found
            raise ValueError(f"the series hold a value {_UNFIT} at {i}: {value}")
        return
    arrays = [("value", x.x), ("target", x.y)] if isinstance(x, Windows) else [("value", x)]
    for what, values in arrays:
        if found := _non_finite(values):
            at, value = found
            where = (
                f"window {at[0]} has a {what} {_UNFIT} at {at[1]}"
                if len(at) == 2
                else (f"a {what} at {at} is {_UNFIT.removeprefix('that is ')}")
            )
            raise ValueError(f"{where}: {value}")


_UNFIT = f"that is not finite or beyond +-{VALUE_MAX:g}"


def _non_finite(values: np.ndarray | torch.Tensor) -> tuple[list[int], float] | None:
    """Where the first value that is not finite or beyond VALUE_MAX is, and it; None
    where there is none."""
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if not t.is_floating_point():
        return None
    bad = ~torch.isfinite(t) | (t.abs() > VALUE_MAX)  # (float16's inf is not above 1e30 in it)
    if not bool(bad.any()):
        return None
    at = bad.nonzero()[0].tolist()
    return at, float(t[tuple(at)].item())


def fit(
    model: AttentionLSTM,
    train: Windows | SeriesWindows,
    val: Windows | SeriesWindows,
    config: TrainConfig,
    *,
    device: str = "cpu",
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best validation weights.

    ``train`` as :class:`SeriesWindows` is gathered a batch at a time (the same values,
    so the same model, as its built windows give); ``val`` as one is built whole."""
    if isinstance(val, SeriesWindows):  # as split_windows gives it
        val = val.build()
    refuse_non_finite(train)  # (a NaN was "training diverged")
    refuse_non_finite(val)
    for what, given in (("training", train), ("validation", val)):
        width = given.window if isinstance(given, SeriesWindows) else given.x.shape[1]
        if width != model.config.context:  # (a narrower one: "window must be in [1, 3]")
            raise ValueError(
                f"the {what} windows hold {width} values each, and the model reads "
                f"{model.config.context} (its config's context): cut them to that width"
            )
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"need training and validation windows, got {len(train)} and {len(val)}: "
            "the series is too short for this window and horizon"
        )
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    model.to(device)
    take = _batches(train, device)
    xv, yv = _tensors(val, device)
    weights = torch.as_tensor(lead_weights(train, model.config.window), device=device)
    epochs = config.epochs or auto_epochs(len(train), config.batch_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=epochs, eta_min=config.lr * 1e-2
    )
    result = TrainResult(
        epochs_planned=epochs, best_epoch=0, epochs_run=0, seconds=0.0, val_windows=len(val)
    )
    best_loss, best_state = math.inf, copy.deepcopy(model.state_dict())
    started = time.perf_counter()
    with tqdm(total=epochs, desc="train", unit="epoch", disable=not progress) as bar:
        for epoch in range(1, epochs + 1):
            loss = _epoch(model, optimiser, take, len(train), weights, config, shuffle)
            result.train_loss.append(loss)
            schedule.step()
            result.val_loss.append(_evaluate(model, xv, yv, weights))
            result.epochs_run = epoch
            if result.val_loss[-1] < best_loss:
                best_loss, result.best_epoch = result.val_loss[-1], epoch
                best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(train=f"{result.train_loss[-1]:.2e}", val=f"{best_loss:.2e}")
            bar.update()
            if epoch - result.best_epoch >= config.patience:
                break
    if not result.best_epoch:  # the first weights, kept as if trained: every loss NaN or inf
        raise ValueError(
            f"training diverged: no epoch's validation loss was finite ({epochs} run), so "
            "no weights are worth keeping"
        )
    model.load_state_dict(best_state)
    model.eval()
    yhat, _ = predict(model, val.x, device=device)
    if config.blend and model.config.linear:
        result.blend = fit_blend(model, val, yhat)
        fold(model, result.blend)
        yhat, _ = predict(model, val.x, device=device)
    result.spread = calibrate(val.y, yhat, window_scale(val.x, model.config.window))
    result.seconds = time.perf_counter() - started
    return result


def _tensors(windows: Windows, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 on purpose: a float32 copy of 1e6 + 0.001 has already lost the 0.001
    # before the model's own float64 standardisation could keep it.
    x = torch.as_tensor(windows.x, dtype=torch.float64, device=device)
    y = torch.as_tensor(windows.y, dtype=torch.float64, device=device)
    return x, y


Take = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _batches(windows: Windows | SeriesWindows, device: str) -> Take:
    """Rows of the training windows -> their (inputs, targets) on the device: from the
    built windows' tensors, or gathered from the series' values."""
    if isinstance(windows, Windows):
        x, y = _tensors(windows, device)
        return lambda rows: (x[rows], y[rows])
    values = torch.as_tensor(windows.values, dtype=torch.float64, device=device)
    first = torch.as_tensor(windows.first, device=device)
    inputs = torch.arange(-windows.window, 0, device=device)
    targets = torch.arange(windows.horizon, device=device)

    def take(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = first[rows].unsqueeze(1)
        return values[at + inputs], values[at + targets]

    return take


def _epoch(
    model: AttentionLSTM,
    optimiser: torch.optim.Optimizer,
    take: Take,
    size: int,
    weights: torch.Tensor,
    config: TrainConfig,
    shuffle: torch.Generator,
) -> float:
    model.train()
    order = torch.randperm(size, generator=shuffle).to(weights.device)
    total = 0.0
    for i in range(0, size, config.batch_size):
        idx = order[i : i + config.batch_size]
        optimiser.zero_grad(set_to_none=True)
        loss = scaled_loss(model, *take(idx), weights)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), config.clip_norm)
        optimiser.step()
        total += loss.item() * idx.shape[0]
    return total / size


def _evaluate(
    model: AttentionLSTM, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> float:
    model.eval()
    with torch.inference_mode():
        return float(scaled_loss(model, x, y, weights).item())
