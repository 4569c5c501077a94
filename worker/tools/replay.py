"""``attnlstm replay``: test streams for the worker, from sines or a CSV file.

Sources yield entries (their fields, in stream order) and know nothing of Redis;
:func:`replay` writes them, paced to a steady rate or as fast as Redis takes them.
"""

from __future__ import annotations

import contextlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
from tqdm import tqdm

from attnlstm.data import (
    VALUE_MAX,
    DataError,
    Layout,
    cell,
    column_index,
    csv_rows,
    refuse_data_as_header,
    refuse_unnamed_values,
    separated,
    time_ms,
    unnamed_columns,
    unread_time,
    unreadable,
)
from attnlstm.partition import partition_of
from attnlstm.synthetic import SineSpec, make_sines
from worker.contract import parse, value_refused
from worker.keys import Keys
from worker.pool import mark_partitions
from worker.signals import STOP_SIGNALS, handled
from worker.streams import exchange, keys_on, redirected, words, xadd

FlatFields = tuple[bytes, ...]  # an entry's fields as XADD takes them: field, value, ...

# Entries the contract refuses, one of each kind: what --bad-rate draws from.
MALFORMED: tuple[FlatFields, ...] = (
    (b"value", b"1.0"),  # no series
    (b"series", b"", b"value", b"1.0"),
    (b"series", b"x" * 129, b"value", b"1.0"),
    (b"series", b"has space", b"value", b"1.0"),
    (b"series", b"\xff\xfe", b"value", b"1.0"),
    (b"series", b"bad"),  # no value
    (b"series", b"bad", b"value", b"abc"),
    (b"series", b"bad", b"value", b"nan"),
    (b"series", b"bad", b"value", b"1e999"),
    (b"series", b"bad", b"value", b"\xff"),
    (b"series", b"bad", b"value", b"1.0", b"ts", b"yesterday"),
    (b"series", b"bad", b"value", b"1.0", b"ts", b"-5"),
)

_SEND_MAX = 5_000  # entries per round trip, at most
# The waits before each send of a round trip's entries: the first, then those a Redis
# Cluster redirected (MOVED, ASK: a failover or a resharding moved their slot, and the
# node asked wrote none of them) to the slot's new owner.
_REDIRECT_WAITS_S = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
_TICK_S = 0.001  # a paced replay sends what is due about this often
_NAP_MAX_S = 1.0  # longest sleep between sends: a rate of 1e-300 waits, and never overflows
# Sines are drawn whole before the first entry goes out, at about 50 bytes a value while
# they are: 10 M values take some 500 MB.
MAX_SINE_VALUES = 10_000_000


def sine_entries(
    spec: SineSpec, *, seed: int, bad_rate: float = 0.0, prefix: str = "sine-"
) -> Iterator[FlatFields]:
    """Sines one time step after another (``{prefix}0`` .. ``{prefix}N-1`` each step),
    with a malformed entry of a random kind after each value with ``bad_rate``
    probability. The same arguments give the same entries in the same order. A spec
    :func:`make_sines` refuses is a ValueError here, before anything is written, and so
    is one whose values reach past what the worker takes (every entry dead-lettered)."""
    with np.errstate(over="ignore", invalid="ignore"):  # said below, in one line
        values = make_sines(spec, seed=seed).values  # (series, points)
        reach = float(np.abs(values).max(initial=0.0))
    if not reach <= VALUE_MAX:  # NaN too: a frequency of 1e308 overflows the phase
        raise ValueError(
            f"the sines reach {reach:.3g}, beyond the +-{VALUE_MAX:g} the worker takes: a "
            "smaller --amplitude, --offset, --noise, --freq or --drift-factor"
        )
    return _steps(values, seed=seed, bad_rate=bad_rate, prefix=prefix)


