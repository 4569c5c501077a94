"""The stream contract: what a valid input entry is, and what a forecast entry holds.

Pure functions over the raw bytes redis-py hands us; no I/O. A bad entry yields a
short reason, which the worker writes to the dead stream with the original fields.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

SERIES_MAX_CHARS = 128
_SERIES = re.compile(rb"[A-Za-z0-9_.:/-]{1,128}")
# Decimal numbers only: Python's float() would also take "nan", "1_000" and " 1 ".
_NUMBER = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_VALUE_MAX_CHARS = 64
_INT = re.compile(rb"\d{1,16}")  # ms since the epoch; 16 digits is past year 300,000

Fields = dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Reading:
    series: str
    value: float
    ts: int  # ms since the epoch


def entry_ms(entry_id: bytes) -> int:
    """The milliseconds part of a stream entry id (b"1700000000000-3")."""
    return int(entry_id.split(b"-", 1)[0])


def parse(entry_id: bytes, fields: Fields) -> Reading | str:
    """A valid reading, or a short reason why the entry is not one."""
    series = fields.get(b"series")
    if series is None:
        return "missing field: series"
    if not _SERIES.fullmatch(series):
        return _bad_series(series)
    value = fields.get(b"value")
    if value is None:
        return "missing field: value"
    if len(value) > _VALUE_MAX_CHARS or not _NUMBER.fullmatch(value):
        return f"value is not a decimal number: {_show(value)}"
    number = float(value)
    if not math.isfinite(number):
        return f"value is out of range: {_show(value)}"
    ts = fields.get(b"ts")
    if ts is None:
        return Reading(series.decode("ascii"), number, entry_ms(entry_id))
    if not _INT.fullmatch(ts):
        return f"ts is not a whole number of ms since the epoch: {_show(ts)}"
    return Reading(series.decode("ascii"), number, int(ts))


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
    """A field's value for an error message: short, printable, never a decode error."""
    text = raw.decode("utf-8", errors="backslashreplace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def dead_fields(fields: Fields, src: bytes, error: str) -> Fields:
    """The original fields, unchanged, plus where they came from and what was wrong."""
    return {**fields, b"src": src, b"error": error.encode()}


def json_rows(matrix: np.ndarray, decimals: int | None = None) -> list[str]:
    """Each row of a 2-D array as a JSON list, formatted in one call for the batch.

    ``decimals`` rounds first (attention weights need 7 decimals, not 17 digits);
    None keeps float64's shortest round-trip form, so a value reads back exactly.
    """
    if matrix.shape[0] == 0:
        return []
    values = matrix.astype(np.float64, copy=False)
    if decimals is not None:
        values = np.round(values, decimals)
    text = json.dumps(values.tolist())  # "[[a, b], [c, d]]"
    return [f"[{row}]" for row in text[2:-2].split("], [")]


def forecast_fields(
    series: str, src: bytes, ts: int, yhat: str, attn: str, model: str
) -> tuple[bytes, ...]:
    """A forecast entry's fields and values, flat, in XADD's argument order."""
    return (
        b"series", series.encode(),
        b"src", src,
        b"ts", b"%d" % ts,
        b"yhat", yhat.encode(),
        b"attn", attn.encode(),
        b"model", model.encode(),
    )  # fmt: skip


def reason_kind(reason: str) -> str:
    """A dead-letter reason's first words, a bounded label for the metrics."""
    words = reason.split(":", 1)[0].split()
    if words[:2] == ["missing", "field"]:
        return "missing_" + reason.split(":", 1)[1].strip()
    return words[0] if words else "unknown"
