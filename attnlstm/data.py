"""Named data sources for training and evaluation: the article's sine, many sines, CSV.

A data spec is a short string: ``sine``, ``sines`` or ``csv:PATH``. Every source
yields a list of named 1-D float arrays, each series in its own units.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

import numpy as np

from attnlstm.synthetic import SineSpec, article_sine, make_sines


class DataError(Exception):
    """Data that cannot be read or used, with a message that says where and why."""


class NotANumberError(DataError):
    """A value cell that holds no number: ``cell``, the first of its column's (``first``)
    or not."""

    def __init__(self, message: str, cell: str, *, first: bool) -> None:
        super().__init__(message)
        self.cell, self.first = cell, first


DAY_S = 86_400
# The largest magnitude a value may have, in training as in the worker's input. A
# window's deviation is taken in float64, whose squares overflow past about 1e154 (the
# forecasts of every window holding such a value would be NaN, and a worker's valid
# entries of the series dead-lettered); the scores are kept in float32, whose largest is
# 3.4e38.
VALUE_MAX = 1e30
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Gaps:
    """Where a series' times skip steps (values 1.5 usual steps apart or more):
    ``count`` places, ``missing`` steps in all, the longest ``longest`` steps."""

    count: int
    missing: int
    longest: int


@dataclass(frozen=True)
class Dataset:
    names: list[str]
    series: list[np.ndarray]  # one 1-D float64 array per name
    step_s: float | None = None  # the usual time between values, when the data has times
    gaps: dict[str, Gaps] = field(default_factory=dict)  # the series whose times skip steps
    repeats: dict[str, int] = field(default_factory=dict)  # times a series' time comes again

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.series]

    def daily_period(self) -> int:
        """Steps per day, from the time step, or 0 when that says nothing (no times, or
        a step that does not divide a day, or a day of fewer than 4 steps or of more than
        a checkpoint's period may have: a column of row numbers, 1 s apart as times)."""
        from attnlstm.checkpoint import CONFIG_BOUNDS  # here: it imports torch

        if self.step_s is None or self.step_s <= 0:
            return 0
        steps = DAY_S / self.step_s
        usable = 4 <= steps <= CONFIG_BOUNDS["period"][1]
        return round(steps) if abs(steps - round(steps)) < 1e-6 and usable else 0


def fingerprint(values: np.ndarray) -> str:
    """Values as a short hash (16 hex digits of their sha256): how `evaluate` knows the
    values a model trained on, whatever path or name their series has."""
    return prefix_fingerprints(values, [len(values)])[0]


def prefix_fingerprints(values: np.ndarray, ends: Sequence[int]) -> list[str]:
    """The :func:`fingerprint` of ``values[:end]`` for each of ``ends`` (ascending), in
    one pass over the values."""
    raw, whole, start, prints = np.asarray(values, dtype="<f8"), hashlib.sha256(), 0, []
    for end in ends:
        whole.update(raw[start:end].tobytes())
        start = end
        prints.append(whole.copy().hexdigest()[:16])
    return prints


def load_dataset(
    spec: str,
    *,
    n_series: int = 50,
    columns: Sequence[str] = (),
    seed: int = 0,
    layout: Layout | None = None,
) -> Dataset:
    if spec == "sine":
        return Dataset(["sine"], [article_sine()])
    if spec == "sines":
        if n_series < 1:
            raise DataError(f"n_series must be >= 1, got {n_series}")
        sines = make_sines(SineSpec(n_series=n_series), seed=seed)
        return Dataset([f"sine-{i}" for i in range(n_series)], list(sines.values))
    if spec.startswith("csv:") and len(spec) > 4:
        return load_csv(Path(spec[4:]), columns, layout=layout)
    raise DataError(f"unknown data {spec!r}: use sine, sines or csv:PATH")


# What else a file of one column may be separated by, for the error that says so.
SEPARATORS = ((";", "semicolons"), ("\t", "tabs"))


def separated(name: str) -> str:
    """What a file whose header is the one column ``name`` is told: its columns are
    separated by commas, and, where ``name`` holds another separator, that one."""
    other = next((f" (are they {word}?)" for sep, word in SEPARATORS if sep in name), "")
    return f"columns are separated by commas{other}"


@dataclass(frozen=True)
class Layout:
    """Which columns of a CSV file hold the time and, in a long file (one row per
    reading, its series named in a column), the series and the value."""

    time_column: str | None = None  # default: the first column
    series_column: str | None = None  # a long file
    value_column: str = "value"  # a long file's


def load_csv(path: Path, columns: Sequence[str] = (), *, layout: Layout | None = None) -> Dataset:
    """Value columns of a CSV file with a header row, each one series; or, in a long
    file (``layout.series_column``), each series its rows.

    Without ``columns`` (in a long file, the series wanted), every column but the time
    (the first, unless ``layout`` names another) is used. Empty cells are gaps and are
    skipped, and so is a row of them (``,``, as a spreadsheet may end a file); anything
    else that is not a finite number, a time :func:`_time_step` refuses, and a row
    :func:`csv_rows` refuses, is an error naming its line.
    """
    layout = layout or Layout()
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is no name
            rows = list(csv_rows(path, f))
    except (OSError, UnicodeDecodeError) as e:
        raise unreadable(path, e) from None
    body = [(line, row) for line, row in rows[1:] if any(cell.strip() for cell in row)]
    if not rows or not body:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = rows[0][1]
    refuse_data_as_header(path, rows[0][0], header)
    unnamed = unnamed_columns(header)
    for line, row in body:
        refuse_unnamed_values(path, line, row, unnamed)
    clock = _Clock(path, header, layout.time_column)
    if layout.series_column is not None:  # ``columns``: the series wanted
        return _load_long(path, header, body, clock, layout, list(dict.fromkeys(columns)))
    # A column asked for twice: once. One the header leaves unnamed holds no value (as
    # a spreadsheet's trailing comma makes: `time,a,`), and is none.
    wanted = list(dict.fromkeys(columns)) or [
        name for k, name in enumerate(header) if name and k != clock.at
    ]
    if not wanted:
        raise DataError(
            f"{path}: no column of values: {clock.named} is taken to be the time, and there "
            f"is no other; {separated(header[0])}"
        )
    missing = [c for c in wanted if c not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(missing)}; it has {header}")
    at = [column_index(path, header, name) for name in wanted]
    step, times = clock.read(body)
    if times and clock.at in at:  # trained on as values, as `replay` refuses it
        raise DataError(f"{path}: column {header[clock.at]!r} is the time column, no series")
    read = []
    for k, name in zip(at, wanted, strict=True):
        try:
            read.append(_column(path, body, k, name))
        except NotANumberError as e:  # "ts='2026-...' is not a number": what would read it
            raise DataError(f"{e}{_layout_hint(e, name, bool(times), layout)}") from None
    stamps = np.asarray(times, dtype=np.float64)
    parts = [(values, stamps[kept] if stamps.size else stamps) for values, kept in read]
    return _dataset(wanted, parts, step)


def _layout_hint(error: NotANumberError, name: str, timed: bool, layout: Layout) -> str:
    """What may read a wide file's column ``name``, whose first cell is no number (one
    further down is a typo): where the first column holds no time, or a time column is
    named, the file as a long one (a row per reading); where the cell is a time, as the
    column of times."""
    if not error.first:
        return ""
    hints = [LONG_FILE] * (not timed or layout.time_column is not None)
    if layout.time_column is None and _is_time(error.cell):
        hints.append(f"--time-column {name} reads it as the file's times")
    return f" ({'; '.join(hints)})" if hints else ""


# What reads a long file, for a file read as a wide one that may be one.
LONG_FILE = (
    "a long file, a row per reading? --series-column NAME reads each row's series from "
    "column NAME, --value-column its value, --time-column its time"
)
LONG_HINT = f" ({LONG_FILE})"


def _dataset(
    names: list[str], parts: list[tuple[np.ndarray, np.ndarray]], step: float | None
) -> Dataset:
    """The series ``names``, each from its values and their times (ms; none known: empty),
    with where their times skip steps of ``step`` and where they come again."""
    gaps, repeats = {}, {}
    for name, (_, stamps) in zip(names, parts, strict=True):
        if step and (found := _gaps(stamps, step)):
            gaps[name] = found
        if stamps.size and (again := int(np.count_nonzero(np.diff(stamps) == 0))):
            repeats[name] = again
    return Dataset(names, [values for values, _ in parts], step, gaps, repeats)


def _load_long(
    path: Path,
    header: list[str],
    body: list[tuple[int, list[str]]],
    clock: _Clock,
    layout: Layout,
    series: Sequence[str] = (),
) -> Dataset:
    """A long file's series (those named in ``series``, or every one), as `replay`
    reads it: each the rows that name it in the series column, in file order, its values
    from the value column and its times from the time column (run forward within each
    series). A row with no value is skipped, but for its time, which must read as one
    where the file has times (where any row's does: every row's must, as in `replay`);
    one with a value and no series is an error. The time step is the lower median of
    the series' own."""
    assert layout.series_column is not None
    series_at = column_index(path, header, layout.series_column)
    value_at = column_index(path, header, layout.value_column)
    if len({clock.at, series_at, value_at}) < 3:
        raise DataError(
            f"{path}: the time ({header[clock.at]!r}), series ({header[series_at]!r}) and "
            f"value ({header[value_at]!r}) columns must be three columns"
        )
    timed = clock.given or _has_times(cell(row, clock.at) for _, row in body)
    rows_of: dict[str, list[tuple[int, list[str]]]] = {name: [] for name in series}
    for line, row in body:
        value, name, time = cell(row, value_at), cell(row, series_at), cell(row, clock.at)
        if value and not name:
            raise DataError(f"{path}:{line}: a value and no series ({header[series_at]!r})")
        if timed and not value:  # skipped, but for its time (the others': clock.read)
            _time_of(path, line, time)
        if value and (name in rows_of or not series):
            rows_of.setdefault(name, []).append((line, [time, value]))
    if missing := [name for name, rows in rows_of.items() if not rows]:
        named = [name for name in dict.fromkeys(cell(row, series_at) for _, row in body) if name]
        raise DataError(
            f"{path}: no value of series {', '.join(map(repr, missing))} in column "
            f"{header[series_at]!r}; it names {', '.join(named[:10])}"
            + (f" and {len(named) - 10:,} more" if len(named) > 10 else "")
        )
    if not rows_of:
        raise DataError(f"{path}: column {layout.value_column!r} has no values")
    parts, steps = [], []
    for name, rows in rows_of.items():
        times = clock.read(rows, at=0, series=name, required=True)[1] if timed else []
        values, _ = _column(path, rows, 1, layout.value_column)
        stamps = np.asarray(times, dtype=np.float64)
        parts.append((values, stamps))
        steps.append(np.diff(stamps) / 1000)
    # The lower median of the steps that are steps (a time twice is none: it is counted
    # as a repeat): a series read hourly beside one read every two hours is hourly.
    step = np.concatenate(steps)
    step = step[step > 0]
    median = float(np.percentile(step, 50, method="lower")) if step.size else None
    return _dataset(list(rows_of), parts, median)


# Time cells looked at for a time in a form not read (foreign_time tries 144 forms, 2.4
# ms a cell: on every cell of a file without times, 36 s for 20,000 rows).
FOREIGN_LOOKS = 100


def _has_times(texts: Iterable[str]) -> bool:
    """Whether a column of ``texts`` holds a time: one :func:`time_ms` reads, or among
    its first non-empty cells one in a form not read (`20/03/2022 11:00`: a time, to be
    refused as unread, not a file without times)."""
    looks = 0
    for text in texts:
        if _is_time(text):
            return True
        if text and looks < FOREIGN_LOOKS:
            looks += 1
            if foreign_time(text):
                return True
    return False


def _time_of(path: Path, line: int, text: str) -> int:
    """The time ``text`` in ms; a DataError naming ``line`` where it is none, or out of
    the worker's range."""
    try:
        ms = time_ms(text)
    except ValueError:
        raise unread_time(path, line, text) from None
    _in_range(path, line, text, ms)
    return ms


def _is_time(text: str) -> bool:
    try:
        time_ms(text)
    except ValueError:
        return False
    return True


def cell(row: Sequence[str], at: int) -> str:
    """A row's cell at ``at``, stripped; empty past the row's end."""
    return row[at].strip() if at < len(row) else ""


def _gaps(times_ms: np.ndarray, step_s: float) -> Gaps | None:
    """Where ``times_ms`` (float64: exact to 2^53 ms) skip steps of ``step_s``; None
    where they skip none."""
    apart = np.diff(times_ms) / (step_s * 1000)
    missing = np.floor(apart[apart >= 1.5] + 0.5).astype(np.int64) - 1  # 2.5 apart: 2
    return Gaps(missing.size, int(missing.sum()), int(missing.max())) if missing.size else None


def column_index(path: Path, header: Sequence[str], name: str) -> int:
    """Where the column ``name`` is in ``header``; a DataError where none is, or more than
    one (by name, the first one's values were read for each of them)."""
    at = [k for k, h in enumerate(header) if h == name]
    if not at:
        raise DataError(f"{path}: no column {name!r}; it has {list(header)}")
    if len(at) > 1:
        raise DataError(
            f"{path}: {len(at)} columns are named {name!r} "
            f"(columns {', '.join(str(k + 1) for k in at)}); name them apart"
        )
    return at[0]


# A count since the epoch by the size of its whole part: below ``below``, a unit of
# ``ms / per`` ms (seconds, ms, µs; past them, ns, as pandas writes them).
COUNT_UNITS = ((10**11, 1000, 1), (10**14, 1, 1), (10**17, 1, 1000))
NS = (1, 10**6)
# A count with a decimal fraction is a time from 10^9 s (2001-09-09) on: ``20.5``, a
# first column of sensor values, is none (a file with no time column).
FRACTION_FROM = 10**9
# The times a file may hold, in ms since the epoch, as the worker takes a ts: 16 digits
# (the year 318,857). Past it, a time of 400 digits ended `train` in an OverflowError.
TIME_MS_MAX = 10**16 - 1


def time_ms(text: str) -> int:
    """ISO 8601 (a zone-less time is taken as UTC) or a number of seconds, ms, µs or ns
    since the epoch, whole or, from :data:`FRACTION_FROM`, with a decimal fraction
    (``1700000000.5``), told apart by the size of its whole part (10^11 s is the year
    5138, 10^11 ms March 1973: ms before then read as seconds), as ms since the epoch
    (negative before 1970; below a ms, floored). A ValueError for anything else.
    Integer arithmetic: through a float, an ISO time with ms could come out 1 ms early
    (before about 2004 and after about 2038)."""
    whole, dot, fraction = text.partition(".")
    if _digits(whole) and (not dot or (_digits(fraction) and int(whole) >= FRACTION_FROM)):
        count, scale = int(whole), int("1" + "0" * len(fraction))
        exact = count * scale + int(fraction or "0")  # the number is exact / scale
        ms, per = next(((ms, per) for below, ms, per in COUNT_UNITS if count < below), NS)
        return exact * ms // (scale * per)
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - EPOCH) // timedelta(milliseconds=1)


