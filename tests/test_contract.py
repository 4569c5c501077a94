"""The stream contract: which entries are readings, why the others are not, and the
forecast entry's fields."""

from __future__ import annotations

import json
import math
import re
from typing import Literal

import numpy as np
import pytest

from worker.contract import (
    ANOMALY_FIELDS,
    BOUND_DIGITS,
    DEAD_KINDS,
    DEAD_MAX_BYTES,
    DEAD_MAX_FIELDS,
    DEAD_MAX_TOTAL,
    FORECAST_FIELDS,
    YHAT_DIGITS,
    Reading,
    anomaly_values,
    dead_fields,
    decimal_rows,
    entry_ms,
    expected_numbers,
    forecast_values,
    fraction_rows,
    parse,
    reason_kind,
)

ID = b"1700000000123-4"
ID_MS = 1_700_000_000_123


def _reason(fields: dict[bytes, bytes]) -> str:
    result = parse(ID, fields)
    assert isinstance(result, str), f"{fields!r} parsed as {result!r}"
    return result


def test_entry_ms_is_the_id_before_the_dash() -> None:
    assert entry_ms(ID) == 1_700_000_000_123
    assert entry_ms(b"5-0") == 5


def test_valid_entry_with_ts() -> None:
    fields = {b"series": b"plant-1/boiler:temp_2.c", b"value": b"21.5", b"ts": b"1699999999000"}
    assert parse(ID, fields) == Reading("plant-1/boiler:temp_2.c", 21.5, 1_699_999_999_000)


def test_ts_defaults_to_the_entry_ids_milliseconds() -> None:
    assert parse(ID, {b"series": b"s", b"value": b"1"}) == Reading("s", 1.0, ID_MS)


def test_ts_of_sixteen_digits_is_accepted() -> None:
    result = parse(ID, {b"series": b"s", b"value": b"1", b"ts": b"9" * 16})
    assert isinstance(result, Reading)
    assert result.ts == 9_999_999_999_999_999


def test_other_fields_are_ignored() -> None:
    assert parse(ID, {b"series": b"s", b"value": b"2", b"unit": b"C"}) == Reading("s", 2.0, ID_MS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"1", 1.0),
        (b"-2.5", -2.5),
        (b"1e-3", 0.001),
        (b".5", 0.5),
        (b"+3.", 3.0),
        (b"0", 0.0),
        (b"-0.0", -0.0),
        (b"6.02E+23", 6.02e23),
        (b"0." + b"1" * 62, float("0." + "1" * 62)),  # 64 characters is the longest allowed
    ],
)
def test_decimal_values_parse_to_their_float(raw: bytes, expected: float) -> None:
    result = parse(ID, {b"series": b"s", b"value": raw})
    assert isinstance(result, Reading)
    assert result.value == expected


def test_series_of_128_characters_is_accepted() -> None:
    result = parse(ID, {b"series": b"a" * 128, b"value": b"1"})
    assert isinstance(result, Reading)
    assert result.series == "a" * 128


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({b"value": b"1"}, ["missing", "series"]),
        ({b"series": b"", b"value": b"1"}, ["series", "empty"]),
        ({b"series": b"a" * 129, b"value": b"1"}, ["series", "longer", "128"]),
        ({b"series": b"a b", b"value": b"1"}, ["series", "characters", "'a b'"]),
        ({b"series": "é".encode(), b"value": b"1"}, ["series", "characters"]),
        ({b"series": b"\xff\xfe", b"value": b"1"}, ["series", "UTF-8"]),
        ({b"series": b"s"}, ["missing", "value"]),
    ],
)
def test_bad_series_or_missing_field_gives_a_reason(
    fields: dict[bytes, bytes], words: list[str]
) -> None:
    reason = _reason(fields)
    for word in words:
        assert word in reason


@pytest.mark.parametrize(
    "raw", [b"abc", b"nan", b"NaN", b"inf", b"-Infinity", b"", b" 1", b"1 ", b"1_000", b"0x10"]
)
def test_value_that_is_not_a_decimal_number(raw: bytes) -> None:
    reason = _reason({b"series": b"s", b"value": raw})
    assert reason.startswith("value is not a decimal number")
    assert repr(raw.decode()) in reason  # the offending text, quoted


def test_value_longer_than_64_characters_is_refused_and_shown_shortened() -> None:
    reason = _reason({b"series": b"s", b"value": b"1" * 65})
    assert reason.startswith("value is longer than 64 characters")
    assert "1" * 40 + "..." in reason
    assert "1" * 41 not in reason


