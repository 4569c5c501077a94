"""The stream contract: what a valid input entry is, and what a forecast entry holds.

Pure functions over the raw bytes redis-py hands us; no I/O. A bad entry yields a
short reason, which the worker writes to the dead stream with the original fields.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np

from attnlstm.data import VALUE_MAX

SERIES_MAX_CHARS = 128
_SERIES = re.compile(rb"[A-Za-z0-9_.:/-]{1,128}")
# Decimal numbers only. Python's float() also takes "nan", "inf", "1_000" and " 1 ";
# with these characters alone, what float() takes is a decimal number.
_NUMBER_CHARS = b"0123456789+-.eE"
_VALUE_MAX_CHARS = 64
_INT = re.compile(rb"\d{1,16}")  # ms since the epoch; 16 digits is past year 300,000
# The largest milliseconds or sequence number of an entry id the worker takes. Redis allows
# two unsigned 64-bit numbers, but the windows hold ids and entry times as int64: past
# this, a conversion raised OverflowError, in the live path and in every restore after.
ID_PART_MAX = 2**63 - 1

Fields = dict[bytes, bytes]


class Repeated(dict[bytes, bytes]):
    """An entry's fields where a name came more than once (XADD takes that): the last
    value of each, as a dict holds them, and every pair as it came (``pairs``), for the
    dead letter. :func:`parse` refuses it: which ``value`` was meant is anyone's guess."""

    def __init__(self, flat: list[bytes]) -> None:
        pairs = iter(flat)
        self.pairs = list(zip(pairs, pairs, strict=True))
        super().__init__(self.pairs)

    def repeated(self) -> list[bytes]:
        """The names given more than once, in the order they first came."""
        counts = Counter(name for name, _ in self.pairs)
        return [name for name in self if counts[name] > 1]


@dataclass(frozen=True, slots=True)
class Reading:
    series: str
    value: float
    ts: int  # ms since the epoch


def entry_ms(entry_id: bytes) -> int:
    """The milliseconds part of a stream entry id (b"1700000000000-3")."""
    return int(entry_id.split(b"-", 1)[0])


def parse(
    entry_id: bytes, fields: Fields, series_ids: dict[bytes, str] | None = None
) -> Reading | str:
    """A valid reading, or a short reason why the entry is not one.

    ``series_ids`` maps series ids already validated to their names, and learns new
    ones: a dict lookup instead of a regex for every entry of a known series.
    """
    if len(entry_id) > 20 and max(map(int, entry_id.split(b"-"))) > ID_PART_MAX:
        # (a part past ID_PART_MAX has 19 digits or more: shorter ids need no look)
        return f"id has a part past 2**63-1 (the worker keeps ids as int64): {_show(entry_id)}"
    if isinstance(fields, Repeated):
        return "field given more than once: " + ", ".join(map(_show, fields.repeated()))
    series = fields.get(b"series")
    if series is None:
        return "missing field: series"
    name = None if series_ids is None else series_ids.get(series)
    if name is None:
        if not _SERIES.fullmatch(series):
            return _bad_series(series)
        name = series.decode("ascii")
        if series_ids is not None:
            series_ids[series] = name
    number = _number(fields.get(b"value"))
    if isinstance(number, str):
        return number
    ts = fields.get(b"ts")
    if ts is None:
        return Reading(name, number, entry_ms(entry_id))
    if not _INT.fullmatch(ts):
        return f"ts is not a whole number of ms since the epoch: {_show(ts)}"
    return Reading(name, number, int(ts))


def value_refused(value: bytes) -> str | None:
    """Why the worker refuses an entry for its ``value`` alone (dead-letters it), or None."""
    number = _number(value)
    return number if isinstance(number, str) else None


def _number(value: bytes | None) -> float | str:
    """The value, a decimal number within +-VALUE_MAX; or why it is not one."""
    if value is None:
        return "missing field: value"
    number = _decimal(value)
    if number is None:
        return _not_a_number(value)
    if not -VALUE_MAX <= number <= VALUE_MAX:  # inf too
        return f"value is out of range (beyond +-{VALUE_MAX:g}): {_show(value)}"
    return number


def _decimal(value: bytes) -> float | None:
    if len(value) > _VALUE_MAX_CHARS or value.translate(None, _NUMBER_CHARS):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _not_a_number(value: bytes) -> str:
    if len(value) > _VALUE_MAX_CHARS:
        return f"value is longer than {_VALUE_MAX_CHARS} characters: {_show(value)}"
    return f"value is not a decimal number: {_show(value)}"


