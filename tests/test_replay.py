"""`attnlstm replay` against a real server: what it writes, in which order."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from attnlstm.data import DataError
from attnlstm.partition import partition_of
from attnlstm.synthetic import SineSpec, make_sines
from tests.conftest import CLI, DATA
from tests.helpers import entries, free_port, wait_for
from worker.cli import main
from worker.contract import Reading, parse
from worker.embedded import EmbeddedServer
from worker.tools.replay import (
    MALFORMED,
    CsvCount,
    CsvLayout,
    count_csv,
    csv_entries,
    series_id,
)


def replay(redis_url: str, stream: str, *args: str) -> dict[str, object]:
    proc = subprocess.run(
        [*CLI, "replay", "--redis-url", redis_url, "--stream", stream, "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


def fields_of(client: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in entries(client, stream)]


def test_the_same_seed_gives_the_same_entries_in_the_same_order(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    args = ["--fast", "--seed", "7", "--series", "20", "--points", "50", "--bad-rate", "0.05"]
    args += ["--noise", "0.1", "--anomaly-rate", "0.01", "--drift-at", "25"]
    for name in ("a", "b"):
        report = replay(redis_url, f"{stream_prefix}{name}", *args)
        assert report["entries"] == redis_client.xlen(f"{stream_prefix}{name}")
    first = fields_of(redis_client, f"{stream_prefix}a")
    assert first == fields_of(redis_client, f"{stream_prefix}b")
    replay(redis_url, f"{stream_prefix}c", *args[:2], "8", *args[3:])
    assert fields_of(redis_client, f"{stream_prefix}c") != first

    good = [f for f in first if f.get(b"series", b"").startswith(b"sine-")]
    assert len(good) == 20 * 50
    assert 0 < len(first) - len(good) < 200  # about 5% malformed, inserted among the good
    # The good entries are the library's sines, time step after time step.
    spec = SineSpec(n_series=20, n_points=50, noise=0.1, anomaly_rate=0.01, drift_at=25)
    values = make_sines(spec, seed=7).values
    assert [f[b"series"] for f in good[:21]] == [f"sine-{j % 20}".encode() for j in range(21)]
    np.testing.assert_array_equal(
        np.array([float(f[b"value"]) for f in good]).reshape(50, 20), values.T
    )


def test_every_malformed_kind_is_refused_by_the_contract() -> None:
    reasons = set()
    for fields in MALFORMED:
        reason = parse(b"1-0", dict(zip(fields[::2], fields[1::2], strict=True)))
        assert isinstance(reason, str), fields
        reasons.add(reason.split(":")[0])
    assert len(MALFORMED) >= 10
    assert len(reasons) >= 8


def test_csv_is_replayed_as_written_gaps_and_repeated_times_kept(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    path = tmp_path / "two.csv"
    path.write_text(
        "time,Water flow [l/s],b\n"
        "2024-01-01T00:00:00Z,1.5,10\n"
        "2024-01-01T00:00:00Z,1.6,\n"  # the same time again, and a gap in b
        "2024-01-01T01:00:00+01:00,,12\n"  # a gap in the first column; the same instant
        "\n"
        "1704070800000,oops,13\n"  # ms since the epoch; a bad value is passed on as is
    )
    report = replay(redis_url, f"{stream_prefix}in", "--csv", str(path), "--fast")
    assert report["entries"] == 6
    got = [
        (f[b"series"].decode(), f[b"value"].decode(), int(f[b"ts"]))
        for f in fields_of(redis_client, f"{stream_prefix}in")
    ]
    t0 = 1704067200000
    assert got == [
        ("Water_flow_l/s", "1.5", t0),
        ("b", "10", t0),
        ("Water_flow_l/s", "1.6", t0),
        ("b", "12", t0),
        ("Water_flow_l/s", "oops", t0 + 3_600_000),
        ("b", "13", t0 + 3_600_000),
    ]


def test_values_the_worker_refuses_are_counted_and_said_before_the_replay(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each went out without a word, and the worker dead-lettered it: "1,5" quoted in a
    European export, "NA", "-". All of them: refused (tested with the bad arguments)."""
    path = tmp_path / "some.csv"
    path.write_text('time,a\n1,1.5\n2,"2,5"\n3,NA\n4,4\n')
    count = count_csv(path)
    assert count == CsvCount(4, 2, "3: value is not a decimal number: '2,5'")
    flags = ["--redis-url", redis_url, "--stream", f"{stream_prefix}in", "--fast"]
    assert main(["replay", "--csv", str(path), *flags]) == 0
    assert capsys.readouterr().err == (
        "attnlstm replay: note: the worker refuses 2 of the 4 values, each dead-lettered "
        f"(the first, {path}:3: value is not a decimal number: '2,5')\n"
    )
    assert redis_client.xlen(f"{stream_prefix}in") == 4  # sent as written, all the same