def check_sine_size(spec: SineSpec) -> None:
    """ValueError when ``spec`` holds more than :data:`MAX_SINE_VALUES` values: drawn at
    once, a day of a fast rate asked for hundreds of GB and ended in a MemoryError."""
    values = spec.n_series * spec.n_points
    if values > MAX_SINE_VALUES:
        raise ValueError(
            f"{spec.n_series:,} series of {spec.n_points:,} points is {values:,} values, "
            f"more than the {MAX_SINE_VALUES:,} a replay draws at once: fewer series or points"
        )


def _steps(values: np.ndarray, *, seed: int, bad_rate: float, prefix: str) -> Iterator[FlatFields]:
    """The entries of ``values`` (series, points), as :func:`sine_entries` says."""
    names = [f"{prefix}{j}".encode() for j in range(values.shape[0])]
    bad = np.random.default_rng([seed, 1])  # its own stream: the sines do not change
    for t in range(values.shape[1]):
        for j, name in enumerate(names):
            yield (b"series", name, b"value", repr(float(values[j, t])).encode())
            if bad_rate and bad.random() < bad_rate:
                yield MALFORMED[int(bad.integers(len(MALFORMED)))]


@dataclass(frozen=True)
class CsvLayout(Layout):
    """Which columns of a CSV file hold what, as :class:`attnlstm.data.Layout` says.

    Wide (no ``series_column``): every value column is a series named after it.
    Long: each row names its series in ``series_column`` and its value in
    ``value_column``.
    """

    value_columns: tuple[str, ...] = ()  # wide; default: every column but the time


_NOT_IN_IDS = r"[^A-Za-z0-9_.:/-]+"  # what the contract's series ids have no place for


def series_id(column: str) -> str:
    """A column name as a series id the contract accepts ("Water flow [l/s]" ->
    "Water_flow_l/s"): what it has no place for dropped at either end and each run of it
    within made one ``_``; an id the contract takes stays as it is (``_a`` too)."""
    trimmed = re.sub(f"^{_NOT_IN_IDS}|{_NOT_IN_IDS}$", "", column)
    name = re.sub(_NOT_IN_IDS, "_", trimmed)[:128]
    if not name:
        raise DataError(f"column {column!r} has no characters a series id can use")
    return name


def csv_entries(path: Path, layout: CsvLayout = CsvLayout()) -> Iterator[FlatFields]:
    """The file's rows in file order, one entry per non-empty value cell, with ``ts``
    from the time column. Gaps and repeated times stay as they are; a value cell is
    passed on as written, so the worker judges it like any producer's. A row it cannot
    replay is a DataError naming the file and line: :func:`count_csv` finds it before
    anything is written."""
    return (fields for _, fields in _lines_of(path, layout))


def _lines_of(path: Path, layout: CsvLayout) -> Iterator[tuple[int, FlatFields]]:
    """:func:`csv_entries`'s entries, each with its line."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is no name
            yield from _rows(path, csv_rows(path, f), layout)
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, e) from None


@dataclass(frozen=True)
class CsvCount:
    """What :func:`count_csv` found: the entries, how many of them the worker refuses
    (dead-letters), and the first of those, as ``LINE: reason``."""

    total: int
    refused: int = 0
    first_refused: str = ""


def count_csv(path: Path, layout: CsvLayout = CsvLayout()) -> CsvCount:
    """The entries :func:`csv_entries` gives, the whole file read: a check that finds a
    row it cannot replay before the first entry is written (a stream half written is
    worse than none), and counts the values the worker refuses. A DataError where it
    gives none (a header alone, or empty value cells: a replay of nothing exited 0), or
    where the worker refuses every value (``"100,59"``, quoted, in each row: a replay
    that exited 0 and every entry dead-lettered)."""
    total = refused = 0
    first = ""
    for line, fields in _lines_of(path, layout):
        total += 1
        # Its series is a cleaned name, and its ts one the worker takes (_ts): the value.
        if (reason := value_refused(fields[3])) is not None:
            refused += 1
            first = first or f"{line}: {reason}"
    if total == 0:
        raise DataError(f"{path}: no value to replay (a header row and no data row with one)")
    if refused == total:
        raise DataError(
            f"{path}:{first} (the worker refuses each of the {total:,} values, as it does "
            "that one): nothing to replay"
        )
    return CsvCount(total, refused, first)


def _rows(
    path: Path, rows: Iterator[tuple[int, list[str]]], layout: CsvLayout
) -> Iterator[tuple[int, FlatFields]]:
    """The entries of :func:`attnlstm.data.csv_rows`'s rows, each with its line."""
    line, header = next(rows, (0, []))
    if not header:
        raise DataError(f"{path}: no header row (the file is empty, or blank)")
    if not layout.time_column:  # (one named is looked for by name in the header)
        refuse_data_as_header(path, line, header)
    time_at, picks = _columns(path, header, layout)
    last: dict[bytes, tuple[int, str]] = {}  # each series' last time, and as written
    unnamed = unnamed_columns(header)
    for line, row in rows:
        if not any(cell.strip() for cell in row):
            continue
        refuse_unnamed_values(path, line, row, unnamed)
        text = cell(row, time_at)
        ts = _ts(path, line, text)
        wide = layout.series_column is None
        if wide:  # every series of the row at its time
            _forward(path, line, b"", (int(ts), text), last)
        for series, at in picks(row, line):
            value = cell(row, at)
            if value:
                if not wide:
                    _forward(path, line, series, (int(ts), text), last)
                yield line, (b"series", series, b"value", value.encode(), b"ts", ts)


