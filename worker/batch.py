"""One batch, pure (no I/O): when to cut it, what each of its entries becomes, and the
call that publishes it.

The loop in :mod:`worker.loop` reads, forecasts and sends; this decides what each entry
becomes (a forecast, a dead letter, only an ack, or nothing at all) and spells out the
one fenced call (:mod:`worker.lease`) that publishes the batch with its acks.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from worker.attempts import Mark
from worker.contract import (
    BOUND_DIGITS,
    YHAT_DIGITS,
    Fields,
    anomaly_values,
    dead_fields,
    decimal_rows,
    entry_ms,
    expected_numbers,
    forecast_values,
    fraction_rows,
    parse,
)
from worker.lease import Fence
from worker.streams import Command, Entry, id_key


class BatchWindow:
    """When to cut a batch: at ``max_batch`` entries, or ``max_wait_ms`` after the
    first entry arrived, whichever comes first (Triton's dynamic batcher, RedisAI's
    MINBATCHTIMEOUT). The loop asks it how long the next read may block."""

    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_ms: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_batch = max_batch
        self.size = 0
        self._clock = clock
        self._deadline = clock() + max_wait_ms / 1000  # the first entry is here now

    @property
    def room(self) -> int:
        return self.max_batch - self.size

    def add(self, n: int) -> None:
        self.size += n

    def block_ms(self) -> int | None:
        """How long the next read may wait for more, or None: cut the batch now.

        A blocking read takes whole milliseconds and BLOCK 0 means forever, so less
        than a millisecond left means cut."""
        if self.size >= self.max_batch:
            return None
        left_ms = int((self._deadline - self._clock()) * 1000)
        return left_ms if left_ms >= 1 else None


@dataclass
class Batch:
    """One read's entries, triaged: what to ack, dead-letter, and forecast."""

    acks: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, Fields, str]] = field(default_factory=list)  # id, fields, reason
    aside: list[bytes] = field(default_factory=list)  # of the dead: put aside, max_attempts
    # The valid readings, in stream order:
    ids: list[bytes] = field(default_factory=list)
    fields: list[Fields] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    publish: list[bool] = field(default_factory=list)  # False: acked before, replay only

    def reject(self, rows: np.ndarray, reason: str) -> None:
        """Dead-letter the valid readings at ``rows`` (batch positions) after all."""
        self.dead.extend((self.ids[i], self.fields[i], reason) for i in rows.tolist())


@dataclass(frozen=True)
class Receipt:
    """What a batch's transaction publishes, for the metrics once it is applied: counted
    then, an entry handled again after a call that did not apply (a dropped connection,
    a lost lease) is counted once."""

    entered_ms: np.ndarray  # (forecasts,) when each forecast's input entered the stream
    dead_reasons: list[str]
    anomalies: int = 0
    read: int = 0  # entries handled for the first time (not re-read after an ack)
    warming: int = 0  # entries kept in their windows, not forecast: a window not full yet
    refused: int = 0  # entries dead-lettered for the series limit
    scored: int = 0  # forecasts whose actual value this batch brought


def triage(
    entries: Sequence[Entry],
    *,
    pending: dict[bytes, int] | None,
    series_ids: dict[bytes, str],
    last_id: bytes,
    max_attempts: int,
    put_aside: Collection[bytes] = (),
    partition: tuple[int, int] = (0, 1),
) -> Batch:
    """``pending`` None: a live read, every entry new to us. Otherwise the entries
    still pending, with their handling attempts so far (:mod:`worker.attempts`): the
    others were acked before and only go back into the windows, except those
    ``put_aside`` (the windows never held them); one with ``max_attempts`` goes to the
    dead stream unhandled (listed in ``aside``). Entries at or before ``last_id`` (the
    windows' state) are acked and nothing else; ``series_ids`` caches series ids already
    validated. ``partition``: (k, P), the partition read; an entry of a series of
    another is dead-lettered (a producer that routes it wrong: served here, its series
    had a second window, and its forecasts were not where readers look)."""
    batch = Batch()
    handled = handled_before(entries, last_id)
    here, count = partition
    for k, (entry_id, fields) in enumerate(entries):
        ours = pending is None or entry_id in pending
        if ours:
            batch.acks.append(entry_id)
        if fields is None or k < handled or (not ours and entry_id in put_aside):
            continue  # deleted, handled before the state was saved, or put aside
        if pending is not None and pending.get(entry_id, 0) >= max_attempts:
            reason = f"the worker stopped while handling it, {pending[entry_id]} times"
            batch.dead.append((entry_id, fields, reason))
            batch.aside.append(entry_id)
            continue
        reading = parse(entry_id, fields, series_ids)
        # attnlstm.partition.partition_of inlined: 80 ns an entry where its call took 150
        if (
            count > 1
            and not isinstance(reading, str)
            and (home := zlib.crc32(fields[b"series"]) % count) != here
        ):
            reading = (
                f"partition is not the series': {reading.series} belongs to partition "
                f"{home} of {count} (crc32(series) mod P), not {here}"
            )
        if isinstance(reading, str):
            if ours:
                batch.dead.append((entry_id, fields, reading))
            continue
        batch.ids.append(entry_id)
        batch.fields.append(fields)
        batch.names.append(reading.series)
        batch.values.append(reading.value)
        batch.ts.append(reading.ts)
        batch.publish.append(ours)
    return batch