def test_a_column_a_trailing_comma_leaves_unnamed_is_no_series(tmp_path: Path) -> None:
    """`time,a,` on every line, as a spreadsheet may write it: refused, column 3 having
    "no characters a series id can use"."""
    path = tmp_path / "trail.csv"
    path.write_text("time,a,\n1,1.5,\n2,2.5,\n")
    assert [fields[:4] for fields in csv_entries(path)] == [
        (b"series", b"a", b"value", b"1.5"),
        (b"series", b"a", b"value", b"2.5"),
    ]


def test_long_format_csv_names_its_series_in_a_column(tmp_path: Path) -> None:
    path = tmp_path / "long.csv"
    path.write_text("ts,sensor,reading\n1000,a,1\n1000,b,2\n2000,a,3\n")  # seconds
    layout = CsvLayout(series_column="sensor", value_column="reading")
    assert list(csv_entries(path, layout)) == [
        (b"series", b"a", b"value", b"1", b"ts", b"1000000"),
        (b"series", b"b", b"value", b"2", b"ts", b"1000000"),
        (b"series", b"a", b"value", b"3", b"ts", b"2000000"),
    ]


def test_long_format_series_cells_are_cleaned_as_column_names_are(tmp_path: Path) -> None:
    """They went out as written: `bad id`, an empty cell, 200 characters, each entry
    dead-lettered by the worker."""
    path = tmp_path / "long.csv"
    layout = CsvLayout(series_column="sensor", value_column="reading")
    path.write_text(f"ts,sensor,reading\n1000,Flow [l/s],1\n1000,{'y' * 200},2\n2000,b,\n")
    assert [fields[1] for fields in csv_entries(path, layout)] == [b"Flow_l/s", b"y" * 128]
    # Each series' time runs forward, whatever the rows of others do.
    path.write_text("ts,sensor,reading\n1000,a,1\n2000,b,2\n1500,a,3\n")
    assert count_csv(path, layout).total == 3
    for body, message in [
        (
            "1000,a,1\n2000,b,2\n1500,b,3\n",
            r"long\.csv:4: time '1500' is before '2000', "
            r"series b's time before: the rows must run forward",
        ),
        ("1000,a,1\n2000,,2\n", r"long\.csv:3: series '' has no characters a series id can"),
        ("1000,[],1\n", r"long\.csv:2: series '\[\]' has no characters"),
        ("1000,a_b,1\n2000,a b,2\n", r"long\.csv:3: series 'a b' and 'a_b' would both be"),
    ]:
        path.write_text("ts,sensor,reading\n" + body)
        with pytest.raises(DataError, match=message):
            count_csv(path, layout)
    path.write_text("ts,sensor,reading\n1000,a,1\n")
    for same in (
        CsvLayout(series_column="sensor", value_column="sensor"),
        CsvLayout(series_column="ts", value_column="reading"),
    ):
        with pytest.raises(DataError, match="columns must be three columns"):
            count_csv(path, same)
    with pytest.raises(DataError, match="column 'ts' is the time column, no series"):
        count_csv(path, CsvLayout(value_columns=("ts",)))
    # A decimal comma where a trailing comma left the header a spare column: 100.
    path.write_text("ts,sensor,reading,\n1000,a,100,59\n")
    with pytest.raises(DataError, match=r"long\.csv:2: 100,59 is a number and digits"):
        count_csv(path, layout)