def _bad_series(series: bytes) -> str:
    if not series:
        return "series is empty"
    if len(series) > SERIES_MAX_CHARS:
        return f"series is longer than {SERIES_MAX_CHARS} characters"
    try:
        series.decode("utf-8")
    except UnicodeDecodeError:
        return "series is not UTF-8"
    return f"series has characters outside [A-Za-z0-9_.:/-]: {_show(series)}"


def _show(raw: bytes, limit: int = 40) -> str:
    """A field's value for an error message: short, printable, never a decode error. Not
    UTF-8, as bytes (``b'1\\xff'``): decoded with backslashes, its repr doubled them, as
    if the value held a backslash."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return repr(raw[:limit]) + "..." * (len(raw) > limit)
    return repr(text if len(text) <= limit else text[:limit] + "...")


def dead_fields(fields: Fields, src: bytes, error: str) -> Fields:
    """The original fields, plus where they came from and what was wrong, bounded: a
    name or value longer than DEAD_MAX_BYTES, its first bytes, with the original
    length of every value cut short in ``truncated`` (a JSON object, by the name kept);
    past DEAD_MAX_FIELDS fields or DEAD_MAX_TOTAL bytes, the first ones and
    ``fields_dropped`` (how many not). An original field of one of these names, or of
    ``src`` or ``error``, is kept as ``original:<name>``; a name kept already (given
    twice, or the same in its first bytes) as ``<name>#2``, ``<name>#3``, ..."""
    items = fields.pairs if isinstance(fields, Repeated) else list(fields.items())
    kept: Fields = {}
    suffixes: dict[bytes, int] = {}  # the last #k given each name
    cut: dict[str, int] = {}
    size = taken = 0
    for name, value in items:
        if taken == DEAD_MAX_FIELDS or size >= DEAD_MAX_TOTAL:
            break
        taken += 1
        key = name[:DEAD_MAX_BYTES]
        key = b"original:" + key if key in _DEAD_OWN else key
        stored = _unique(key, kept, suffixes)
        kept[stored] = value[:DEAD_MAX_BYTES]
        size += min(len(name), DEAD_MAX_BYTES) + min(len(value), DEAD_MAX_BYTES)
        if len(name) > DEAD_MAX_BYTES or len(value) > DEAD_MAX_BYTES:
            shown = stored.decode(errors="backslashreplace")
            cut[shown] = len(value)
            size += len(json.dumps({shown: len(value)}))  # its record in `truncated`
    if taken < len(items):
        kept[b"fields_dropped"] = b"%d" % (len(items) - taken)
    if cut:
        kept[b"truncated"] = json.dumps(cut).encode()
    return {**kept, b"src": src, b"error": error.encode()}


def _unique(key: bytes, kept: Fields, suffixes: dict[bytes, int]) -> bytes:
    """``key``, or where ``kept`` has it, the first of ``key#2``, ``key#3``, ... it has
    not, going on from the last one ``suffixes`` gave ``key``."""
    name, k = key, suffixes.get(key, 1)
    while name in kept:
        k += 1
        name = b"%s#%d" % (key, k)
    suffixes[key] = k
    return name


def _digit_table(width: int) -> np.ndarray:
    """ASCII digits of 0 .. 10**width - 1, zero-padded, one item of ``width`` bytes each:
    ``np.take`` of such items into a byte array's ``width``-byte slices is several times
    faster than indexing a (10**width, width) table. Widths 2 and 4: items of 3 bytes
    copy 3.5x slower than items of 4."""
    numbers = np.arange(10**width)[:, None] // 10 ** np.arange(width - 1, -1, -1) % 10
    return (numbers + ord("0")).astype(np.uint8).view(f"V{width}").ravel()


_TWO, _FOUR = _digit_table(2), _digit_table(4)
_POW10_LOW = 330  # the table of powers of ten starts at 10**-330 (0.0)
with np.errstate(over="ignore"):  # 10**309 and up are inf, and never looked up
    _POW10 = 10.0 ** np.arange(-_POW10_LOW, 310)  # _POW10[e + _POW10_LOW] == 10.0**e
# An exponent's sign and three digits, "-330" to "+309": _EXPONENTS[e + _POW10_LOW]; and
# for a row whose exponents all have two digits, "e-99" to "e+99": _SHORT[e + 99].
_EXPONENTS = np.array([b"%+04d" % e for e in range(-_POW10_LOW, 310)], dtype="S4").view("V4")
_SHORT = np.array([b"e%+03d" % e for e in range(-99, 100)], dtype="S4").view("V4")
_LOG10_2 = (78913, 18)  # floor(e * log10(2)) == (e * 78913) >> 18 for every float exponent