def handled_before(entries: Sequence[Entry], last_id: bytes) -> int:
    """How many leading entries the state at ``last_id`` already reflects (reads come
    in id order, so only a batch that starts at or before it needs looking at)."""
    last = id_key(last_id)
    if not entries or id_key(entries[0][0]) > last:
        return 0
    return next(
        (k for k, (entry_id, _) in enumerate(entries) if id_key(entry_id) > last),
        len(entries),
    )


@dataclass(frozen=True)
class Forecasts:
    """A batch's forecasts: the batch positions forecast, and what each got."""

    rows: np.ndarray  # (n,) batch positions
    yhat: np.ndarray  # (n, horizon)
    attn: np.ndarray  # (n, window)
    lo: np.ndarray | None = None  # (n, horizon); None: intervals off
    hi: np.ndarray | None = None


@dataclass(frozen=True)
class Anomalies:
    """Values of a batch that fell far outside their one-step interval."""

    rows: np.ndarray  # (n,) batch positions
    expected: np.ndarray  # (n, 3): the one-step forecast, lo and hi each broke
    scores: np.ndarray  # (n,) distance from the forecast, in interval half-widths


def batch_call(
    batch: Batch,
    made: Forecasts,
    fence: Fence,
    *,
    maxlen: int,
    version: bytes,
    anomalies: Anomalies | None = None,
    state: Mapping[bytes, bytes] | None = None,
    handled: bytes,
) -> tuple[Command | None, Receipt]:
    """The forecasts ``made``, the ``anomalies`` events, the dead letters, the acks and
    ``state`` as one fenced call, and its receipt; None when there is nothing to write.
    With acks, the call moves the handling mark past ``handled``, the last entry this
    batch handles.

    A forecast that is not finite is dead-lettered instead."""
    finite = np.isfinite(made.yhat).all(axis=1) & np.isfinite(made.attn).all(axis=1)
    if made.lo is not None and made.hi is not None:
        finite &= np.isfinite(made.lo).all(axis=1) & np.isfinite(made.hi).all(axis=1)
    batch.reject(made.rows[~finite], "the model's forecast is not finite")
    rows = made.rows[finite]
    bounds = (
        (
            decimal_rows(made.lo[finite], BOUND_DIGITS, "down"),
            decimal_rows(made.hi[finite], BOUND_DIGITS, "up"),
        )
        if made.lo is not None and made.hi is not None
        else ([b""] * rows.size, [b""] * rows.size)
    )
    forecasts = [
        forecast_values(batch.names[i], batch.ids[i], batch.ts[i], y, a, version, lo, hi)
        for i, y, a, lo, hi in zip(
            rows.tolist(),
            decimal_rows(made.yhat[finite], YHAT_DIGITS),
            fraction_rows(made.attn[finite]),
            *bounds,
            strict=True,
        )
    ]
    events = [] if anomalies is None else _events(batch, anomalies, version)
    dead = [
        [part for pair in dead_fields(fields, entry_id, reason).items() for part in pair]
        for entry_id, fields, reason in batch.dead
    ]
    entered_ms = np.fromiter((entry_ms(batch.ids[i]) for i in rows), np.float64, rows.size)
    receipt = Receipt(entered_ms, [reason for _, _, reason in batch.dead], len(events))
    if not (forecasts or dead or batch.acks or state is not None):
        return None, receipt
    mark = Mark(handled, 0, fence.token) if batch.acks else None
    call = fence.publish(
        maxlen=maxlen,
        forecasts=forecasts,
        anomalies=events,
        dead=dead,
        acks=batch.acks,
        state=state,
        mark=mark,
    )
    return call, receipt


def _events(batch: Batch, anomalies: Anomalies, version: bytes) -> list[tuple[bytes, ...]]:
    """The anomalies of entries this batch publishes for (not those replayed)."""
    return [
        anomaly_values(
            batch.names[i], batch.ids[i], batch.ts[i], batch.fields[i][b"value"], e, score, version
        )
        for i, e, score in zip(
            anomalies.rows.tolist(),
            expected_numbers(anomalies.expected),
            anomalies.scores.tolist(),
            strict=True,
        )
        if batch.publish[i]
    ]