@pytest.mark.parametrize(
    "raw", [b"1e999", b"-1e999", b"2e308", b"1.7976931348623157e308", b"1e155", b"-1.1e30"]
)
def test_value_beyond_1e30_is_out_of_range(raw: bytes) -> None:
    reason = _reason({b"series": b"s", b"value": raw})
    assert reason == f"value is out of range (beyond +-1e+30): {raw.decode()!r}"


@pytest.mark.parametrize("raw", [b"1e30", b"-1e30", b"1e-300"])
def test_values_up_to_1e30_are_in_range(raw: bytes) -> None:
    result = parse(ID, {b"series": b"s", b"value": raw})
    assert isinstance(result, Reading)
    assert result.value == float(raw)


@pytest.mark.parametrize("raw", [b"yesterday", b"-5", b"1.5", b"1" * 17, b"", b"1e3", b" 5"])
def test_ts_that_is_not_whole_ms_since_the_epoch(raw: bytes) -> None:
    reason = _reason({b"series": b"s", b"value": b"1", b"ts": raw})
    assert reason.startswith("ts is not a whole number")
    assert repr(raw.decode()) in reason


def test_non_utf8_bytes_in_a_reason_never_raise() -> None:
    reason = _reason({b"series": b"s", b"value": b"\xff1"})
    assert reason == "value is not a decimal number: b'\\xff1'"  # one backslash, as bytes


def test_dead_fields_keep_the_original_and_add_src_and_error() -> None:
    fields = {b"series": b"s", b"value": b"abc", b"extra": b"\x00\xff"}
    dead = dead_fields(fields, b"1-0", "value is not a decimal number: 'abc'")
    assert dead == {**fields, b"src": b"1-0", b"error": b"value is not a decimal number: 'abc'"}
    assert fields == {b"series": b"s", b"value": b"abc", b"extra": b"\x00\xff"}  # not mutated


@pytest.mark.parametrize("digits", [3, 5, 7, 13])
def test_decimal_rows_read_back_within_half_a_unit_of_the_last_digit(digits: int) -> None:
    rng = np.random.default_rng(digits)
    matrix = rng.normal(size=(200, 48)) * 10.0 ** rng.integers(-30, 30, size=(200, 48))
    matrix[0, :6] = [0.1 + 0.2, 9.9999999999999e5, 1e-300, 1e308, -2.5, 10 ** (digits + 1)]
    matrix[1, :5] = [5e-324, -1e-310, 3e-320, 2.2250738585072014e-308, -9.99e-301]  # subnormal
    back = np.array([json.loads(text) for text in decimal_rows(matrix, digits)])
    assert back.shape == matrix.shape
    assert (np.abs(back - matrix) <= 0.5 * 10.0 ** (1 - digits) * np.abs(matrix)).all()
    assert (np.sign(back) == np.sign(matrix)).all()


def test_bounds_rounded_outward_still_hold_the_forecast() -> None:
    """At a level of millions, a bound within a unit of the forecast rounds to the same 7
    digits as the forecast, or past it: rounded to the nearest, 23% of these intervals
    were published without their own ``yhat``. Rounded outward, every one holds it, and
    each bound is within one unit of its last digit."""
    rng = np.random.default_rng(7)
    yhat = rng.uniform(-9e6, 9e6, size=(500, 48))
    lo, hi = yhat - rng.uniform(0, 1, size=yhat.shape), yhat + rng.uniform(0, 1, size=yhat.shape)
    read = [
        np.array([json.loads(text) for text in rows])
        for rows in (decimal_rows(lo, 7, "down"), decimal_rows(yhat, 13), decimal_rows(hi, 7, "up"))
    ]
    lo_back, yhat_back, hi_back = read
    assert (lo_back <= lo).all()
    assert (hi_back >= hi).all()
    assert ((lo_back <= yhat_back) & (yhat_back <= hi_back)).all()
    unit = 10.0 ** (np.floor(np.log10(np.abs(yhat))) - 6)
    assert (lo - lo_back < unit).all()
    assert (hi_back - hi < unit).all()
    nearest = [
        np.array([json.loads(text) for text in decimal_rows(bound, 7)]) for bound in (lo, hi)
    ]
    outside = (nearest[0] > yhat_back) | (nearest[1] < yhat_back)
    assert outside.mean() > 0.2  # what the test would catch