def _forward(
    path: Path, line: int, series: bytes, now: tuple[int, str], last: dict[bytes, tuple[int, str]]
) -> None:
    """A DataError where time runs back, in a wide file's rows (``series`` empty) or a
    long file's series (`train` refuses such a file): the rows of a file newest first,
    or sorted by another column, went out as they came, and the worker forecast from
    time run backwards."""
    before = last.get(series)
    if before is not None and now[0] < before[0]:
        whose = f"series {series.decode()}'s time before" if series else "the row before's"
        raise DataError(
            f"{path}:{line}: time {now[1]!r} is before {before[1]!r}, {whose}: the rows must "
            "run forward in time"
        )
    last[series] = now


# A row's (series id, column index) pairs, from the row and its line.
_Picker = Callable[[list[str], int], list[tuple[bytes, int]]]


def _columns(path: Path, header: list[str], layout: CsvLayout) -> tuple[int, _Picker]:
    """The time column's index and the row's picker. Columns are taken by position: a
    name twice in the header is refused where it is asked for by name."""

    def index(name: str) -> int:
        return column_index(path, header, name)

    time_at = index(layout.time_column) if layout.time_column else 0
    if layout.series_column is not None:
        series_at, value_at = index(layout.series_column), index(layout.value_column)
        if len({time_at, series_at, value_at}) < 3:
            raise DataError(
                f"{path}: the time ({header[time_at]!r}), series ({header[series_at]!r}) and "
                f"value ({header[value_at]!r}) columns must be three columns"
            )
        ids = _LongIds(path)

        def long(row: list[str], line: int) -> list[tuple[bytes, int]]:
            return [(ids.of(cell(row, series_at), line), value_at)] if cell(row, value_at) else []

        return time_at, long
    picked = [index(name) for name in dict.fromkeys(layout.value_columns)]
    if time_at in picked:
        raise DataError(f"{path}: column {header[time_at]!r} is the time column, no series")
    # A column the header leaves unnamed holds no value (`time,a,`: refuse_unnamed_values).
    positions = picked or [k for k in range(len(header)) if k != time_at and header[k]]
    if not positions:
        raise DataError(f"{path}: no value columns besides the time column; {separated(header[0])}")
    wide = _series_of(path, header, positions)
    return time_at, lambda row, line: wide