def _put(cells: np.ndarray, at: int, table: np.ndarray, index: np.ndarray) -> None:
    """Write ``table[index]`` (items of k bytes) into ``cells[..., at : at + k]``."""
    k = table.dtype.itemsize
    cells[..., at : at + k].view(table.dtype)[..., 0] = np.take(table, index)


def _split(value: np.ndarray, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """``divmod(value, unit)`` of non-negative integers: numpy divides by a scalar several
    times faster with ``//`` than with divmod."""
    high = value // unit
    return high, value - high * unit


def _rows(cell: bytes, n: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A buffer for ``n`` JSON lists of ``width`` numbers, each list a copy of ``cell`` (a
    template ending in ``,``) ``width`` times, in ``[`` and ``]``; and its (n, width,
    cell) view to fill in (the last cell's ``,`` is the ``]``)."""
    row = b"[" + cell * width
    buffer = np.empty((n, len(row)), dtype=np.uint8)
    buffer[:] = np.frombuffer(row[:-1] + b"]", dtype=np.uint8)
    return buffer, buffer[:, 1:].reshape(n, width, len(cell))


def _lists(buffer: np.ndarray) -> list[bytes]:
    """The filled buffer's rows, as numpy's fixed-width bytes items (which drop trailing
    NULs only: a row ends in ``]``), in half the time of slicing one bytes object."""
    return cast(list[bytes], buffer.view(f"S{buffer.shape[1]}").ravel().tolist())


def fraction_rows(matrix: np.ndarray) -> list[bytes]:
    """Each row of an array of values in [0, 1] (attention weights) as a JSON list of
    7-decimal fixed-point numbers, ``0.0500001``.

    Built as one array of ASCII bytes for the whole batch, from digit tables: json.dumps
    spends most of its time in float repr, and weights need 7 decimals, not 17 digits.
    """
    n, width = matrix.shape
    if n == 0:
        return []
    scaled = np.rint(np.clip(matrix.astype(np.float64), 0.0, 1.0) * 1e7).astype(np.int64)
    whole, fraction = _split(scaled, 10_000_000)
    first, fraction = _split(fraction, 1_000_000)
    high, low = _split(fraction, 10_000)
    buffer, cells = _rows(b"0.0000000,", n, width)
    cells[..., 0] += whole.astype(np.uint8)
    cells[..., 2] += first.astype(np.uint8)
    _put(cells, 3, _TWO, high)
    _put(cells, 5, _FOUR, low)
    return _lists(buffer)


def decimal_rows(
    matrix: np.ndarray, digits: int, rounding: Literal["nearest", "down", "up"] = "nearest"
) -> list[bytes]:
    """Each row of a 2-D array of finite values as a JSON list of numbers with ``digits``
    (odd, at least 3) significant digits in scientific form, of one width in a row:
    `` 1.234567e+04``, or ``-1.234567e+104`` in a row where an exponent has three digits.
    Rounded to the nearest such number, or ``down`` (toward minus infinity) or ``up``:
    an interval's bounds are rounded outward, so that it still holds its forecast.

    Built like :func:`fraction_rows`, for the whole batch at once: a day-ahead forecast
    with its bounds is 144 numbers, and float repr for each would cost more than the
    model. Each value reads back within half a unit of its last digit, subnormal ones
    included, give or take the scaling's own float rounding (of 200,000 random values at
    13 digits, 49 read back up to 1.0033 half-units away).
    """
    n = matrix.shape[0]
    if n == 0:
        return []
    if digits < 3 or digits % 2 == 0:
        raise ValueError(f"digits must be odd, at least 3; got {digits}")
    a = np.abs(matrix, dtype=np.float64)
    nonzero = a > 0
    # Below 1e-300, 10**exp would be subnormal and lose digits: those are scaled first.
    tiny = nonzero & (a < 1e-300)
    if tiny.any():
        a[tiny] *= 1e300
    exp = _exponent(a)
    exp[~nonzero] = 0
    unit = 10.0 ** (digits - 1)
    mant = _round(a / _POW10[exp + _POW10_LOW] * unit, matrix, rounding)
    if rounding != "nearest":
        _outward(a, matrix, mant, exp, digits, rounding)
    # Rounding up to the next power of ten, or a step outward to it, leaves it a digit long.
    wrong = mant >= 10**digits
    exp[wrong] += 1
    mant[wrong] = 10 ** (digits - 1)
    exp[tiny] -= 300
    # Two exponent digits, "e+04", for a row whose exponents all have two; three for
    # the rest: a row's bytes do not depend on the rows beside it.
    long = (np.abs(exp) > 99).any(axis=1)
    if not long.any():
        return _scientific(matrix < 0, mant, exp, digits, wide=False)
    out: list[bytes] = [b""] * n
    for wide in (False, True):
        rows = np.flatnonzero(long == wide)
        if rows.size:
            lists = _scientific(matrix[rows] < 0, mant[rows], exp[rows], digits, wide)
            for k, text in zip(rows.tolist(), lists, strict=True):
                out[k] = text
    return out


def _round(
    scaled: np.ndarray, matrix: np.ndarray, rounding: Literal["nearest", "down", "up"]
) -> np.ndarray:
    """The integer mantissas of ``scaled`` (magnitudes of ``matrix``'s values, scaled),
    rounded as ``rounding`` says of the signed values."""
    rounded: np.ndarray
    if rounding == "nearest":
        rounded = np.rint(scaled)
    else:
        signed = np.copysign(scaled, matrix)
        rounded = np.abs(np.floor(signed) if rounding == "down" else np.ceil(signed))
    return rounded.astype(np.int64)


def _outward(
    a: np.ndarray,
    matrix: np.ndarray,
    mant: np.ndarray,
    exp: np.ndarray,
    digits: int,
    rounding: Literal["down", "up"],
) -> None:
    """Step one unit outward, in place, each decimal ``mant`` * 10 ** (``exp`` - digits +
    1) that a JSON reader reads back inward of its value (magnitude ``a``).

    The mantissas come from a division by a power of ten, and both are rounded: a value
    just past a decimal (-0.7566898000000001) can divide to exactly it, which floor then
    keeps, a unit inward (about one in 25 of the values just past a 7-digit decimal did).
    The mantissa times or over the power of ten its last digit counts is what a reader
    reads where that power is exact, up to 10**22. Beyond, it is within an ulp or two of
    it: there, a decimal that close to its value is parsed, as few are. Values below
    1e-300 were scaled by 1e300, itself rounded, and may still come out a unit inward.
    """
    power = exp - (digits - 1)
    size = np.abs(power)
    ten = _POW10.take(np.minimum(size, 308) + _POW10_LOW)  # 10 ** |power|
    back = mant / ten
    large = power >= 0
    if large.any():
        back[large] = mant[large] * ten[large]
    back -= a  # > 0 where the decimal's magnitude is above the value's
    far = size > 22
    if far.any():
        for i in np.flatnonzero(far & (np.abs(back) <= a * 2**-50)).tolist():
            back.flat[i] = float(f"{mant.flat[i]}e{power.flat[i]}") - a.flat[i]
    np.negative(back, out=back, where=matrix < 0)  # > 0 where the decimal is above the value
    inward = back > 0 if rounding == "down" else back < 0
    if not inward.any():
        return
    away = (matrix[inward] < 0) == (rounding == "down")  # the magnitude grows
    mant[inward] += np.where(away, 1, -1)
    # A step down from a power of ten (where the table's power and the reader's differ
    # by an ulp) leaves it a digit short.
    shorter = inward & (mant < 10 ** (digits - 1))
    mant[shorter], exp[shorter] = 10**digits - 1, exp[shorter] - 1


def _scientific(
    negative: np.ndarray, mant: np.ndarray, exp: np.ndarray, digits: int, wide: bool
) -> list[bytes]:
    """The rows of numbers ``mant`` (``digits`` digits) times 10 ** (``exp`` - digits +
    1), negative where ``negative``, with three exponent digits if ``wide``, else two."""
    n, width = mant.shape
    tail = b"e+000," if wide else b"e+00,"
    buffer, cells = _rows(b" 0." + b"0" * (digits - 1) + tail, n, width)
    if negative.any():
        cells[..., 0][negative] = ord("-")
    first, rest = _split(mant, 10 ** (digits - 1))
    cells[..., 1] += first.astype(np.uint8)
    at = digits + 2  # past the last of the fraction's digits, written four at a time
    while at - 4 >= 3:
        rest, four = _split(rest, 10_000)
        at -= 4
        _put(cells, at, _FOUR, four)
    if at > 3:  # two left
        _put(cells, 3, _TWO, rest)
    if wide:
        _put(cells, digits + 3, _EXPONENTS, exp + _POW10_LOW)
    else:
        _put(cells, digits + 2, _SHORT, exp + 99)
    return _lists(buffer)


def _exponent(a: np.ndarray) -> np.ndarray:
    """floor(log10(a)) of positive normal float64 values (anything for 0), from their
    binary exponents (their bits 52-62) and a table of powers of ten, in place: log10,
    frexp and fresh arrays cost more than the rest."""
    multiply, shift = _LOG10_2
    exp = np.ascontiguousarray(a).view(np.int64) >> 52
    exp -= 1023
    exp *= multiply
    exp >>= shift  # at most one too small
    exp += a >= _POW10.take(exp + (_POW10_LOW + 1))
    return exp


# In this order; lo and hi came after the first six, which is all that older entries have.
FORECAST_FIELDS = (b"series", b"src", b"ts", b"yhat", b"attn", b"model", b"lo", b"hi")
ANOMALY_FIELDS = (b"series", b"src", b"ts", b"value", b"yhat", b"lo", b"hi", b"score", b"model")
YHAT_DIGITS = 13  # significant digits of a published forecast
BOUND_DIGITS = 7  # and of its interval's bounds
DEAD_MAX_FIELDS = 1_000  # fields copied into a dead letter, at most
DEAD_MAX_BYTES = 1_024  # of a field's name, and of its value, copied into a dead letter
# Bytes of the fields copied into a dead letter (and of their record in `truncated`), at
# most, give or take one field: a batch's dead letters are written in one call, which
# Redis refuses past its client-query-buffer-limit (1 GiB), and a batch whose call is
# refused would be retried forever. 1,024 of them (the default max_batch) make 64 MiB.
DEAD_MAX_TOTAL = 64 * 1_024
_DEAD_OWN = frozenset((b"src", b"error", b"fields_dropped", b"truncated"))  # its own fields


def forecast_values(
    series: str, src: bytes, ts: int, yhat: bytes, attn: bytes, model: bytes, lo: bytes, hi: bytes
) -> tuple[bytes, ...]:
    """A forecast entry's values, in the order of FORECAST_FIELDS."""
    return (series.encode(), src, b"%d" % ts, yhat, attn, model, lo, hi)


def anomaly_values(
    series: str,
    src: bytes,
    ts: int,
    value: bytes,
    expected: tuple[bytes, bytes, bytes],
    score: float,
    model: bytes,
) -> tuple[bytes, ...]:
    """An anomaly event's values, in the order of ANOMALY_FIELDS: the value as it came,
    the one-step forecast and interval it fell outside (``expected``, from
    :func:`expected_numbers`), and its score, with 3 decimals, rounded up: rounded to
    the nearest, a score of 5.0004 at a threshold of 5.0004 read 5.000, under it."""
    text = b"%.3f" % score
    if float(text) < score:
        text = b"%.3f" % (score + 0.0005)
    return (series.encode(), src, b"%d" % ts, value, *expected, text, model)


def expected_numbers(expected: np.ndarray) -> list[tuple[bytes, bytes, bytes]]:
    """Each row of (one-step forecast, lo, hi) as the forecast entry that made them
    carries its first step: the forecast to YHAT_DIGITS, the bounds to BOUND_DIGITS,
    rounded outward. As Python writes each float, an event's bounds were not its
    forecast's, and a value between the two was an event outside an interval that
    the forecast entry gave as holding it."""
    columns = (
        decimal_rows(expected[:, :1], YHAT_DIGITS),
        decimal_rows(expected[:, 1:2], BOUND_DIGITS, "down"),
        decimal_rows(expected[:, 2:3], BOUND_DIGITS, "up"),
    )
    return [
        (yhat.strip(b"[ ]"), lo.strip(b"[ ]"), hi.strip(b"[ ]"))
        for yhat, lo, hi in zip(*columns, strict=True)
    ]


# A dead-letter reason's label for the metrics, by how the reason starts: the first
# that fits. Reasons that start otherwise are labelled by their first word.
_REASON_KINDS = (
    ("series limit reached", "series_limit"),
    ("the worker stopped while handling it", "crashed_handling"),
    ("the model's forecast is not finite", "forecast_not_finite"),
    ("field given more than once", "repeated_field"),
)


# Every label reason_kind gives a reason the worker writes (the metric starts each at 0):
# those of valid entries it could not serve, and those of bad input.
UNSERVED_KINDS = ("series_limit", "crashed_handling", "forecast_not_finite", "partition")
DEAD_KINDS = (
    "value",
    "series",
    "ts",
    "id",
    "repeated_field",
    "missing_series",
    "missing_value",
    *UNSERVED_KINDS,
)


def reason_kind(reason: str) -> str:
    """A dead-letter reason's label for the metrics, from a bounded set: ``value``,
    ``series``, ``ts``, ``id``, ``repeated_field`` and ``missing_<field>`` for bad input, and
    the worker's own."""
    for start, kind in _REASON_KINDS:
        if reason.startswith(start):
            return kind
    words = reason.split(":", 1)[0].split()
    if words[:2] == ["missing", "field"]:
        return "missing_" + reason.split(":", 1)[1].strip()
    return words[0] if words else "unknown"