# Times as spreadsheets and loggers write them, which time_ms does not read: a first
# column of them was taken for no time at all, and a model trained with no period.
FOREIGN_TIMES = tuple(
    f"{date}{time}"
    for date in (
        *(f"%{a}{sep}%{b}{sep}%{y}" for a, b in ("dm", "md") for sep in "/.-" for y in "Yy"),
        "%Y/%m/%d",
        "%d-%b-%Y",
        "%d %b %Y",
        "%b %d %Y",
    )
    for time in (
        *("", " %H:%M", " %H:%M:%S", " %H:%M:%S.%f", " %I:%M %p", " %I:%M:%S %p"),
        *(" %I:%M%p", "T%H:%M", "T%H:%M:%S"),
    )
)


def unread_time(path: Path, line: int, text: str) -> DataError:
    """The error for a time :func:`time_ms` does not read, with the form to write it
    in where it is a time in another (:func:`foreign_time`)."""
    hint = (
        ": write times as ISO 8601 (2022-03-20T11:00:00, with +01:00 or Z for the zone; "
        "the first column is taken to be the time)"
        if foreign_time(text)
        else ""
    )
    return DataError(
        f"{path}:{line}: time {text!r} is neither ISO 8601 nor a count since the epoch{hint}"
    )


def foreign_time(text: str) -> bool:
    """Whether ``text`` is a time in a form :func:`time_ms` does not read: a date with
    slashes, dots or a month's name, day or month first, a two-digit year; or ISO 8601
    with a zone's name (`` UTC``, `` CET``) or a lower-case ``z``."""
    head, _, zone = text.rpartition(" ")
    bare = head if head and zone.isalpha() and zone.isupper() and len(zone) <= 5 else text
    bare = bare.removesuffix("z")
    if bare != text:
        try:
            datetime.fromisoformat(bare)
        except ValueError:
            pass
        else:
            return True
    for form in FOREIGN_TIMES:
        try:
            datetime.strptime(bare, form)
        except ValueError:
            continue
        return True
    return False