class _LongIds:
    """A long file's series cells as series ids, cleaned as a wide file's column names
    are (they went out as written, and every entry of ``bad id`` was dead-lettered); a
    DataError naming the line of a cell with no character an id can use (an empty one
    too), or of one that would be the series of another cell (``a b`` after ``a_b``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ids: dict[str, bytes] = {}  # cell: id
        self.cells: dict[bytes, str] = {}  # id: the cell it came from

    def of(self, cell: str, line: int) -> bytes:
        if (known := self.ids.get(cell)) is not None:
            return known
        try:
            name = series_id(cell).encode()
        except DataError:
            raise DataError(
                f"{self.path}:{line}: series {cell!r} has no characters a series id can use"
            ) from None
        if (other := self.cells.get(name)) is not None:
            raise DataError(
                f"{self.path}:{line}: series {cell!r} and {other!r} would both be series "
                f"{name.decode()!r}; name them apart"
            )
        self.ids[cell], self.cells[name] = name, cell
        return name


def _series_of(path: Path, header: list[str], positions: list[int]) -> list[tuple[bytes, int]]:
    """Each value column's series id and index; a DataError where two columns would be
    one series (``a,a``; ``a b,a_b``): their values would go out as one."""
    first: dict[str, int] = {}
    for at in positions:
        try:
            name = series_id(header[at])
        except DataError as e:  # `time,a,` as a spreadsheet may write it: column 3 is ''
            raise DataError(f"{path}: column {at + 1}: {e}") from None
        if name in first:
            other = first[name]
            raise DataError(
                f"{path}: columns {other + 1} ({header[other]!r}) and {at + 1} "
                f"({header[at]!r}) would both be series {name!r}; name them apart"
            )
        first[name] = at
    return [(name.encode(), at) for name, at in first.items()]


def _ts(path: Path, line: int, text: str) -> bytes:
    """A row's time (:func:`attnlstm.data.time_ms`) as its entries' ``ts``; a DataError
    naming the line where the worker would refuse it (each entry dead-lettered), by the
    contract's own check."""
    try:
        ms = time_ms(text)
    except ValueError:
        raise unread_time(path, line, text) from None
    if ms < 0:
        raise DataError(f"{path}:{line}: time {text!r} is before 1970")
    ts = b"%d" % ms
    refused = parse(b"0-1", {b"series": b"s", b"value": b"0", b"ts": ts})
    if isinstance(refused, str):
        raise DataError(f"{path}:{line}: time {text!r}: the worker refuses it ({refused})")
    return ts


def _series(fields: FlatFields) -> bytes:
    """An entry's series id (empty: none)."""
    names = fields[0::2]
    return fields[2 * names.index(b"series") + 1] if b"series" in names else b""


def replay(
    client: redis.Redis,
    stream: str,
    entries: Iterable[FlatFields],
    *,
    rate: float | None,
    seconds: float | None = None,
    maxlen: int | None = None,
    total: int | None = None,
    progress: bool = False,
    partitions: int = 1,
) -> dict[str, Any]:
    """XADD the entries to ``stream``: entry k at ``start + k / rate`` (a schedule
    fixed at the start, so a slow round trip is caught up and never drifts), or with
    no ``rate`` as fast as Redis takes them, pipelined. Stops after ``seconds`` when
    given; Ctrl-C stops it too, with the report so far (and SIGTERM and SIGHUP, where
    they raise KeyboardInterrupt, as the command line makes them). With ``partitions``
    P > 1 each entry goes to its series' partition of ``stream`` (:func:`partition_of`,
    and the names of :meth:`Keys.partition`); an entry with no series, to partition 0's.
    PartitionsError when the streams are written in another number of partitions. On a
    Redis Cluster every partition's name is tagged, even a single one's (``stream{0}``)."""
    keys = keys_on(client, Keys(input=stream))
    # The names first: one refused (a brace in it) left a mark that refused the next try.
    heads = [xadd(keys.partition(k, partitions).input, maxlen=maxlen) for k in range(partitions)]
    mark_partitions(client, keys, partitions)
    source = iter(entries)
    paced_total = None  # entries to write, when paced for so long; no cap past sys.maxsize
    if rate is not None and seconds is not None:
        paced_total = round(min(seconds * rate, sys.maxsize))
    sent, done, interrupted = 0, False, False
    started = time.perf_counter()
    with tqdm(total=total, desc="replay", unit=" entries", disable=not progress) as bar:
        try:
            while not done and sent != paced_total:
                elapsed = time.perf_counter() - started
                if rate is None:
                    if seconds is not None and elapsed >= seconds:
                        break
                    due = _SEND_MAX
                else:  # entries due by now, never past seconds x rate
                    due = min(int(elapsed * rate) + 1, paced_total or sys.maxsize) - sent
                    due = min(due, _SEND_MAX)
                batch = [
                    heads[partition_of(_series(fields), partitions) if partitions > 1 else 0]
                    + fields
                    for _, fields in zip(range(due), source, strict=False)
                ]
                done = len(batch) < due
                if batch:
                    with _stops_held():  # once sent, counted: the report says what Redis holds
                        _send(client, batch, sent)
                        sent += len(batch)
                        bar.update(len(batch))
                if rate is not None and not done:
                    due_in = started + sent / rate - time.perf_counter()
                    time.sleep(min(max(due_in, _TICK_S), _NAP_MAX_S))
        except KeyboardInterrupt:
            interrupted = True
    took = time.perf_counter() - started
    return {
        "stream": stream,
        "partitions": partitions,
        "entries": sent,
        "seconds": round(took, 3),
        "entries_per_s": round(sent / took, 1) if took > 0 else 0.0,
        "interrupted": interrupted,
    }