def test_values_an_ulp_past_a_decimal_are_rounded_outward_not_onto_it() -> None:
    """Dividing by a power of ten rounds too: -0.7566898000000001 divided to exactly
    7566898 and was published, rounded down, as -0.7566898, above the value (about one in
    25 values an ulp past a 7-digit decimal were). Each bound is now outward of its value,
    at most a unit of its last digit away, and written with a first digit of 1 to 9 (an
    ulp below 1e-16, rounded down, was `` 0.999999e-16``)."""
    rng = np.random.default_rng(11)
    mantissas, exponents = rng.integers(10**6, 10**7, 3000), rng.integers(-22, 22, 3000)
    decimals = [float(f"{m}e{k}") for m, k in zip(mantissas, exponents, strict=True)]
    decimals += [float(f"1e{k}") for k in range(-299, 308)] + [-0.7566898]
    near = np.array(decimals)
    values = np.concatenate([near, np.nextafter(near, np.inf), np.nextafter(near, -np.inf)])
    matrix = np.concatenate([values, -values]).reshape(-1, 6)
    unit = 10.0 ** (np.floor(np.log10(np.abs(matrix))) - 6)
    number = rb"[ -][1-9]\.\d{6}e[+-]\d{2,3}"
    roundings: tuple[Literal["down", "up"], ...] = ("down", "up")
    for rounding in roundings:
        rows = decimal_rows(matrix, 7, rounding)
        back = np.array([json.loads(text) for text in rows])
        outward = (back - matrix) * (-1.0 if rounding == "down" else 1.0)
        assert (outward >= 0).all(), matrix[outward < 0]
        assert (outward <= unit + 1e-15 * np.abs(matrix)).all()  # one step at most
        assert all(re.fullmatch(rb"\[%s(,%s)*\]" % (number, number), text) for text in rows)


def test_rounding_down_and_up_at_signs_zero_and_powers_of_ten() -> None:
    row = np.array([[0.0, 1.0, -1.0, 1.23456789, -1.23456789, 9.9999999, -9.9999999]])
    assert decimal_rows(row, 7, "down") == [
        b"[ 0.000000e+00, 1.000000e+00,-1.000000e+00, 1.234567e+00,-1.234568e+00,"
        b" 9.999999e+00,-1.000000e+01]"
    ]
    assert decimal_rows(row, 7, "up") == [
        b"[ 0.000000e+00, 1.000000e+00,-1.000000e+00, 1.234568e+00,-1.234567e+00,"
        b" 1.000000e+01,-9.999999e+00]"
    ]


def test_decimal_rows_format_zero_signs_and_powers_of_ten() -> None:
    rows = decimal_rows(np.array([[0.0, -0.0, 1.0, -9.9999996, 0.00123]]), 7)
    assert rows == [b"[ 0.000000e+00, 0.000000e+00, 1.000000e+00,-1.000000e+01, 1.230000e-03]"]
    # An exponent of three digits: every number of its row has three, and only of its row.
    rows = decimal_rows(np.array([[1.0, 2.0], [-2.5e-100, 3.0], [-4.0, 5.0]]), 5)
    assert rows == [
        b"[ 1.0000e+00, 2.0000e+00]",
        b"[-2.5000e-100, 3.0000e+000]",
        b"[-4.0000e+00, 5.0000e+00]",
    ]
    assert decimal_rows(np.empty((0, 4)), 7) == []
    with pytest.raises(ValueError, match="odd, at least 3"):
        decimal_rows(np.ones((1, 1)), 6)


def test_fraction_rows_are_json_with_seven_decimals_that_sum_to_one() -> None:
    logits = np.random.default_rng(1).normal(scale=3.0, size=(64, 24))
    weights = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    rows = [json.loads(text) for text in fraction_rows(weights)]
    back = np.array(rows)
    assert back.shape == weights.shape
    np.testing.assert_allclose(back, weights, rtol=0, atol=5e-8 + 1e-9)
    np.testing.assert_allclose(back.sum(axis=1), 1.0, rtol=0, atol=1e-6)


def test_fraction_rows_format_the_edges() -> None:
    rows = fraction_rows(np.array([[0.0, 1.0, 0.05000004, 0.99999996], [0.5, 0.25, 1e-9, 0.1]]))
    assert rows == [
        b"[0.0000000,1.0000000,0.0500000,1.0000000]",
        b"[0.5000000,0.2500000,0.0000000,0.1000000]",
    ]
    assert fraction_rows(np.empty((0, 4))) == []