def refuse_data_as_header(path: Path, line: int, header: Sequence[str]) -> None:
    """A DataError where the header row's first cell reads as a time (ISO 8601, or a
    count of seconds from 10^9 on: 2001): the file has no header row, and its first row
    of data named the series (``1`` and ``2`` for the values 1 and 2), its values lost.
    A smaller whole number is let be: a name as likely as a time."""
    cell = header[0] if header else ""
    try:
        time_ms(cell)
    except ValueError:
        return
    whole = cell.partition(".")[0]
    if _digits(whole) and int(whole) < FRACTION_FROM:
        return
    raise DataError(
        f"{path}:{line}: the first row begins with a time ({cell!r}), not a column name: the "
        "file needs a header row naming its columns (time,<series>,...)"
    )


def unnamed_columns(header: Sequence[str]) -> list[int]:
    """The columns past the second that ``header`` leaves unnamed, for
    :func:`refuse_unnamed_values`."""
    return [k for k in range(2, len(header)) if not header[k]]


def refuse_unnamed_values(path: Path, line: int, row: Sequence[str], unnamed: list[int]) -> None:
    """A DataError where ``row`` holds digits in a column the header leaves unnamed
    (``unnamed``, from :func:`unnamed_columns`), right after a number: a decimal comma,
    unquoted, in a file whose header has a spare column (``time,flow,`` as a spreadsheet
    may end it: 100,59 read as flow 100 and 59 in the unnamed column), the decimals
    silently lost. Anything else there (notes) is let be: such a column is no series."""
    for k in unnamed:
        if k < len(row) and _digits(cell := row[k].strip()) and _number(row[k - 1]):
            raise DataError(
                f"{path}:{line}: {row[k - 1].strip()},{cell} is a number and digits in a column "
                "the header leaves unnamed: an unquoted decimal comma? Quote a cell that "
                "holds a comma, or give the column a name (--column then picks the series)"
            )