def test_the_sea_temperature_file_replays_every_point(tmp_path: Path) -> None:
    rows = list(csv_entries(DATA / "sea_surface_temperature.csv"))
    assert len(rows) == 19_226
    assert {r[1] for r in rows} == {b"temperature"}
    times = [int(r[5]) for r in rows]
    assert sum(b == a for a, b in itertools.pairwise(times)) == 1  # one repeated time
    assert max(b - a for a, b in itertools.pairwise(times)) == 12 * 3_600_000  # a 12-hour gap


def test_maxlen_caps_the_stream(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    args = ("--fast", "--series", "10", "--points", "1000", "--maxlen", "500")
    assert replay(redis_url, f"{stream_prefix}in", *args)["entries"] == 10_000
    assert 500 <= redis_client.xlen(f"{stream_prefix}in") < 1_000  # approximate trimming


def test_with_partitions_each_entry_goes_to_its_series_partition(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    args = ("--fast", "--series", "40", "--points", "10", "--bad-rate", "0.1", "--partitions", "4")
    report = replay(redis_url, f"{stream_prefix}in", *args)
    assert report["partitions"] == 4
    routed = {k: fields_of(redis_client, f"{stream_prefix}in{{{k}}}") for k in range(4)}
    for k, written in routed.items():
        assert written, f"partition {k} got nothing"
        assert {partition_of(f.get(b"series", b""), 4) for f in written} == {k}
    assert sum(map(len, routed.values())) == report["entries"]
    # Every good entry (40 series of 10), and the malformed ones beside them.
    readings = [parse(b"1-0", f) for written in routed.values() for f in written]
    good = sum(isinstance(r, Reading) for r in readings)
    assert (good, report["entries"] > good) == (400, True)
    assert redis_client.exists(f"{stream_prefix}in") == 0
    proc = subprocess.run(
        [*CLI, "replay", "--redis-url", redis_url, "--stream", f"{stream_prefix}in{{x}}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("with partitions, the worker adds the hash tag {k} itself")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fast", "--csv", "missing.csv"], "cannot read missing.csv"),
        (["--fast", "--csv", "bad.csv"], "bad.csv:2: time 'noon' is neither ISO 8601"),
        (["--fast", "--csv", "bad.csv", "--column", "nope"], "no column 'nope'"),
        (["--fast", "--seconds", "5"], "--seconds with --fast needs --points"),
        (["--fast", "--freq", "2", "1"], "freq (--freq LO HI) range is empty"),
        (["--rate", "0"], "--rate: must be a positive number"),
        # One point a series: "need at least one series of at least two points", no flag.
        (["--fast", "--points", "1"], "argument --points: must be >= 2, got 1"),
        (["--fast", "--bad-rate", "2"], "argument --bad-rate: must be from 0 to 1, got 2.0"),
        (["--rate", "100", "--seconds", "0.004"], "--seconds 0.004 at --rate 100 is less than one"),
        (["--fast", "--points", "50", "--drift-at", "50"], "(--drift-at) must lie inside the"),
        (["--series", "3"], "one of the arguments --rate --fast is required"),
        # Ids the worker refuses: every entry was written, and dead-lettered.
        (["--fast", "--prefix", "bad id"], "--prefix: series id 'bad id49' is refused by the"),
        (
            ["--fast", "--series", "10", "--prefix", "a" * 128],
            "series is longer than 128 characters",
        ),
        # Values the worker refuses, every entry dead-lettered.
        (["--fast", "--amplitude", "1e40", "1e40"], "the sines reach 1e+40, beyond the +-1e+30"),
        # Sines that overflow to NaN: written, exit 0.
        (["--fast", "--points", "5", "--freq", "1e308", "1e308"], "the sines reach nan, beyond"),
        # A header alone: a replay of nothing, exit 0.
        (["--fast", "--csv", "header.csv"], "header.csv: no value to replay (a header row and"),
        (["--fast", "--csv", "latin.csv"], "latin.csv:3: not UTF-8 text (byte 0xe9, 13 bytes in)"),
        (["--fast", "--csv", "semi.csv"], "columns are separated by commas (are they semicolons?)"),
        # A decimal comma where a spreadsheet's trailing comma left a spare column: 100.
        (["--fast", "--csv", "trail.csv"], "trail.csv:2: 100,59 is a number and digits in"),
        # Rows newest first: forecast from time run backwards, as `train` refuses them.
        (["--fast", "--csv", "back.csv"], "back.csv:3: time '1' is before '2', the row before's"),
        (["--fast", "--csv", "quoted.csv"], "quoted.csv:2: value is not a decimal number: '1,5'"),
        (
            ["--fast", "--csv", "eu.csv"],
            "time '20/03/2022 11:00' is neither ISO 8601 nor a count "
            "since the epoch: write times as ISO 8601",
        ),
        # Past what Redis takes: its refusal came back with a fence's fix.
        (["--fast", "--maxlen", "99999999999999999999"], "argument --maxlen: must be at most"),
        (["--fast", "--csv", "sup.csv"], "sup.csv:2: time '²' is neither ISO 8601"),
        (["--fast", "--csv", "wide.csv"], "wide.csv:3: field larger than field limit (131072)"),
        (["--fast", "--csv", "comma.csv"], "comma.csv:3: 3 cells where the header has 2"),
        # A file with no line end was read until memory ran out.
        (["--fast", "--csv", "long.csv"], "long.csv:2: no line end in this line's first"),
        # No file: read twice, a device or pipe was read until memory ran out, or empty.
        (["--fast", "--csv", "/dev/zero"], "--csv /dev/zero is no file: replay reads it twice"),
        (["--fast", "--csv", "."], "--csv . is a folder, not a CSV file"),
        (
            ["--fast", "--csv", "quote.csv"],
            "quote.csv:2: a quote opened in this row is never closed",
        ),
        # Past what the worker takes even as ns: each entry would be dead-lettered.
        (
            ["--fast", "--csv", "ns.csv"],
            "ns.csv:3: time '100000000000000000000000': the worker refuses it (ts is not a "
            "whole number of ms since the epoch: '100000000000000000')",
        ),
        # Sines past what a replay can draw: a MemoryError of 447 GiB, or an OverflowError.
        (["--rate", "1e9", "--seconds", "60", "--series", "1"], "is 6e+10 entries, more than"),
        (
            ["--rate", "1e300", "--seconds", "1"],
            "sine values a replay draws at once: give --points",
        ),
        (["--rate", "1e300", "--seconds", "1e300"], "is inf entries, more than"),
        (["--fast", "--series", "1000000", "--points", "100000"], "is 100,000,000,000 values"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    args: list[str], message: str, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.csv").write_text("time,v\nnoon,1\n")
    (tmp_path / "sup.csv").write_text("time,v\n²,1\n")  # a digit, by str.isdigit
    (tmp_path / "wide.csv").write_text(f"time,v\n1,1\n2,{'x' * 200_000}\n")
    (tmp_path / "comma.csv").write_text("time,v\n1,1\n2,12,5\n")  # a decimal comma
    (tmp_path / "quote.csv").write_text('time,v\n1,"1\n2,2\n')  # a quote never closed
    (tmp_path / "ns.csv").write_text("time,v\n1,1\n100000000000000000000000,2\n")
    (tmp_path / "header.csv").write_text("time,v\n,\n")
    (tmp_path / "long.csv").write_text("time,v\n1," + "1" * (1 << 24))
    (tmp_path / "latin.csv").write_bytes(b"time,v\n1,1\n2,\xe9\n")
    (tmp_path / "semi.csv").write_text("time;v\n1;1\n")
    (tmp_path / "trail.csv").write_text("time,a,\n1,100,59\n")
    (tmp_path / "back.csv").write_text("time,v\n2,1\n1,2\n")
    (tmp_path / "quoted.csv").write_text('time,v\n1,"1,5"\n2,"2,5"\n')
    (tmp_path / "eu.csv").write_text("time,v\n20/03/2022 11:00,1\n")
    proc = subprocess.run(
        [*CLI, "replay", "--redis-url", redis_url, "--stream", f"{stream_prefix}in", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_sines_it_refuses_are_refused_before_anything_is_written(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """Not after the partitions' mark is set, as when the sines were drawn at the first
    entry."""
    args = ["--fast", "--partitions", "2", "--points", "50", "--drift-at", "50"]
    proc = subprocess.run(
        [*CLI, "replay", "--redis-url", redis_url, "--stream", f"{stream_prefix}in", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "attnlstm replay: error: drift_at (--drift-at) must lie inside the series' 50 points "
        "(1 to 49), got 50 "
        "(see attnlstm replay --help)"
    )
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []


def test_without_a_redis_url_replay_says_how_to_get_one(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [*CLI, "replay", "--fast"], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert proc.returncode == 1
    assert "replay needs a Redis: set ATTNLSTM_REDIS_URL or pass --redis-url" in proc.stderr


def test_series_ids_from_column_names() -> None:
    assert series_id("Water flow [l/s]") == "Water_flow_l/s"
    assert series_id("temperature") == "temperature"
    # Ids the contract takes stay as they are: `_a` was `a`, and `_a` beside `a` refused.
    assert [series_id(name) for name in ("_a", "b_", "[c]", " d e ")] == ["_a", "b_", "c", "d_e"]


def test_a_file_that_begins_with_blank_lines_replays_from_its_header(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    """`train` ended in an IndexError on it, and replay said the file was empty."""
    path = tmp_path / "blank.csv"
    path.write_text("\n\ntime,v\n1700000000,1.5\n")
    proc = _replay_cli(redis_url, f"{stream_prefix}in", "--fast", "--csv", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    ((_, fields),) = entries(redis_client, f"{stream_prefix}in")
    assert fields == {b"series": b"v", b"value": b"1.5", b"ts": b"1700000000000"}


def test_a_stream_name_refused_leaves_no_partitions_mark(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """The mark was set before the name was checked: the next try, with another P, was
    refused for streams that were never written."""
    stream = f"{stream_prefix}in{{q}}"
    for partitions in ("3", "4"):
        proc = _replay_cli(redis_url, stream, "--fast", "--points", "2", "--partitions", partitions)
        assert proc.returncode == 1
        assert "has a brace" in proc.stderr, proc.stderr
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []


def _replay_cli(
    url: str, stream: str, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "replay", "--redis-url", url, "--stream", stream, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("header", "args", "message"),
    [
        ("time,a,a", [], "columns 2 ('a') and 3 ('a') would both be series 'a'"),
        ("time,a b,a_b", [], "columns 2 ('a b') and 3 ('a_b') would both be series 'a_b'"),
        ("time,a,a", ["--column", "a"], "2 columns are named 'a' (columns 2, 3)"),
        ("t,a,t", ["--time-column", "t"], "2 columns are named 't' (columns 1, 3)"),
    ],
)
def test_columns_that_would_feed_one_series_are_refused_before_anything_is_written(
    header: str,
    args: list[str],
    message: str,
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    tmp_path: Path,
) -> None:
    """``a,a`` sent the first column twice and the second never; ``a b,a_b`` sent two
    columns as one series. Both wrote without a word."""
    path = tmp_path / "twice.csv"
    path.write_text(f"{header}\n1,1,10\n2,2,20\n")
    proc = _replay_cli(redis_url, f"{stream_prefix}in", "--fast", "--csv", str(path), *args)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"attnlstm replay: error: {path}: {message}; name them apart"
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []


def test_columns_are_taken_by_position(tmp_path: Path) -> None:
    """A value column named as the time column is its own column (by name, the time's
    values went out as its series)."""
    path = tmp_path / "t.csv"
    path.write_text("t,a,t\n1000,1,10\n")
    assert list(csv_entries(path)) == [
        (b"series", b"a", b"value", b"1", b"ts", b"1000000"),
        (b"series", b"t", b"value", b"10", b"ts", b"1000000"),
    ]


def test_iso_times_with_ms_are_ms_to_the_ms(tmp_path: Path) -> None:
    """Through a float (timestamp() x 1000, floored), these came out 1 ms early: two
    rows a ms apart could share one ts."""
    path = tmp_path / "ms.csv"
    path.write_text("time,a\n2004-08-07T00:12:58.110,1\n2039-01-01T00:00:31.680Z,2\n")
    assert [fields[5] for fields in csv_entries(path)] == [b"1091837578110", b"2177452831680"]


def test_epoch_seconds_with_a_fraction_are_ms_to_the_ms(tmp_path: Path) -> None:
    """As loggers write them (time.time()): the file was refused, each of its times
    "neither ISO 8601 nor a count since the epoch"."""
    path = tmp_path / "frac.csv"
    path.write_text("time,a\n1700000000.0019,2\n1700000000123.9,3\n1700000000.25,1\n")
    assert [fields[5] for fields in csv_entries(path)] == [
        b"1700000000001",
        b"1700000000123",
        b"1700000000250",
    ]


def test_a_bom_is_no_part_of_the_first_column_name(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefftime,a\n1000,1\n".encode())
    assert list(csv_entries(path, CsvLayout(time_column="time"))) == [
        (b"series", b"a", b"value", b"1", b"ts", b"1000000")
    ]


def test_a_file_with_no_header_row_is_refused_not_named_after_its_first_values(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    """Its first row was taken for the header: its values lost, and the series named
    `1` and `2` after them (a review). Refused, nothing written. A header whose first
    cell is a small whole number is a name still (a file with no time column)."""
    path = tmp_path / "noheader.csv"
    path.write_text("2024-01-01T00:00:00,1,2\n2024-01-01T01:00:00,3,4\n")
    proc = _replay_cli(redis_url, f"{stream_prefix}in", "--fast", "--csv", str(path))
    assert proc.returncode == 1
    assert proc.stderr == (
        f"attnlstm replay: error: {path}:1: the first row begins with a time "
        "('2024-01-01T00:00:00'), not a column name: the file needs a header row naming "
        "its columns (time,<series>,...)\n"
    )
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []
    path.write_text("7,a\n1700000000,1\n")
    assert list(csv_entries(path)) == [(b"series", b"a", b"value", b"1", b"ts", b"1700000000000")]


def test_a_bad_row_deep_in_a_file_is_found_before_anything_is_written(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    """The file is checked whole first: a bad row at line 12,002 left 10,000 entries
    written (two round trips), and no word of them."""
    path = tmp_path / "late.csv"
    path.write_text("time,a\n" + "".join(f"{t},{t}\n" for t in range(1, 12_001)) + "oops,1\n")
    proc = _replay_cli(redis_url, f"{stream_prefix}in", "--fast", "--csv", str(path))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"attnlstm replay: error: {path}:12002: time 'oops' is neither ISO 8601 nor a "
        "count since the epoch"
    )
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []


def test_a_server_gone_mid_run_is_one_line_that_says_what_was_written(tmp_path: Path) -> None:
    """Its own server, stopped under the replay, then started again on its AOF: the
    stream holds at least what the error says was written, and at most one round trip
    more."""
    server = EmbeddedServer(appendonly=True, data_dir=tmp_path / "server", port=free_port())
    server.start()
    url = server.tcp_url  # redis://: a reset there was hinted at TLS, after 3,728 entries
    try:
        cmd = [*CLI, "replay", "--redis-url", url, "--stream", "in", "--rate", "2000"]
        proc = subprocess.Popen(
            [*cmd, "--series", "5", "--points", "100000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            with redis.Redis.from_url(server.url) as client:
                wait_for(lambda: client.xlen("in") >= 500, what="the replay's entries")
            server.stop()
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        server.start()
        with redis.Redis.from_url(server.url) as client:
            held = client.xlen("in")
    finally:
        server.stop()
    assert proc.returncode == 1
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"attnlstm replay: error: cannot reach Redis at {url}: ")
    found = re.search(r"\(([\d,]+) entries were written before it, and up to ([\d,]+) more", err)
    assert found, err
    written, in_flight = (int(n.replace(",", "")) for n in found.groups())
    assert written <= held <= written + in_flight
    assert "rediss://" not in err  # Redis took entries over this URL: its scheme is right


def test_entries_redis_refuses_are_counted_exactly(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """Every reply read, the count is known: it said "0 entries were written before it,
    and up to 10 more may have been" where Redis had refused all 10."""
    stream = f"{stream_prefix}in"
    redis_client.set(stream, "a string")
    proc = _replay_cli(redis_url, stream, "--fast", "--series", "2", "--points", "5")
    assert proc.returncode == 1
    assert "WRONGTYPE" in proc.stderr
    assert "(0 entries were written, 10 refused)" in proc.stderr, proc.stderr


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action, as a process started from a shell prompt has it (see
    tests/test_demo.py)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _state(pid: int) -> str:
    """A process's state letter (R running, S asleep), from /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc to read")
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_during_a_round_trip_reports_what_the_stream_holds(
    stop: signal.Signals, tmp_path: Path
) -> None:
    """Ctrl-C (or SIGTERM, which stops it as Ctrl-C does) while a batch is on its way:
    the batch is counted once sent, as Redis writes it. Before, 5,000 were reported where
    the stream held 5,372. The round trip is made to last: the server (its own, to take
    DEBUG) sleeps 2 s, and a replay at --fast waits (asleep) only on Redis."""
    with EmbeddedServer(extra_args=["--enable-debug-command", "yes"]) as server:
        cmd = [*CLI, "replay", "--redis-url", server.url, "--stream", "in", "--fast", "--json"]
        proc = subprocess.Popen(
            [*cmd, "--series", "10", "--points", "200000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_as_from_a_terminal,
        )
        try:
            with redis.Redis.from_url(server.url) as client:
                wait_for(lambda: client.xlen("in") >= 5000, what="the first round trip")
                sleeper = redis.Redis.from_url(server.url)
                nap = threading.Thread(target=sleeper.execute_command, args=("DEBUG", "SLEEP", "2"))
                nap.start()
                wait_for(lambda: _state(proc.pid) == "S", what="the replay to wait on Redis")
                proc.send_signal(stop)
                out, err = proc.communicate(timeout=60)
                nap.join()
                sleeper.close()
                held = client.xlen("in")
        finally:
            proc.kill()
    assert (proc.returncode, err) == (130, "attnlstm replay: interrupted\n")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert report["entries"] == held


def test_a_rate_too_slow_to_reach_its_next_entry_waits_for_ctrl_c(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """--rate 1e-300: the first entry at once, the next one never; the wait before it
    was an OverflowError (time.sleep of 1e300 s)."""
    report = _stopped_after_one(redis_client, redis_url, stream_prefix, signal.SIGINT)
    assert (report["entries"], report["interrupted"]) == (1, True)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_the_replay_with_its_report(
    stop: signal.Signals, redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """A timeout, systemd or a terminal closed killed the replay, exit 143 (or 129), no
    report; they stop it as Ctrl-C does."""
    report = _stopped_after_one(redis_client, redis_url, stream_prefix, stop)
    assert (report["entries"], report["interrupted"]) == (1, True)


def _stopped_after_one(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, stop: signal.Signals
) -> dict[str, Any]:
    """`replay --rate 1e-300` (its first entry at once, the next never) sent ``stop``
    once that entry is in: its report, then exit 130 (it was 0: `replay ... && next`
    went on after a replay cut short). Ctrl-C as from a terminal."""
    stream = f"{stream_prefix}in"
    cmd = [*CLI, "replay", "--redis-url", redis_url, "--stream", stream, "--rate", "1e-300"]
    proc = subprocess.Popen(
        [*cmd, "--series", "1", "--points", "5", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_as_from_a_terminal if stop == signal.SIGINT else None,
    )
    try:
        wait_for(lambda: redis_client.xlen(stream) == 1 or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert (proc.returncode, err) == (130, "attnlstm replay: interrupted\n")
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def test_a_csv_replayed_at_rates_past_the_floats_range(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    """--rate 1e300 --seconds 1e300 is more entries than a float holds (inf): the whole
    file, not an OverflowError."""
    path = tmp_path / "two.csv"
    path.write_text("time,a\n1000,1\n2000,2\n")
    args = ["--csv", str(path), "--rate", "1e300", "--seconds", "1e300", "--json"]
    proc = _replay_cli(redis_url, f"{stream_prefix}in", *args)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["entries"] == 2
    assert redis_client.xlen(f"{stream_prefix}in") == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fast", "--seconds", "5"], "--seconds with --fast needs --points: how many to write"),
        (["--rate", "1", "--seconds", "0.1"], "--seconds 0.1 at --rate 1 is less than one entry"),
        (["--rate", "1e9", "--seconds", "60"], "is 6e+10 entries, more than the 10,000,000"),
        # Sines the flags ask for that cannot be drawn: they exited 1.
        (["--fast", "--points", "50", "--drift-at", "50"], "(--drift-at) must lie inside the"),
        (["--fast", "--freq", "2", "1"], "freq (--freq LO HI) range is empty: (2.0, 1.0)"),
        (["--fast", "--series", "100000", "--points", "1000"], "is 100,000,000 values, more"),
        # Flags of the other source: they were ignored.
        (
            ["--fast", "--csv", "ok.csv", "--bad-rate", "0.5", "--series", "3", "--noise", "2"],
            "--series, --noise, --bad-rate are for sines, not --csv",
        ),
        (["--fast", "--csv", "ok.csv", "--seed", "0"], "--seed is for sines, not --csv"),
        (["--fast", "--csv", "ok.csv", "--points", "5"], "--points is for sines, not --csv"),
        (["--fast", "--column", "v"], "--column is for --csv, not sines"),
        (["--fast", "--value-column", "v"], "--value-column is for --csv, not sines"),
        # A drift's flags with no drift: ignored.
        (["--fast", "--drift-kind", "amplitude"], "--drift-kind is for a drift: give --drift-at"),
        # Read twice, a pipe was found empty the second time: "empty file".
        (["--fast", "--csv", "fifo"], "--csv fifo is no file: replay reads it twice"),
        # A long file's flag given for a wide one, and the other way round: ignored.
        (["--fast", "--csv", "ok.csv", "--value-column", "v"], "--value-column is for a long"),
        (
            ["--fast", "--csv", "ok.csv", "--series-column", "s", "--column", "v"],
            "--column is for a wide file, not with --series-column",
        ),
    ],
)
def test_usage_errors_found_as_it_runs_exit_2_before_anything_is_written(
    args: list[str],
    message: str,
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    tmp_path: Path,
) -> None:
    """As the parser's do (the README's exit 2 for bad arguments): they exited 1."""
    (tmp_path / "ok.csv").write_text("time,v\n1,1\n2,2\n")
    os.mkfifo(tmp_path / "fifo")
    proc = _replay_cli(redis_url, f"{stream_prefix}in", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("attnlstm replay: error: ")
    assert message in line
    assert line.endswith(" (see attnlstm replay --help)")
    assert list(redis_client.scan_iter(match=f"{stream_prefix}*")) == []


def test_the_defaults_of_the_sine_flags_are_those_given_by_hand(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str
) -> None:
    """Their flags default to None now, to be told from a value given; the entries are
    the same as with the old defaults written out."""
    plain, spelled = f"{stream_prefix}plain", f"{stream_prefix}spelled"
    replay(redis_url, plain, "--fast", "--points", "20")
    defaults = ["--series", "50", "--seed", "0", "--prefix", "sine-", "--noise", "0"]
    defaults += ["--anomaly-rate", "0", "--bad-rate", "0"]  # --drift-kind: with --drift-at
    replay(redis_url, spelled, "--fast", "--points", "20", *defaults)
    assert fields_of(redis_client, plain) == fields_of(redis_client, spelled)
    assert len(fields_of(redis_client, plain)) == 50 * 20


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_a_report_stdout_cannot_take_is_one_line_and_exit_1(
    redis_url: str, stream_prefix: str
) -> None:
    """`attnlstm replay ... > /dev/full`: only a broken pipe was caught; this was
    OSError's traceback."""
    where = ["--redis-url", redis_url, "--stream", f"{stream_prefix}in"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [*CLI, "replay", *where, "--fast", "--points", "2", "--series", "1", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert (proc.returncode, proc.stderr) == (
        1,
        "attnlstm replay: error: cannot write the report: No space left on device\n",
    )