def _send(client: redis.Redis, batch: list[FlatFields], written: int) -> None:
    """One round trip, then one for the entries a Redis Cluster redirected, as often as
    :data:`_REDIRECT_WAITS_S` allows (the worker follows a failover; replay stopped at
    the first MOVED). A Redis error raised says how many entries were written (the
    command line words the error by its type: the count goes in its message): exactly,
    where Redis refused entries (every reply read), or up to a round trip more, where a
    reply was lost."""
    for wait in _REDIRECT_WAITS_S:
        time.sleep(wait)
        try:
            replies = exchange(client, batch)
        except redis.RedisError as e:
            if written:  # Redis took entries over this URL: no hint at its scheme (TLS)
                e.__cause__ = e.__context__ = None
            e.args = (
                f"{words(e)} ({written:,} entries were written before it, and up to "
                f"{len(batch):,} more may have been)",
            )
            raise
        refusals = [r for r in replies if isinstance(r, redis.ResponseError) and not redirected(r)]
        if refusals:  # the others of the round trip were written: "up to" was a guess
            took = sum(not isinstance(reply, redis.ResponseError) for reply in replies)
            first = refusals[0]
            first.args = (
                f"{words(first)} ({written + took:,} entries were written, "
                f"{len(refusals):,} refused)",
            )
            raise first
        again = [entry for entry, reply in zip(batch, replies, strict=True) if redirected(reply)]
        if not again:
            return
        written += len(batch) - len(again)
        batch, moved = again, next(filter(redirected, replies))
    raise redis.ResponseError(
        f"the cluster still redirected {len(batch):,} entries after {len(_REDIRECT_WAITS_S)} "
        f"sends in {sum(_REDIRECT_WAITS_S):g} s: {words(moved)} ({written:,} entries were "
        "written)"
    )


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Ctrl-C held back until the block ends, then raised: cut short, a round trip left
    entries in the stream that the report did not count. So are SIGTERM and SIGHUP
    where they stop the replay as Ctrl-C does. Only the stop signals that raise
    KeyboardInterrupt (the main thread's default handler; the demo's replay ignores
    Ctrl-C)."""
    raising = [s for s in STOP_SIGNALS if signal.getsignal(s) is signal.default_int_handler]
    if threading.current_thread() is not threading.main_thread() or not raising:
        yield
        return
    held: list[int] = []
    with handled(raising, lambda signum, frame: held.append(signum)):
        yield
    if held:
        raise KeyboardInterrupt