def _number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # not '²', a digit int() refuses


# The most characters one line of a CSV file may hold, its line end included: a line is
# read whole before the csv module sees it, so without a bound a file with no line end
# (csv:/dev/zero) would be read until memory ran out.
LINE_MAX = 1 << 24


def csv_rows(path: Path, f: TextIO) -> Iterator[tuple[int, list[str]]]:
    """The rows of the open CSV file ``f``, the header first, each with its line number.
    A DataError naming the line where the quoting is broken (where a quote is never
    closed, the first line of its row: the rest of the file was read as one cell), where
    a row has more cells than the header (an unquoted comma: ``12,5`` for 12.5 would be
    read as 12) and where a line is longer than LINE_MAX. A shorter row's missing cells
    are gaps."""
    rows = csv.reader(_lines(path, f), strict=True)
    width = start = 0  # start: the first line of the row being read
    fix = ""  # what a row wider than the header is told
    try:
        for row in rows:
            if not width:
                if not any(cell.strip() for cell in row):
                    continue  # a blank line before the header: the header is what follows
                width = len(row)
                row = [cell.strip() for cell in row]  # as the cells are read: ` a` is `a`
                # One column named `time;flow`: semicolons, with decimal commas (a
                # European spreadsheet's) were told to quote a comma.
                fix = separated(row[0]) if width == 1 else "quote a cell that holds a comma"
            elif len(row) > width:
                raise DataError(
                    f"{path}:{rows.line_num}: {len(row)} cells where the header has {width}; {fix}"
                )
            yield rows.line_num, row
            start = rows.line_num
    except csv.Error as e:  # broken quoting, or a cell past the csv module's limit
        if "unexpected end of data" in str(e):
            raise DataError(
                f"{path}:{start + 1}: a quote opened in this row is never closed (the rest of "
                "the file was read as one cell)"
            ) from None
        raise DataError(f"{path}:{rows.line_num}: {e}") from None


