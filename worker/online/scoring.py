"""Online scoring: every one-step forecast against the value that arrives next.

Pure numpy over series slots, no I/O. Per series (:class:`Scorer`, one per partition
a worker serves), an exponential moving average of the absolute error (and of the naive
forecast's, the last value); overall (:class:`Overall`, one per worker), two moving
averages over time: a fast one (the rolling MAE) and a slow one (its recent level).
The fast one running well above the slow one is drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from attnlstm.intervals import FLAT, LOG_M_LIMIT, Adaptive
from worker.state import rounds

STEP_SERIES = 128  # slots per partition whose forecasts are scored at every step ahead
STEP_FORECASTS = 2**20  # at most, per partition: series x horizon x horizon steps (Steps)
MARKS = 4  # anomalies per series whose effect on its forecasts is followed at once
NEVER = 2**62  # values since an anomaly, where none is followed
# A stand-in lies at most this many times its series' usual change (the naive forecast's
# mean error) from the value before it. Through the worker on 60 copies of the electricity
# demand with spikes, some before each series' first forecast: precision 0.398 unheld,
# 0.524 held at 3. The value before itself as the stand-in gave 0.527, but 0.831 where
# this gives 0.933 with spikes only after each series' first forecast.
STAND_IN_REACH = 3.0
SERIES_ALPHA = 0.05  # per-series EMA weight of each new error (about 14 values' half-life)
LEVEL_SLOWER = 10.0  # the level's half-life, in rolling-MAE half-lives
# Overall's moving averages; "level" is the slow one.
AVERAGES = ("mae", "naive_mae", "coverage", "level", "step_mae", "step_coverage")


class Overall:
    """The worker's errors over time, whichever partition they came from.

    Each average moves towards a batch's mean by a weight that grows with the time since
    the batch before (``1 - 0.5 ** (dt / halflife_s)``): a half-life in seconds, however
    many values a second come. The calls of :meth:`add` with the same ``now`` are one
    batch, its mean over all their values: the worker scores each partition of a batch
    in a call of its own, and with a clock read per call the first partition's errors
    took nearly all of the batch's weight and the others' none (two partitions, one
    scored right and one all wrong: a rolling MAE of 0.1 where the mean error was 2.5).
    """

    def __init__(self, *, halflife_s: float) -> None:
        self.halflife_s = halflife_s
        self.mae = math.nan  # fast
        self.naive_mae = math.nan
        self.coverage = math.nan  # fast, like the MAE: the share of values inside their interval
        self.level = math.nan  # slow: what "usual" looks like
        self.step_mae = np.full(0, np.nan)  # (horizon,) fast, per step ahead, sampled series
        self.step_coverage = np.full(0, np.nan)  # (horizon,)
        self.scored = 0
        self._since = math.nan  # time of the last batch
        self._started = math.nan
        self._fast = self._slow = 0.0  # the last batch's weights
        self._before: dict[str, Any] = {}  # AVERAGES as they were before the last batch
        self._sums: dict[str, tuple[Any, Any]] = {}  # the last batch's sums and counts

    def add(
        self,
        err: np.ndarray,
        naive: np.ndarray,
        missed: np.ndarray | None,
        now: float,
        *,
        steps: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """One batch's absolute errors (or one partition's share of it: see the class),
        the naive forecast's, and which values fell outside their interval (None:
        intervals off); ``steps``: the sampled series' errors and insides at every step
        ahead (:class:`Steps`)."""
        self.scored += err.size
        if now != self._since:
            self._start(now)
        parts = {
            "mae": (err.sum(), err.size),
            "naive_mae": (naive.sum(), naive.size),
            "level": (err.sum(), err.size),
        }
        if missed is not None:
            parts["coverage"] = (missed.size - missed.sum(), missed.size)
        if steps is not None and steps[0].size:
            step_err, step_inside = steps
            if self.step_mae.size != step_err.shape[1]:  # a new model's horizon
                for name in ("step_mae", "step_coverage"):
                    setattr(self, name, np.full(step_err.shape[1], np.nan))
                    self._before[name] = getattr(self, name)
                    self._sums.pop(name, None)
            for name, per_step in (("step_mae", step_err), ("step_coverage", step_inside)):
                parts[name] = (np.nansum(per_step, axis=0), (~np.isnan(per_step)).sum(axis=0))
        for name, (total, count) in parts.items():
            total_so_far, count_so_far = self._sums.get(name, (0.0, 0))
            total, count = total_so_far + total, count_so_far + count
            self._sums[name] = (total, count)
            mean = np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)
            weight = self._slow if name == "level" else self._fast
            setattr(self, name, _follow(self._before[name], mean, weight))

    def _start(self, now: float) -> None:
        """A new batch, at ``now``."""
        dt = 0.0 if math.isnan(self._since) else max(now - self._since, 0.0)
        if math.isnan(self._since):
            self._started = now
        self._since = now
        self._fast = 1.0 - 0.5 ** (dt / self.halflife_s)
        self._slow = 1.0 - 0.5 ** (dt / (self.halflife_s * LEVEL_SLOWER))
        self._before = {name: getattr(self, name) for name in AVERAGES}
        self._sums = {}

    def drifting(self, ratio: float) -> bool:
        """The rolling MAE is ``ratio`` times its recent level, after at least one
        half-life of scores."""
        warmed = self._since - self._started >= self.halflife_s
        return bool(ratio > 0 and warmed and self.mae > ratio * self.level)

    def settle(self) -> None:
        """After a new model starts serving: its errors are the new usual (and the
        level the rest of a batch under way moves on from)."""
        self.level = self._before["level"] = self.mae
        self._sums.pop("level", None)


def _follow(old: Any, new: Any, weight: float) -> Any:
    """An average moved ``weight`` of the way to ``new``: ``new`` where there was none
    yet, ``old`` where ``new`` is NaN (floats or arrays)."""
    moved = np.where(np.isnan(old), new, old + weight * (new - old))
    kept = np.where(np.isnan(new), old, moved)
    return float(kept) if np.ndim(kept) == 0 else kept


@dataclass
class Scored:
    """One partition's batch, scored: how many values met their forecast; the interval
    of each forecast made (NaN rows: none made, or intervals off); the anomalies found."""

    count: int
    lo: np.ndarray  # (n, horizon)
    hi: np.ndarray  # (n, horizon)
    anomalies: np.ndarray  # positions in the batch of the values found anomalous
    expected: np.ndarray  # (anomalies, 3): the one-step forecast, lo and hi they broke
    scores: np.ndarray  # (anomalies,)


# What a series' scoring holds that a window checkpoint (worker.state) saves with its
# window, so that a restart goes on where the last save was: the pending one-step forecast
# and its interval, the last value, the error averages, how many values ago its last
# anomalies came, whether its last value was stood in for, the interval multiplier's
# logarithm, and the model it was learned against (its version's 8 bytes; zeros: not
# known). Not the Steps sample: metrics alone.
SAVED = (
    "forecast", "lo", "hi", "last", "mae", "naive_mae", "since", "stood_in", "log_m", "model"
)  # fmt: skip
MODEL_BYTES = 8


def model_bytes(version: str | None) -> np.ndarray:
    """A model version (16 hex digits) as the 8 bytes a saved scoring holds; zeros for
    none, or anything else."""
    try:
        raw = bytes.fromhex(version or "")
    except ValueError:
        raw = b""
    return np.frombuffer(raw if len(raw) == MODEL_BYTES else bytes(MODEL_BYTES), np.uint8)


# Puts the stand-in (second) in the place of the value at each batch position (first) in
# its window, and makes again the forecasts of the windows that held it (Scorer.update).
StandIn = Callable[[np.ndarray, np.ndarray], None]


class Scorer:
    """The series of one partition, by slot; their errors also go to ``overall``.

    With a spread (intervals on), each forecast gets its interval from the spread and the
    series' adaptive multiplier (:mod:`attnlstm.intervals`), and a value whose distance
    from its one-step forecast is ``threshold`` half-widths of that interval or more is
    an anomaly: its score is that distance in half-widths.

    An anomaly is stood in for (given a ``stand_in``, :meth:`update`): its window holds,
    in its place, the forecast it broke (held near the value before it: :meth:`_stand_ins`),
    so no later forecast reads it, and every value after it is judged. One value at a
    time: where the value before was stood in for, the series may have moved (a level
    shift), and the window takes the value as it came.

    An anomaly kept in its window is followed: a value is not judged when its forecast
    read one of its series' last MARKS such anomalies (``reads``, from
    :func:`attnlstm.model.one_step_reads`: which of the values before a forecast it reads,
    newest first), since that forecast would miss for the anomaly alone, and a spike
    would bring a flag for each forecast that reads it."""

    def __init__(
        self,
        overall: Overall,
        *,
        half_width: np.ndarray | None = None,
        coverage: float = 0.9,
        threshold: float = math.inf,
        reads: np.ndarray | None = None,
        model: str | None = None,
    ) -> None:
        """``half_width``: the spread at ``coverage`` per step ahead, in window deviations;
        None: no intervals. ``reads``: None, a forecast reads no value before it.
        ``model``: the version whose spread that is, saved with the multipliers."""
        self.overall = overall
        self.half_width = half_width
        self.model = model
        self.adaptive = Adaptive(coverage)
        self.threshold = threshold
        self.reads = np.zeros(0, dtype=bool) if reads is None else reads
        # (S, MARKS) per slot, values since each of its last anomalies (at most NEVER)
        self._since = np.zeros((0, MARKS), dtype=np.int64)
        self._stood_in = np.zeros(0, dtype=bool)  # (S,) its last value was stood in for
        self._forecast = np.full(0, np.nan)  # (S,) the pending one-step forecast per slot
        self._lo = np.full(0, np.nan)  # (S,) and its interval
        self._hi = np.full(0, np.nan)
        self._last = np.full(0, np.nan)  # (S,) the last value per slot
        self.series_mae = np.full(0, np.nan)  # (S,) EMA of |error|
        self.series_naive_mae = np.full(0, np.nan)  # (S,) EMA of |naive error|
        self.steps = Steps()

    def _arrays(self) -> dict[str, np.ndarray]:
        """SAVED's arrays, by name."""
        return {
            "forecast": self._forecast,
            "lo": self._lo,
            "hi": self._hi,
            "last": self._last,
            "mae": self.series_mae,
            "naive_mae": self.series_naive_mae,
            "since": self._since,
            "stood_in": self._stood_in,
            "log_m": self.adaptive.log_m,
        }

    def saved(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """What these slots' scoring holds (SAVED), to save with their windows."""
        self._fit(int(slots.max(initial=-1)) + 1)
        model = np.tile(model_bytes(self.model), (slots.size, 1))
        return {name: array[slots] for name, array in self._arrays().items()} | {"model": model}

    def restore(self, slots: np.ndarray, saved: dict[str, np.ndarray]) -> None:
        """These slots' scoring as :meth:`saved` gave it; ValueError, and nothing
        changed, when it is not that."""
        saved = _of_this_release(saved, self.reads.size)
        if set(saved) != set(SAVED):
            raise ValueError(f"saved scoring holds {sorted(saved)}, not {sorted(SAVED)}")
        arrays = self._arrays() | {"model": np.zeros((0, MODEL_BYTES), np.uint8)}
        if any(a.shape != (slots.size, *arrays[n].shape[1:]) for n, a in saved.items()):
            raise ValueError("saved scoring arrays do not match the series")
        if saved["model"].dtype != np.uint8:
            raise ValueError("saved model versions that are not bytes")
        since = saved["since"]
        if not (np.abs(saved["log_m"]) <= LOG_M_LIMIT).all():
            raise ValueError(f"saved interval multipliers past e^+-{LOG_M_LIMIT:g}")
        if since.dtype.kind not in "iu" or (since < 0).any():
            raise ValueError("saved counts since an anomaly that are not whole numbers >= 0")
        if saved["stood_in"].dtype != np.bool_:
            raise ValueError("saved stand-in marks that are not booleans")
        self._fit(int(slots.max(initial=-1)) + 1)
        for name, array in self._arrays().items():
            array[slots] = saved[name]
        # Learned against another model's spread (a switch while this worker was down,
        # or before the save): from 1 again, as at a switch seen live (Worker._serve).
        learned = saved["model"]
        other = learned.any(axis=1) & (learned != model_bytes(self.model)).any(axis=1)
        self.adaptive.log_m[slots[other]] = 0.0

    def _judge(
        self,
        idx: np.ndarray,
        slots: np.ndarray,
        values: np.ndarray,
        err: np.ndarray,
        standing: bool,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Values against their pending intervals (distinct slots, each with a forecast,
        ``err`` from it): which fell outside (the multiplier learns of each), the anomaly
        events, rows of (batch position, score, yhat, lo, hi), and which events are stood
        in for (none unless ``standing``). The others are followed."""
        lo, hi = self._lo[slots], self._hi[slots]
        half = (hi - lo) / 2
        # Off a zero-wide interval, any distance is infinitely many half-widths, and none
        # (or rounding's, FLAT of the level, as the window was flat by) is none, and
        # inside; with no interval (NaN), no score, and no event.
        off = err > FLAT * np.abs(self._forecast[slots])
        miss = ((values < lo) | (values > hi)) & ((half > 0) | off)
        # Only an interval of some width teaches the multiplier: a flat window's is zero
        # wide whatever the multiplier (each value on the level a "hit" would shrink it to
        # its floor, and the intervals after the flat stretch with it), and one made with
        # intervals off (NaN, saved before a restart that turned them on) is none.
        wide = half > 0
        self.adaptive.update(slots[wide], miss[wide])
        score = np.divide(err, half, out=np.where(off, np.inf, 0.0), where=wide)
        score[np.isnan(half)] = np.nan
        # This value's place after each followed anomaly: 1 is the next value, whose
        # forecast read the anomaly as its newest value (reads[0]).
        after = self._since[slots] + 1
        past = self.reads.size + 1  # past the context: read by none
        judged = ~np.append(self.reads, False)[np.minimum(after, past) - 1].any(axis=1)
        # Outside the interval, too: at a threshold of 1 a value on a bound scored 1.000
        # by rounding, and was an event the coverage counted inside.
        flag = miss & (score >= self.threshold) & judged
        stood_in = flag & ~self._stood_in[slots] if standing else np.zeros_like(flag)
        self._since[slots] = np.minimum(after, NEVER)
        self._stood_in[slots] = stood_in
        marked = slots[flag & ~stood_in]  # each replaces its slot's oldest followed anomaly
        self._since[marked, self._since[marked].argmax(axis=1)] = 0
        return miss, np.c_[idx, score, self._forecast[slots], lo, hi][flag], stood_in[flag]

    def _stand_ins(self, slots: np.ndarray, broken: np.ndarray) -> np.ndarray:
        """What stands in for an anomaly: the forecast it ``broke``, held within STAND_IN_REACH
        of its series' usual change (the naive forecast's mean error, before it) from the
        value before it. A forecast that read a glitch no one judged (a value before the
        series' first forecast) misses values that are as they should be; stood in for by
        that forecast, each would carry the glitch into the windows again."""
        last = self._last[slots]
        reach = STAND_IN_REACH * self.series_naive_mae[slots]
        reach = np.where(np.isnan(reach), np.inf, reach)  # nothing scored yet: as it was
        held: np.ndarray = np.clip(broken, last - reach, last + reach)
        return held

    def _fit(self, size: int) -> None:
        if size <= self._forecast.size:
            return
        grow = max(size, 2 * self._forecast.size, 64) - self._forecast.size
        pad = np.full(grow, np.nan)
        for name in ("_forecast", "_lo", "_hi", "_last", "series_mae", "series_naive_mae"):
            setattr(self, name, np.r_[getattr(self, name), pad])
        self._since = np.r_[self._since, np.full((grow, MARKS), NEVER, dtype=np.int64)]
        self._stood_in = np.r_[self._stood_in, np.zeros(grow, dtype=bool)]
        self.adaptive.fit(size)

    def forget(self, slots: np.ndarray) -> None:
        """Slots freed (their series idle): whoever takes one next starts unscored."""
        slots = slots[slots < self._forecast.size]
        for per_slot in (
            self._forecast,
            self._lo,
            self._hi,
            self._last,
            self.series_mae,
            self.series_naive_mae,
        ):
            per_slot[slots] = np.nan
        self._since[slots] = NEVER
        self._stood_in[slots] = False
        self.adaptive.forget(slots)
        self.steps.forget(slots)

    def update(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        forecasts: np.ndarray,
        scale: np.ndarray,
        now: float,
        stand_in: StandIn | None = None,
        fresh: np.ndarray | None = None,
        counted: np.ndarray | None = None,
    ) -> Scored:
        """Score ``values`` (in stream order, as they came) against each slot's pending
        forecast, then make ``forecasts`` (n, horizon; NaN rows: none was made), made from
        windows of deviation ``scale``, the pending ones, each with its interval. A value
        marked ``fresh`` starts its series' scoring afresh, as its window did (idle past
        ``series_idle_s``): it meets no forecast made before the gap. Only the values
        marked ``counted`` (None: all) go to ``overall`` and the count: the others, re-read
        after a restore, were counted when they were first handled, and only take each
        series' scoring on as it went.

        Each anomaly to be stood in for goes to ``stand_in`` (its position, its stand-in)
        as it is found, before any later value of its series is judged: it puts the
        stand-in in the value's place in the window and makes again, in ``forecasts`` and
        ``scale``, the forecasts whose windows held the value. So a value is judged against
        the forecast it would have met had its series come one value a batch."""
        n, horizon = forecasts.shape
        lo, hi = np.full((n, horizon), np.nan), np.full((n, horizon), np.nan)
        found: list[np.ndarray] = []
        if n == 0:
            return Scored(0, lo, hi, np.empty(0, np.int64), np.empty((0, 3)), np.empty(0))
        self._fit(int(slots.max()) + 1)
        self.steps.fit(horizon)
        errors, naive, missed, steps = [], [], [], []
        counts = np.ones(n, dtype=bool) if counted is None else counted
        for idx in rounds(slots):
            s, v, c = slots[idx], values[idx], counts[idx]
            if fresh is not None:
                self.forget(s[fresh[idx]])
            ok = ~np.isnan(self._forecast[s])
            self._stood_in[s[~ok]] = False
            if ok.any():
                so, vo = s[ok], v[ok]
                err = np.abs(vo - self._forecast[so])
                nerr = np.abs(vo - self._last[so])
                if self.half_width is not None:
                    standing = stand_in is not None
                    miss, events, stood_in = self._judge(idx[ok], so, vo, err, standing)
                    # Judged against an interval: one forecast with intervals off (NaN,
                    # saved before a restart that turned them on) counted as inside.
                    bounded = c[ok] & ~np.isnan(self._lo[so])
                    missed.append(miss[bounded])
                    found.append(events)
                    if stand_in is not None and stood_in.any():
                        at = events[stood_in, 0].astype(np.int64)
                        stand_in(at, self._stand_ins(slots[at], events[stood_in, 2]))
                self.series_mae[so] = _ema(self.series_mae[so], err)
                self.series_naive_mae[so] = _ema(self.series_naive_mae[so], nerr)
                errors.append(err[c[ok]])
                naive.append(nerr[c[ok]])
            one = forecasts[idx]
            if self.half_width is not None:
                m = self.adaptive.multiplier(s) * scale[idx]
                lo[idx] = one - self.half_width * m[:, None]
                hi[idx] = one + self.half_width * m[:, None]
                self._lo[s], self._hi[s] = lo[idx, 0], hi[idx, 0]
            step_err, step_inside = self.steps.update(s, v, one, lo[idx], hi[idx])
            sampled = c[self.steps.sampled(s)]
            steps.append((step_err[sampled], step_inside[sampled]))
            self._forecast[s] = one[:, 0]
            self._last[s] = v
        events = np.concatenate(found) if found else np.empty((0, 5))
        count = sum(e.size for e in errors)
        if count:
            self.overall.add(
                np.concatenate(errors),
                np.concatenate(naive),
                np.concatenate(missed) if missed else None,
                now,
                steps=(
                    np.concatenate([e for e, _ in steps]),
                    np.concatenate([c for _, c in steps]),
                ),
            )
        return Scored(count, lo, hi, events[:, 0].astype(np.int64), events[:, 2:], events[:, 1])


def _of_this_release(saved: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
    """A saved scoring of an earlier release, with what this one saves beside."""
    if "quiet" in saved and "since" not in saved:  # saved before 2026-12-03
        saved = _since_from_quiet(saved, context)
    if "stood_in" not in saved and "since" in saved:  # saved before anomalies stood in
        saved = saved | {"stood_in": np.zeros(saved["since"].shape[0], dtype=bool)}
    if "model" not in saved and "log_m" in saved:  # saved before 2026-12-07: not known
        saved = saved | {"model": np.zeros((saved["log_m"].shape[0], MODEL_BYTES), np.uint8)}
    return saved


def _since_from_quiet(saved: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
    """Scoring saved before each anomaly was followed on its own, when a count of values
    left unjudged after the last anomaly (``quiet``, out of ``context``) stood for it:
    the values since that anomaly, the same values left unjudged by a model that reads
    its whole context."""
    quiet = saved["quiet"]
    if quiet.dtype.kind not in "iu" or (quiet < 0).any():
        raise ValueError("saved quiet counts that are not whole numbers >= 0")
    since = np.full((quiet.size, MARKS), NEVER, dtype=np.int64)
    since[:, 0] = np.where(quiet.ravel() > 0, np.maximum(context - quiet.ravel(), 0), NEVER)
    return {name: a for name, a in saved.items() if name != "quiet"} | {"since": since}


class Steps:
    """Every step ahead of the forecasts of the first STEP_SERIES slots, scored as their
    values arrive: for each, the last ``horizon`` forecasts (and intervals) it was made,
    in a ring. A sample: keeping them for every series would take horizon^2 values each,
    and past a horizon of 90 the sample shrinks to keep at most STEP_FORECASTS of them
    (24 MiB) per partition: a checkpoint of 1,000 steps ahead keeps one series' (all
    STEP_SERIES would take 3 GB), and one of more than 1,024 none. In float64,
    as the values come: float32 rounds a level of 1e7 + 0.3 to whole units, and gave
    forecasts right to 0.001 an error of 0.3 at every step, and no value inside its
    interval."""

    def __init__(self) -> None:
        self._ring = np.full((STEP_SERIES, 0, 0, 3), np.nan)
        self._count = np.zeros(STEP_SERIES, dtype=np.int64)  # values seen, per slot

    def fit(self, horizon: int) -> None:
        """Forecasts of ``horizon`` steps from now on (a new model's may differ)."""
        if self._ring.shape[1] != horizon:
            series = min(STEP_SERIES, STEP_FORECASTS // horizon**2)
            self._ring = np.full((series, horizon, horizon, 3), np.nan)

    def forget(self, slots: np.ndarray) -> None:
        slots = slots[slots < self._ring.shape[0]]
        self._ring[slots] = np.nan
        self._count[slots] = 0

    def sampled(self, slots: np.ndarray) -> np.ndarray:
        """Which of ``slots`` are in the sample (bool, by slot)."""
        return slots < self._ring.shape[0]

    def update(
        self,
        slots: np.ndarray,
        values: np.ndarray,
        yhat: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distinct slots' new values scored against each step of the forecasts made before
        them, then their new forecasts kept: (|error| (m, horizon), inside (m, horizon))
        of the m sampled slots, NaN where there was no such forecast. Only those rows are
        touched: a day-ahead batch of 1,024 has at most STEP_SERIES of them."""
        horizon = yhat.shape[1]
        sampled = np.flatnonzero(self.sampled(slots))
        s, v = slots[sampled], values[sampled]
        ahead = np.arange(1, horizon + 1)
        made = (self._count[s, None] - ahead) % horizon  # (m, horizon): ring position
        past = self._ring[s[:, None], made, ahead - 1]  # (m, horizon, 3)
        err = np.abs(v[:, None] - past[..., 0])
        within = (past[..., 1] <= v[:, None]) & (v[:, None] <= past[..., 2])
        inside = np.where(np.isnan(past[..., 1]), np.nan, within)
        self._ring[s, self._count[s] % horizon] = np.stack(
            [yhat[sampled], lo[sampled], hi[sampled]], axis=-1
        )
        self._count[s] += 1
        return err, inside


def _ema(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(old), new, old + SERIES_ALPHA * (new - old))