def test_forecast_values_are_the_eight_fields_in_order() -> None:
    values = forecast_values(
        "s1", b"17-0", 1_700_000_000_000, b"[1.0]", b"[0.5, 0.5]", b"m1", b"[0.5]", b"[1.5]"
    )
    assert FORECAST_FIELDS[:6] == (b"series", b"src", b"ts", b"yhat", b"attn", b"model")
    assert FORECAST_FIELDS[6:] == (b"lo", b"hi")  # after the fields older entries have
    assert values == (
        b"s1",
        b"17-0",
        b"1700000000000",
        b"[1.0]",
        b"[0.5, 0.5]",
        b"m1",
        b"[0.5]",
        b"[1.5]",
    )


def test_anomaly_values_are_its_fields_in_order() -> None:
    [expected] = expected_numbers(np.array([[1.25, 1.0, 1.5]]))
    values = anomaly_values("s1", b"17-0", 1_700, b"9.5", expected, 33.0, b"m1")
    assert dict(zip(ANOMALY_FIELDS, values, strict=True)) == {
        b"series": b"s1",
        b"src": b"17-0",
        b"ts": b"1700",
        b"value": b"9.5",  # as it came
        b"yhat": b"1.250000000000e+00",
        b"lo": b"1.000000e+00",
        b"hi": b"1.500000e+00",
        b"score": b"33.000",
        b"model": b"m1",
    }


def test_an_events_forecast_and_bounds_are_its_forecast_entrys_first_step() -> None:
    # Written as Python writes a float, the event's lo was 8.39007888291692 where the
    # forecast entry carried 8.390078e+00: a value between them was an event outside
    # an interval that the forecast gave as holding it.
    yhat = np.array([[8.4, 9.0], [-1.234567890123456e-5, 1.0], [3.0e120, 1.0]])
    lo, hi = yhat - 0.0099211170830798, yhat + 0.0099211170830798
    expected = expected_numbers(np.c_[yhat[:, 0], lo[:, 0], hi[:, 0]])
    published = zip(
        decimal_rows(yhat, YHAT_DIGITS),
        decimal_rows(lo, BOUND_DIGITS, "down"),
        decimal_rows(hi, BOUND_DIGITS, "up"),
        strict=True,
    )
    for numbers, row in zip(expected, published, strict=True):
        assert [float(x) for x in numbers] == [json.loads(x)[0] for x in row]
    assert expected[0] == (b"8.400000000000e+00", b"8.390078e+00", b"8.409922e+00")


def test_a_score_is_never_written_under_the_threshold_it_passed() -> None:
    [expected] = expected_numbers(np.array([[1.25, 1.0, 1.5]]))
    score = {
        x: anomaly_values("s", b"1-0", 1, b"9", expected, x, b"m")[ANOMALY_FIELDS.index(b"score")]
        for x in (5.0004, 5.0005, 5.0, 1e20, math.inf)
    }
    assert score == {
        5.0004: b"5.001",  # not 5.000, under a threshold of 5.0004
        5.0005: b"5.001",
        5.0: b"5.000",
        1e20: b"100000000000000000000.000",
        math.inf: b"inf",
    }


def test_a_dead_letter_of_thousands_of_fields_keeps_the_first_and_counts_the_rest() -> None:
    fields = {b"f%d" % k: b"v" for k in range(DEAD_MAX_FIELDS + 234)}
    dead = dead_fields(fields, b"1-0", "missing field: series")
    assert list(dead)[:DEAD_MAX_FIELDS] == list(fields)[:DEAD_MAX_FIELDS]
    assert dead[b"fields_dropped"] == b"234"
    assert (dead[b"src"], len(dead)) == (b"1-0", DEAD_MAX_FIELDS + 3)


@pytest.mark.parametrize(
    ("fields", "kind"),
    [
        ({b"value": b"1"}, "missing_series"),
        ({b"series": b"s"}, "missing_value"),
        ({b"series": b"s", b"value": b"abc"}, "value"),
        ({b"series": b"s", b"value": b"1e999"}, "value"),
        ({b"series": b"", b"value": b"1"}, "series"),
        ({b"series": b"a b", b"value": b"1"}, "series"),
        ({b"series": b"\xff", b"value": b"1"}, "series"),
        ({b"series": b"s", b"value": b"1", b"ts": b"-5"}, "ts"),
    ],
)
def test_reason_kind_is_a_short_label(fields: dict[bytes, bytes], kind: str) -> None:
    assert reason_kind(_reason(fields)) == kind
    assert kind in DEAD_KINDS  # a label the metric starts at 0