def unreadable(path: Path, e: OSError | UnicodeDecodeError) -> DataError:
    """The error for a file that could not be read; for one that is no UTF-8 text, the
    line and byte where it stops being (Python's position is within the block it was
    decoding: a byte 328,911 in was "position 1231"), where the file can be read again."""
    if not isinstance(e, UnicodeDecodeError):
        return DataError(f"cannot read {path}: {e.strerror or e}")
    where = _not_utf8_at(path)
    if where is None:
        return DataError(f"cannot read {path}: not UTF-8 text ({e.reason}); save it as UTF-8")
    line, offset, byte = where
    return DataError(
        f"{path}:{line}: not UTF-8 text (byte 0x{byte:02x}, {offset:,} bytes in): save the "
        'file as UTF-8 (a spreadsheet\'s "CSV UTF-8")'
    )


def _not_utf8_at(path: Path) -> tuple[int, int, int] | None:
    """The line, offset and value of the first byte of ``path`` that is no UTF-8; None
    where it is no file to read again (a pipe: opened again, it waited for a writer)."""
    if not path.is_file():
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = newlines = 0  # bytes handed to the decoder so far, and the line ends in them
    try:
        with path.open("rb") as f:
            while True:
                block = f.read(1 << 16)
                held = decoder.getstate()[0]  # the start of a character cut by the block
                try:
                    decoder.decode(block, final=not block)  # at the end: one cut short
                except UnicodeDecodeError as e:
                    data = held + block
                    newlines += data[len(held) : max(e.start, len(held))].count(b"\n")
                    return newlines + 1, done - len(held) + e.start, data[e.start]
                if not block:
                    return None
                done += len(block)
                newlines += block.count(b"\n")
    except OSError:
        return None


