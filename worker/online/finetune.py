"""One fine-tune: train a candidate on recent history, then gate it.

Pure computation (numpy and torch, no Redis), run in a child process beside the
serving path: :func:`run_job` takes the serving checkpoint's bytes (None for a cold
start) and every series' recent values, and returns the candidate with its scores and
the gate's decision.

Each series' history is split by time: the newest ``holdout`` share is the gate
slice, which the candidate never trains on; the rest trains it (its own newest
``VAL_SHARE`` picking the best epoch). On the gate slice the candidate must beat the serving model
(or, at a cold start, the naive forecast) by ``margin`` in MASE: each error over its
series' mean absolute change from one value to the next (:func:`_scales`), so that
every series counts alike whatever its units, averaged.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from attnlstm.checkpoint import dumps, loads
from attnlstm.metrics import naive_last
from attnlstm.model import ModelConfig
from attnlstm.train import TrainConfig, fit, new_model, predict
from attnlstm.windows import Windows, sampled_windows, split_point
from worker.online.trainer import NICE


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 300  # optimiser steps per fine-tune, about
    lr: float = 1e-3  # peak learning rate (cold start: 10x this)
    batch_size: int = 64
    holdout: float = 0.2  # newest share of each series' history: the gate slice
    margin: float = 0.02  # the candidate's MASE must be this much (relative) lower
    seed: int = 0


@dataclass(frozen=True)
class Job:
    histories: list[np.ndarray]  # per series, oldest first
    config: FinetuneConfig
    serving: bytes | None = None  # the serving checkpoint; None: a cold start
    model_config: dict[str, Any] = field(default_factory=dict)  # cold start only


@dataclass(frozen=True)
class Outcome:
    candidate: bytes  # checkpoint bytes
    version: str
    promote: bool
    reason: str
    scores: dict[str, float]


# Windows a fine-tune reads at most, beyond those a random sample over every series and
# time: every window of 1,000 series of 1,360 values for the day-ahead model would hold
# 3 GB (and 10,000 series, the default history_series, 32 GB). The gate decides, so it
# reads the most. Validation runs after every epoch, and a day-ahead model's series give
# 28 validation windows for each training one (171 against 6, where the context eats the
# training part): with 8,192 of them a day-ahead fine-tune of 50 series took 20 s, with
# 2,048 7 s, and its candidate scored the same on the gate (MASE 0.657).
GATE_WINDOWS = 8192
VAL_WINDOWS = 2048  # as many as the blend fits its shares on (attnlstm.blend.MAX_WINDOWS)
VAL_SHARE = 0.2  # newest share of what is left before the gate slice: validation


class NotEnoughDataError(ValueError):
    """Too little history for training and a gate slice."""


@functools.cache
def min_points(context: int, horizon: int, holdout: float) -> int:
    """The shortest history that gives a few training windows (their part of it,
    ``(1 - holdout) * (1 - VAL_SHARE)``, holds ``context + horizon`` values and four
    more) and at least one validation and one gate window (each of those parts holds
    ``horizon`` values: a long horizon, or a small holdout, needs a longer history).
    Each count grows with the length, so any longer history gives them too."""
    length = math.ceil((context + horizon + 4) / ((1 - holdout) * (1 - VAL_SHARE))) + 2
    length = max(length, math.ceil(horizon / holdout), math.ceil(horizon / VAL_SHARE))
    while min(_window_counts(length, context, horizon, holdout)) < 1:
        length += 1  # past the rounding of the cuts
    return length


def history_kept(history_len: int, context: int, horizon: int, holdout: float) -> int:
    """The values the worker keeps per series: ``history_len``, or what a fine-tune of
    the model needs where that is more (a seasonal model's context is several cycles; a
    long horizon needs a long gate slice)."""
    return max(history_len, min_points(context, horizon, holdout))


def _cuts(length: int, holdout: float) -> tuple[int, int]:
    """Where a history of ``length`` values enters its validation part, and its gate
    slice."""
    gate = split_point(length, holdout)
    return split_point(gate, VAL_SHARE), gate


def _window_counts(length: int, context: int, horizon: int, holdout: float) -> list[int]:
    """How many training, validation and gate windows a history of ``length`` values
    gives (see :func:`_windows`)."""
    val, gate = _cuts(length, holdout)
    firsts, stops = [context, max(val, context), max(gate, context)], [val, gate, length]
    return [stop - horizon + 1 - first for first, stop in zip(firsts, stops, strict=True)]


def init_process(threads: int) -> None:
    """The fine-tuning process: few threads, below the serving path in priority, and
    deaf to Ctrl-C (it reaches the whole process group; the worker stops this process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a multiprocessing semaphore, which a terminated process
    # leaves behind (and Python warns of at exit); one process needs a thread lock.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(threads)
    os.nice(max(0, NICE - os.nice(0)))  # NICE below, once (trainer.serve's was before torch)


def run_job(job: Job) -> Outcome:
    started = time.perf_counter()
    cfg = job.config
    serving = loads(job.serving, source="serving model") if job.serving is not None else None
    config = serving.config if serving else ModelConfig.from_dict(job.model_config)
    usable = min_points(config.context, config.horizon, cfg.holdout)
    series = [h for h in job.histories if len(h) >= usable]
    if not series:
        raise NotEnoughDataError(f"no series has the {usable} values a fine-tune needs")
    train, val, gate = _windows(series, config, cfg)
    if not (len(train) and len(val) and len(gate)):
        raise NotEnoughDataError(
            f"{len(train)} training, {len(val)} validation and {len(gate)} gate windows in "
            f"{len(series)} series of {usable} values or more"
        )
    model = new_model(config, seed=cfg.seed)
    if serving is not None:
        model.load_state_dict(serving.model.state_dict())
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    lr = cfg.lr if serving is not None else 10 * cfg.lr
    train_config = TrainConfig(
        epochs=max(1, math.ceil(cfg.steps / steps_per_epoch)),
        batch_size=cfg.batch_size,
        lr=lr,
        patience=10,
        seed=cfg.seed,
    )
    result = fit(model, train, val, train_config)

    yhat, _ = predict(model, gate.x)
    served = predict(serving.model, gate.x)[0] if serving is not None else naive_last(gate)
    scales = _scales(series, cfg.holdout)
    promote, candidate, incumbent = _verdict(gate, yhat, served, scales, cfg.margin)
    against = "the serving model" if serving is not None else "the naive forecast"
    reason = (
        f"MASE {candidate:.4f}{_change(candidate, incumbent)} {against}'s {incumbent:.4f} (a "
        f"candidate must be {cfg.margin:.0%} below) on the newest {cfg.holdout:.0%} of "
        f"{len(series)} series ({len(gate)} windows)"
    )
    scores = {
        "mase": candidate,
        "serving_mase": incumbent,
        "mae": _mae(gate, yhat),
        "serving_mae": _mae(gate, served) if serving is not None else math.nan,
        "naive_mae": _mae(gate, naive_last(gate)),
        "train_windows": float(len(train)),
        "val_windows": float(len(val)),
        "gate_windows": float(len(gate)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    meta = {
        "data": "finetune",
        "parent": serving.version if serving else None,
        "scores": scores,
        **({"spread": result.spread.to_meta()} if result.spread is not None else {}),
        **({"blend": result.blend.to_meta()} if result.blend is not None else {}),
    }
    blob, version = dumps(model, meta)
    return Outcome(blob, version, promote, reason, scores)


def _windows(
    series: list[np.ndarray], config: ModelConfig, cfg: FinetuneConfig
) -> tuple[Windows, Windows, Windows]:
    """Training, validation and gate windows, each of a bounded number (``steps`` batches,
    VAL_WINDOWS and GATE_WINDOWS) sampled from every series' part: the gate's
    is the newest ``holdout`` of each series, the validation's the newest ``VAL_SHARE``
    of the rest, and training's what comes before. The time and memory of a fine-tune do not
    grow with the series served."""
    context, horizon = config.context, config.horizon
    cuts = [_cuts(len(s), cfg.holdout) for s in series]
    train = [(0, v - horizon + 1) for v, _ in cuts]
    val = [(v, g - horizon + 1) for v, g in cuts]
    gate = [(g, len(s)) for (_, g), s in zip(cuts, series, strict=True)]
    limits = (cfg.steps * cfg.batch_size, VAL_WINDOWS, GATE_WINDOWS)
    return (
        sampled_windows(series, context, horizon, train, limits[0], cfg.seed),
        sampled_windows(series, context, horizon, val, limits[1], cfg.seed + 1),
        sampled_windows(series, context, horizon, gate, limits[2], cfg.seed + 2),
    )


def _scales(series: list[np.ndarray], holdout: float) -> np.ndarray:
    """Each series' mean absolute change from one value to the next before its gate
    part, or in it where that is larger: MASE's own scale, from hundreds of values.
    Scaled by the naive forecast's error on the gate's windows of the series instead
    (one or two, of 8,192 over 10,000 series), the few near 0 decided the gate: a
    candidate 20% worse was promoted 7 times in 40. By the part before alone, a series
    stuck at one value but for a blip that moves again in the gate part (a scale near 0,
    its errors thousands of times the others') decided alone: a candidate 50% worse on
    49 sines and 10% better on it was promoted (a review)."""
    scales = []
    for values in series:
        gate = _cuts(len(values), holdout)[1]
        before = np.mean(np.abs(np.diff(values[:gate])))
        during = np.mean(np.abs(np.diff(values[gate - 1 :]))) if gate < len(values) else 0.0
        scales.append(float(max(before, during)))
    return np.array(scales)


def _verdict(
    gate: Windows, yhat: np.ndarray, served: np.ndarray, scales: np.ndarray, margin: float
) -> tuple[bool, float, float]:
    """The gate: whether forecasts ``yhat`` of the ``gate`` windows beat the serving
    ones, ``served``, by ``margin`` of their MASE (each series by its ``scales``); the
    two MASEs."""
    candidate, incumbent = _mase(gate, yhat, scales), _mase(gate, served, scales)
    return candidate < incumbent * (1 - margin), candidate, incumbent


def _change(candidate: float, incumbent: float) -> str:
    """How far ``candidate``'s MASE is from ``incumbent``'s, for the verdict: ", 82.3%
    below", ", 3.0% above". The verdict said "beats ... by 2%", the margin asked for, which
    read as the margin found."""
    if not (math.isfinite(candidate) and math.isfinite(incumbent)) or incumbent <= 0:
        return " against"
    change = candidate / incumbent - 1
    shown = math.floor(abs(change) * 1000) / 1000  # 1.99% is 1.9%: "2.0% below" read as
    return f", {shown:.1%} {'below' if change < 0 else 'above'}"  # a 2% margin met


def _mase(gate: Windows, yhat: np.ndarray, scales: np.ndarray) -> float:
    """The mean absolute error of ``yhat``, each window's in its series' ``scales``
    (a series that never changed is left out)."""
    scale = scales[gate.series]
    ok = scale > 0
    if not ok.any():
        return 0.0 if _mae(gate, yhat) == 0 else math.inf
    return float(np.mean(np.abs(gate.y[ok] - yhat[ok]) / scale[ok, None]))


def _mae(gate: Windows, yhat: np.ndarray) -> float:
    return float(np.mean(np.abs(yhat - gate.y)))