def test_reason_kind_of_an_empty_reason() -> None:
    assert reason_kind("") == "unknown"


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        (
            "series limit reached (max_series=100000): raise max_series, or free the slots "
            "of series gone quiet sooner (series_idle_s)",
            "series_limit",
        ),
        ("the worker stopped while handling it, 3 times", "crashed_handling"),
        ("the model's forecast is not finite", "forecast_not_finite"),
    ],
)
def test_the_workers_own_reasons_have_labels_of_their_own(reason: str, kind: str) -> None:
    """Not ``series`` (a bad series name's label) or ``the`` (two unrelated reasons)."""
    assert reason_kind(reason) == kind
    assert kind in DEAD_KINDS


def test_known_series_are_learned_and_bad_ones_are_not() -> None:
    known: dict[bytes, str] = {}
    assert parse(ID, {b"series": b"s-1", b"value": b"1"}, known) == Reading("s-1", 1.0, ID_MS)
    assert known == {b"s-1": "s-1"}
    assert isinstance(parse(ID, {b"series": b"bad one", b"value": b"1"}, known), str)
    assert known == {b"s-1": "s-1"}
    # A known series still gets its value checked.
    assert isinstance(parse(ID, {b"series": b"s-1", b"value": b"nan"}, known), str)


def test_a_dead_letter_cuts_long_names_and_values_and_says_how_long_they_were() -> None:
    big, name = b"x" * (20 << 20), b"n" * 5000  # a 20 MiB value; a 5,000-byte name
    dead = dead_fields({b"series": b"s", b"value": big, name: b"1"}, b"1-0", "too big")
    assert dead[b"series"] == b"s"
    assert dead[b"value"] == big[:DEAD_MAX_BYTES]
    assert dead[name[:DEAD_MAX_BYTES]] == b"1"
    assert json.loads(dead[b"truncated"]) == {"value": 20 << 20, "n" * DEAD_MAX_BYTES: 1}
    assert sum(len(k) + len(v) for k, v in dead.items()) < 4 * DEAD_MAX_BYTES


def test_a_dead_letter_of_a_thousand_long_names_stays_within_its_byte_budget() -> None:
    """Names that grow fourfold when shown (each byte not UTF-8 as \\xff) made the
    record of what was cut 5 MB, 2.5x the entry, before every dead letter had a budget."""
    fields = {b"%d" % k + b"\xff" * 1025: b"1" for k in range(1000)}  # 1 MB in
    dead = dead_fields(fields, b"1-0", "missing field: series")
    size = sum(len(k) + len(v) for k, v in dead.items())
    assert DEAD_MAX_TOTAL <= size < DEAD_MAX_TOTAL + 8 * DEAD_MAX_BYTES
    kept = len(json.loads(dead[b"truncated"]))
    assert kept + int(dead[b"fields_dropped"]) == 1000


def test_an_entry_s_own_src_and_error_survive_its_dead_letter() -> None:
    """A producer's `src` (the sensor it came from, say) was overwritten by the entry id."""
    fields = {b"series": b"s", b"value": b"abc", b"src": b"sensor-7", b"error": b"E42"}
    dead = dead_fields(fields, b"1-0", "value is not a decimal number: 'abc'")
    assert dead[b"src"] == b"1-0"
    assert dead[b"error"] == b"value is not a decimal number: 'abc'"
    assert (dead[b"original:src"], dead[b"original:error"]) == (b"sensor-7", b"E42")
    assert (dead[b"series"], dead[b"value"]) == (b"s", b"abc")


def test_dead_letter_names_that_meet_are_numbered_not_overwritten() -> None:
    """A producer's `original:src` was overwritten by its `src`; two long names alike in
    their first 1,024 bytes kept the last one's value alone."""
    dead = dead_fields({b"original:src": b"A", b"src": b"B"}, b"1-0", "e")
    assert (dead[b"original:src"], dead[b"original:src#2"], dead[b"src"]) == (b"A", b"B", b"1-0")
    long = b"n" * DEAD_MAX_BYTES
    dead = dead_fields({long + b"1": b"x", long + b"2": b"y"}, b"1-0", "e")
    assert (dead[long], dead[long + b"#2"]) == (b"x", b"y")
    # Both cut, each by the name kept: the second overwrote the first's, under a name
    # no field had.
    assert json.loads(dead[b"truncated"]) == {
        "n" * DEAD_MAX_BYTES: 1,
        "n" * DEAD_MAX_BYTES + "#2": 1,
    }