def _lines(path: Path, f: TextIO) -> Iterator[str]:
    """The lines of ``f``, each read no further than LINE_MAX characters."""
    for number, line in enumerate(iter(lambda: f.readline(LINE_MAX + 1), ""), 1):
        if len(line) > LINE_MAX:
            raise DataError(
                f"{path}:{number}: no line end in this line's first {LINE_MAX:,} characters "
                "(a CSV file ends each row with one)"
            )
        yield line


class _Clock:
    """A file's time column: the first, or the one ``name``d (whose rows must each hold a
    time: a first one that is none is an error, not a file without times)."""

    def __init__(self, path: Path, header: Sequence[str], name: str | None) -> None:
        self.path, self.given = path, name is not None
        self.at = column_index(path, header, name) if name is not None else 0
        self.named = f"column {header[self.at]!r}" if self.given else f"the first, {header[0]!r},"
        self.hint = f" (column {header[self.at]!r} is the time)" if self.given else FIRST_IS_TIME

    def read(
        self,
        rows: list[tuple[int, list[str]]],
        *,
        at: int | None = None,
        series: str = "",
        required: bool = False,
    ) -> tuple[float | None, list[int]]:
        """:func:`_time_step` of ``rows``, their times at ``at`` (default: the column's);
        those of a long file's ``series``, said so where they run back."""
        return _time_step(
            self.path,
            rows,
            at=self.at if at is None else at,
            whose=f"series {series}'s time before" if series else "",
            hint=self.hint,
            # A time on most rows: a long file read as a wide one, maybe.
            again_hint=f" (series {series})" if series else self.hint + LONG_HINT,
            required=self.given or required,
        )


FIRST_IS_TIME = " (the first column is the time)"


def _in_range(path: Path, line: int, text: str, ms: int) -> None:
    if abs(ms) > TIME_MS_MAX:
        raise DataError(
            f"{path}:{line}: time {text!r} is out of range: at most {TIME_MS_MAX + 1:.0e} "
            "ms from the epoch, as the worker takes a ts"
        )


def _time_step(
    path: Path,
    rows: list[tuple[int, list[str]]],
    *,
    at: int = 0,
    whose: str = "",
    hint: str = FIRST_IS_TIME,
    again_hint: str = FIRST_IS_TIME,
    required: bool = False,
) -> tuple[float | None, list[int]]:
    """The median step of column ``at`` in seconds, when it holds times as
    :func:`time_ms` reads them (as ``replay`` does), and each row's time in ms; None and
    no times where the first row's is no time (a file with no time column), unless it is
    a time in a form not read (:func:`foreign_time`: taken for none, such a file trained
    a model with no period) or the time is ``required``. Past that first row, a time that
    cannot be read, or that comes before the row before's (``whose``: a long file's
    series' time before), is a DataError naming its line: the rows of a file
    newest first, or sorted by another column, would train a model on time run
    backwards or shuffled. A time twice is a reading kept as it came (the sea temperature
    in ``data/`` has one), but not on most rows: a step of 0 is no time step, and the
    model would take two readings an hour for one series. ``hint`` ends the errors of a
    time run back and ``again_hint`` that of a time on most rows."""
    times: list[int] = []
    repeat = 0  # the first line whose time is the row before's
    again = before = ""  # that line's time as written, and the row before's
    last = ""  # the time of the row before, as written
    for line, row in rows:
        text = row[at].strip() if at < len(row) else ""
        try:
            ms = time_ms(text)
        except ValueError:
            if not times and not foreign_time(text) and not required:
                return None, []
            raise unread_time(path, line, text) from None
        _in_range(path, line, text, ms)
        if times and ms < times[-1]:
            after = f"{last!r}, {whose}" if whose else "the row before's"
            raise DataError(
                f"{path}:{line}: time {text!r} is before {after}: the rows must run forward "
                f"in time{hint}"
            )
        if not repeat and times and ms == times[-1]:
            repeat, again = line, text
        before = before if repeat else text
        last = text
        times.append(ms)
    steps = [(b - a) / 1000 for a, b in itertools.pairwise(times)]  # ints: no overflow
    step = float(np.median(steps)) if steps else None
    if step == 0 and again != before:  # µs or ns, floored to the ms
        raise DataError(
            f"{path}:{repeat}: time {again!r} is in the same ms as the row before's "
            f"({before!r}), as on most rows: times are kept to the ms, so a series needs "
            "readings at least 1 ms apart"
        )
    if step == 0:
        raise DataError(
            f"{path}:{repeat}: the time of the row before, as on most rows: a series needs "
            f"one row a time{again_hint}"
        )
    return step, times


def _column(
    path: Path, rows: list[tuple[int, list[str]]], index: int, name: str
) -> tuple[np.ndarray, list[int]]:
    """The values of column ``index``, and the positions in ``rows`` of the rows that
    hold them (an empty cell is a gap)."""
    values: list[float] = []
    kept: list[int] = []
    for position, (line, row) in enumerate(rows):
        cell = row[index].strip() if index < len(row) else ""
        if not cell:
            continue
        kept.append(position)
        try:
            # float() reads '1_0', and fullwidth digits, as 10; the worker refuses them
            if "_" in cell or not cell.isascii():
                raise ValueError(cell)
            value = float(cell)
        except ValueError:
            raise NotANumberError(
                f"{path}:{line}: {name}={cell!r} is not a number", cell, first=not values
            ) from None
        if not math.isfinite(value):
            raise DataError(f"{path}:{line}: {name}={cell!r} is not finite")
        if abs(value) > VALUE_MAX:  # a model trained on it learned nothing, in NaNs
            raise DataError(
                f"{path}:{line}: {name}={cell!r} is out of range (beyond +-{VALUE_MAX:g})"
            )
        values.append(value)
    if not values:
        raise DataError(f"{path}: column {name!r} has no values")
    return np.asarray(values, dtype=np.float64), kept
