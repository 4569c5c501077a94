"""Data sources by name, and CSV files read with errors that say where."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from attnlstm.data import DataError, Gaps, Layout, load_csv, load_dataset, time_ms
from tests.conftest import DATA


def test_named_sources() -> None:
    assert load_dataset("sine").names == ["sine"]
    sines = load_dataset("sines", n_series=3, seed=1)
    assert sines.names == ["sine-0", "sine-1", "sine-2"]
    assert sines.lengths == [1000, 1000, 1000]
    with pytest.raises(DataError, match="unknown data 'cosine'"):
        load_dataset("cosine")
    with pytest.raises(DataError, match="unknown data 'csv:'"):
        load_dataset("csv:")


def test_real_recordings_load_by_column() -> None:
    sst = load_dataset(f"csv:{DATA / 'sea_surface_temperature.csv'}")
    assert sst.names == ["temperature"]
    assert sst.lengths == [19226]
    flow = load_dataset(f"csv:{DATA / 'water_flow.csv'}", columns=["Water flow [l/s]"])
    assert flow.lengths == [1268]
    assert 50 < flow.series[0].mean() < 150


def test_the_electricity_demand_has_a_daily_and_a_weekly_cycle() -> None:
    demand = load_dataset(f"csv:{DATA / 'electricity_demand.csv'}").series[0]
    assert len(demand) == 4032  # 12 weeks of half hours, none missing

    def autocorrelation(lag: int) -> float:
        return float(np.corrcoef(demand[:-lag], demand[lag:])[0, 1])

    # A day (48 steps) and a week (336) back look alike; half a day back does not.
    assert autocorrelation(48) > 0.8
    assert autocorrelation(336) > autocorrelation(48)
    assert autocorrelation(24) < 0.2


def test_the_electricity_load_has_a_daily_and_a_faint_weekly_cycle_over_three_years() -> None:
    load = load_dataset(f"csv:{DATA / 'electricity_load.csv'}").series[0]
    assert len(load) == 3 * 365 * 24 + 24  # 2012-2014 hourly, 2012 a leap year, none missing

    def autocorrelation(lag: int) -> float:
        return float(np.corrcoef(load[:-lag], load[lag:])[0, 1])

    # A day back looks alike (0.99) and half a day back does not (-0.55); a week back
    # looks more alike than six or eight days back, by less than a day back does.
    assert autocorrelation(24) > 0.95
    assert autocorrelation(12) < 0
    assert autocorrelation(144) < autocorrelation(168) > autocorrelation(192)
    assert autocorrelation(168) < autocorrelation(24)


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "d.csv"
    path.write_text(text)
    return path


def test_gaps_are_skipped_and_columns_chosen(tmp_path: Path) -> None:
    path = _csv(tmp_path, "t,a,b\n1,1.5,2\n2,,3\n3,2.5,4\n")
    data = load_csv(path)
    assert data.names == ["a", "b"]
    assert data.series[0].tolist() == [1.5, 2.5]
    assert load_csv(path, ["b"]).series[0].tolist() == [2.0, 3.0, 4.0]


def test_the_steps_a_series_times_skip_are_counted_column_by_column(tmp_path: Path) -> None:
    """An hour missing from the times, and an empty cell, each skip a step of the column
    they are in; an hour and a half apart (a late reading) rounds to one step skipped,
    two and a half to two (half up: numpy's rint made it one)."""
    hours = [0, 1, 2, 4, 5, 6, 7.5, 8.5, 12.5, 13.5, 14.5, 17]
    rows = [f"{round(h * 3600)},{h},{'' if h == 5 else h}" for h in hours]
    data = load_csv(_csv(tmp_path, "t,a,b\n" + "\n".join(rows) + "\n"))
    assert data.step_s == 3600
    assert data.gaps == {"a": Gaps(4, 7, 3), "b": Gaps(5, 8, 3)}  # b: 2-4, 4-6 apart
    assert load_csv(_csv(tmp_path, "t,a\n0,1\n3600,2\n7200,3\n")).gaps == {}
    assert load_csv(_csv(tmp_path, "t,a\nx,1\ny,2\n")).gaps == {}  # no times: none known
    flow = load_dataset(f"csv:{DATA / 'water_flow.csv'}", columns=["Water flow [l/s]"])
    assert flow.gaps == {"Water flow [l/s]": Gaps(10, 111, 31)}  # as data/README.md says
    sea = load_dataset(f"csv:{DATA / 'sea_surface_temperature.csv'}")
    assert sea.gaps == {"temperature": Gaps(2, 24, 23)}
    # A time that comes again, counted per series: the sea temperature's one (as
    # data/README.md says), and none where a series' cell at that time is empty.
    assert (flow.repeats, sea.repeats) == ({}, {"temperature": 1})
    again = load_csv(_csv(tmp_path, "t,a,b\n0,1,1\n0,2,\n3600,3,3\n3600,4,4\n7200,5,5\n"))
    assert again.repeats == {"a": 2, "b": 1}


@pytest.mark.parametrize(
    ("text", "columns", "message"),
    [
        ("t,a\n1,2\n2,x\n", (), r"d\.csv:3: a='x' is not a number"),
        ("t,a\n1,2\n2,inf\n", (), r"d\.csv:3: a='inf' is not finite"),
        # As the worker refuses it: a model trained on 1e307 was NaN, saved and exit 0.
        ("t,a\n1,2\n2,-1e31\n", (), r"d\.csv:3: a='-1e31' is out of range \(beyond \+-1e\+30\)"),
        ("t,a\n1,2\n", ("b",), r"no column b; it has \['t', 'a'\]"),
        # The times trained on as values, where `replay` refuses them.
        ("t,a\n1,2\n2,3\n", ("t",), r"d\.csv: column 't' is the time column, no series"),
        ("t,a\n", (), "needs a header row and at least one data row"),
        ("t,a\n1,\n", (), "column 'a' has no values"),
        ("t\n1\n", (), r"no column of values: the first, 't', is taken to be the time, and"),
        ("t;a\n1;2\n", (), r"the first, 't;a', .* separated by commas \(are they semicolons\?\)"),
        ("t\ta\n1\t2\n", (), r"the first, 't\\ta', .* \(are they tabs\?\)"),
        # A decimal comma: the value was read as 12, the 5 dropped.
        ("t,a\n1,2\n2,12,5\n", (), r"d\.csv:3: 3 cells where the header has 2; quote"),
        # ... where a trailing comma left the header a spare column: 12, without a word,
        # asked for by name or not.
        ("t,a,\n1,2,\n2,12,5\n", (), r"d\.csv:3: 12,5 is a number and digits in a column"),
        ("t,a,\n1,2,\n2,12,5\n", ("a",), r"d\.csv:3: 12,5 is a number and digits in a"),
        # Semicolons and decimal commas, a European spreadsheet's: told to quote a comma.
        ("t;a\n1;2,5\n", (), r"d\.csv:2: 2 cells where the header has 1; columns are .*semi"),
        # Times as spreadsheets write them: taken for no time, a model with no period.
        (
            "t,a\n20/03/2022 11:00,1\n",
            (),
            r"d\.csv:2: time '20/03/2022 11:00' is neither .*: "
            r"write times as ISO 8601 \(2022-03-20T11:00:00",
        ),
        ("t,a\n2022-03-20 10:00:00 UTC,1\n", (), r"d\.csv:2: time .* write times as ISO 8601"),
        ("t,a\n03/20/2022 1:00 PM,1\n", (), r"d\.csv:2: time .* write times as ISO 8601"),
        ("t,a\n20.03.2022,1\n", (), r"d\.csv:2: time .* write times as ISO 8601"),
        ("t,a\n3/20/22 0:00,1\n", (), r"d\.csv:2: time .* write times as ISO 8601"),
        ("t,a\n20-Mar-2022 00:00,1\n", (), r"d\.csv:2: time .* write times as ISO 8601"),
        ("t,a\n2022-03-20T00:00:00 CET,1\n", (), r"d\.csv:2: time .* write times as ISO"),
        # An unclosed quote: the rest of the file was one cell, read as no value. Its
        # row is named, not the file's last line.
        ('t,a\n1,"2\n2,3\n3,4\n', (), r"d\.csv:2: a quote opened in this row is never closed"),
        ('t,a\n1,2\n2,3\n3,"4\n', (), r"d\.csv:4: a quote opened in this row is never closed"),
        # What float() reads and the worker refuses.
        ("t,a\n1,2\n2,1_0\n", (), r"d\.csv:3: a='1_0' is not a number"),
        ("t,a\n1,2\n2,\uff11\uff10\n", (), r"d\.csv:3: a='\uff11\uff10' is not a number"),
        # A time past the worker's 16 digits of ms: 400 digits ended in an OverflowError.
        (f"t,a\n1,1\n{'9' * 400},2\n", (), r"d\.csv:3: time '9+' is out of range: at most 1e\+16"),
        (f"t,a\n{'9' * 400},1\n", (), r"d\.csv:2: time '9+' is out of range"),
        ('t,a\n1,"2"5\n', (), r"d\.csv:2: ',' expected after '\"'"),
        (f"t,a\n1,2\n2,{'1' * 200_000}\n", (), r"d\.csv:3: field larger than field limit"),
        # A name twice: by name, the first column's values were read for both.
        ("t,a,a\n1,1,10\n", (), r"d\.csv: 2 columns are named 'a' \(columns 2, 3\); name"),
        ("t,a,a\n1,1,10\n", ("a",), r"d\.csv: 2 columns are named 'a' \(columns 2, 3\)"),
        ("t,a,t\n1,1,10\n", (), r"d\.csv: 2 columns are named 't' \(columns 1, 3\)"),
        # No header row: the first row's values were taken for the series' names.
        (
            "2024-01-01T00:00:00,1,2\n2024-01-01T01:00:00,3,4\n",
            (),
            r"d\.csv:1: the first row begins with a time \('2024-01-01T00:00:00'\), not a "
            r"column name: the file needs a header row",
        ),
        ("\n1700000000,1\n1700003600,2\n", (), r"d\.csv:2: the first row begins with a time"),
        # Rows newest first, or shuffled: a model trained on time run backwards.
        ("t,a\n3,1\n2,2\n1,3\n", (), r"d\.csv:3: time '2' is before the row before's"),
        ("t,a\n1,1\n3,2\n2,3\n", (), r"d\.csv:4: time '2' is before the row before's"),
        # A time past the first row it cannot read: the step was given up, no period.
        ("t,a\n1,1\nnoon,2\n", (), r"d\.csv:3: time 'noon' is neither ISO 8601 nor a count"),
        ("t,a\n1,1\n,2\n", (), r"d\.csv:3: time '' is neither ISO 8601 nor a count"),
        # Two readings a time: a step of 0, no period, and two readings taken for one.
        ("t,a\n1,1\n1,2\n2,3\n2,4\n", (), r"d\.csv:3: the time of the row before, as on"),
        # µs 100 apart, in one ms: said to repeat, where they were only floored.
        (
            "t,a\n1700000000000000,1\n1700000000000100,2\n1700000000000200,3\n",
            (),
            r"d\.csv:3: time '1700000000000100' is in the same ms as the row before's "
            r"\('1700000000000000'\), as on most rows: times are kept to the ms",
        ),
    ],
)
def test_bad_csv_says_where_and_why(
    tmp_path: Path, text: str, columns: tuple[str, ...], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_csv(_csv(tmp_path, text), columns)


def test_a_long_file_is_read_series_by_series(tmp_path: Path) -> None:
    """A row per reading, its series named in a column (as `replay --series-column`
    reads it): `train` read the series names as times and the time column as values."""
    text = (
        "sensor,time,reading\n"
        "a,0,1.5\nb,0,10\n"
        "a,3600,2.5\nb,3600,\n"  # b's empty cell: a gap
        "b,7200,30\na,7200,3.5\n"  # the series in any order within a time
        "b,14400,40\n"  # b skips a step
    )
    layout = Layout(time_column="time", series_column="sensor", value_column="reading")
    data = load_csv(_csv(tmp_path, text), layout=layout)
    assert data.names == ["a", "b"]
    assert [s.tolist() for s in data.series] == [[1.5, 2.5, 3.5], [10.0, 30.0, 40.0]]
    assert data.step_s == 3600  # the lower median of the series' steps: a's
    assert data.gaps == {"b": Gaps(2, 2, 1)}  # b's values are 7,200 s apart, twice
    assert data.repeats == {}
    spec = load_dataset(f"csv:{tmp_path / 'd.csv'}", layout=layout)
    assert [s.tolist() for s in spec.series] == [s.tolist() for s in data.series]


@pytest.mark.parametrize(
    ("text", "layout", "message"),
    [
        # Time runs back within a series (it may across series).
        (
            "s,t,value\na,2,1\nb,1,1\na,1,2\n",
            Layout(time_column="t", series_column="s"),
            r"d\.csv:4: time '1' is before '2', series a's time before: the rows must run "
            r"forward in time \(column 't' is the time\)",
        ),
        # A series whose first time cannot be read, in a file with times (it was taken
        # for a series without any, and its times went unchecked).
        (
            "t,s,value\n1,a,1\n2,a,2\nnoon,b,1\n3,b,2\n",
            Layout(series_column="s"),
            r"d\.csv:4: time 'noon' is neither ISO 8601",
        ),
        # A file with times: every row's time must read, a skipped row's too, and the
        # first reading's (it was taken for a file without times, and none was checked).
        ("t,s,value\n,a,1\n1,a,2\n2,a,3\n", Layout(series_column="s"), r"d\.csv:2: time ''"),
        ("t,s,value\n1,a,1\nx,a,\n2,a,3\n", Layout(series_column="s"), r"d\.csv:3: time 'x'"),
        # A column of times that is not the first: said what reads it; with no time in
        # the first, a long file may too. A typo in a column of numbers is no time.
        (
            "a,t\n1,2024-01-01T00:00\n",
            None,
            r"t='2024-01-01T00:00' is not a number \(--time-column t reads it as the file's "
            r"times\)$",
        ),
        (
            "a,t\n1.5,2024-01-01T00:00\n",
            None,
            r"\(a long file, a row per reading\? .*; --time-column t reads it as the file's "
            r"times\)$",
        ),
        ("t,b\n2024-01-01,5\n2024-01-02,abc\n", None, r"d\.csv:3: b='abc' is not a number$"),
        ("t,b\n2024-01-01,5\n2024-01-02,2024-01-02\n", None, r"is not a number$"),  # a typo
        # A time column named, and a column of labels: the long file's flags.
        (
            "sensor,time,reading\na,2024-01-01T00:00,1\n",
            Layout(time_column="time"),
            r"sensor='a' is not a number \(a long file, a row per reading\? ",
        ),
        # A time in a form not read past the first row, in a long file: refused, not
        # taken for a file without times.
        (
            "t,s,value\nx,a,1\n20/03/2022 11:00,a,2\n",
            Layout(series_column="s"),
            r"d\.csv:2: time 'x' is neither ISO 8601",
        ),
        # A skipped row's time out of the worker's range, as replay refuses it.
        (
            "t,s,value\n" + "9" * 30 + ",a,\n1,a,1\n",
            Layout(series_column="s"),
            r"d\.csv:2: time '9+' is out of range",
        ),
        # A long file read as a wide one, its times on most rows twice.
        ("t,s,v\n1,a,1\n1,b,2\n2,a,3\n2,b,4\n", None, r"one row a time .* --series-column"),
        (
            "s,t,value\na,1,1\n,2,2\n",
            Layout(time_column="t", series_column="s"),
            r"d\.csv:3: a value and no series \('s'\)",
        ),
        ("t,s,value\n1,a,1\n", Layout(series_column="value"), r"must be three columns"),
        ("t,s,v\n1,a,1\n", Layout(series_column="s"), r"d\.csv: no column 'value'"),
        ("t,s,value\n1,a,\n", Layout(series_column="s"), r"column 'value' has no values"),
        # A time column named: its first row must hold a time, read as replay reads it.
        ("a,t\n1,noon\n", Layout(time_column="t"), r"d\.csv:2: time 'noon' is neither"),
        ("a,t\n1,1\n2,0\n", Layout(time_column="t"), r"\(column 't' is the time\)"),
        # A long file read as a wide one: said what would read it.
        ("sensor,time,reading\na,2026-01-01,1\n", None, r"--series-column NAME reads"),
    ],
)
def test_a_csv_files_layout_is_checked(
    tmp_path: Path, text: str, layout: Layout | None, message: str
) -> None:
    with pytest.raises(DataError, match=message):
        load_csv(_csv(tmp_path, text), layout=layout)


def test_a_long_files_rows_without_a_value_are_skipped_as_replay_skips_them(
    tmp_path: Path,
) -> None:
    """Its time too: an empty reading's time before its series' last is no error, as in
    `replay`, and a series of empty readings alone is none."""
    text = "t,s,value\n1,a,1\n2,a,2\n1,a,\n3,a,3\n4,c,\n"
    data = load_csv(_csv(tmp_path, text), layout=Layout(series_column="s"))
    assert (data.names, data.series[0].tolist()) == (["a"], [1.0, 2.0, 3.0])


def test_a_long_files_series_are_picked_by_name_and_its_step_is_a_step(tmp_path: Path) -> None:
    """`--column` names the series of a long file to read (`plot` drew its first one
    alone), and a time written twice is no step of 0: each series' every reading twice
    gave half of all steps 0, and a step of 0, no period."""
    rows = [f"{3600 * (h // 2)},{name},{h}" for h in range(9) for name in "ab"]
    path = _csv(tmp_path, "t,s,value\n" + "\n".join(rows) + "\n")
    layout = Layout(series_column="s")
    data = load_csv(path, layout=layout)
    assert (data.names, data.step_s, data.repeats) == (["a", "b"], 3600.0, {"a": 4, "b": 4})
    assert load_csv(path, ["b"], layout=layout).names == ["b"]
    with pytest.raises(
        DataError, match=r"d\.csv: no value of series 'c' in column 's'; it names a, b$"
    ):
        load_csv(path, ["b", "c"], layout=layout)


def test_a_time_column_other_than_the_first_is_read_as_the_time(tmp_path: Path) -> None:
    data = load_csv(_csv(tmp_path, "a,t,b\n1,0,4\n2,60,5\n3,120,6\n4,240,7\n"), layout=Layout("t"))
    assert (data.names, data.step_s) == (["a", "b"], 60.0)
    assert data.gaps == {"a": Gaps(1, 1, 1), "b": Gaps(1, 1, 1)}


def test_blank_lines_before_the_header_and_spaces_around_names_are_read_past(
    tmp_path: Path,
) -> None:
    """A blank line first ended `train` in an IndexError; ` a` was no column `a`, though
    its cells are read without their spaces. A column asked for twice is one series."""
    data = load_csv(_csv(tmp_path, "\n \n t , a \n1,2\n2,3\n"), ("a", "a"))
    assert (data.names, data.series[0].tolist(), data.step_s) == (["a"], [2.0, 3.0], 1.0)


def test_a_column_a_trailing_comma_leaves_unnamed_is_no_series(tmp_path: Path) -> None:
    """`time,a,` on every line, as a spreadsheet may write it: refused ("column '' has no
    values")."""
    data = load_csv(_csv(tmp_path, "t,a,\n1,2,\n2,3,\n"))
    assert (data.names, data.series[0].tolist()) == (["a"], [2.0, 3.0])
    # Notes there are let be; digits after a number are a decimal comma (refused, above).
    notes = load_csv(_csv(tmp_path, "t,a,\n1,2,ok\n2,3,7 l/s\n"))
    assert (notes.names, notes.series[0].tolist()) == (["a"], [2.0, 3.0])


def test_rows_of_empty_cells_are_no_rows_and_a_time_twice_is_kept(tmp_path: Path) -> None:
    """A spreadsheet's trailing `,` rows made the time step unreadable: no period, and
    a one-step model where a day-ahead one was due, without a word."""
    times = [f"2024-01-01T{h:02d}:00:00Z" for h in range(24)] * 2
    rows = [f"{t[:8]}{1 + k // 24:02d}{t[10:]},{k}" for k, t in enumerate(times)]
    data = load_csv(_csv(tmp_path, "time,v\n" + "\n".join(rows) + "\n,\n , \n\n"))
    assert (data.step_s, data.daily_period(), data.lengths) == (3600.0, 24, [48])
    # One reading twice, as the sea temperature has: kept as it came.
    again = load_csv(_csv(tmp_path, "t,a\n1,1\n2,2\n2,3\n3,4\n"))
    assert (again.step_s, again.series[0].tolist()) == (1.0, [1.0, 2.0, 3.0, 4.0])


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        load_csv(tmp_path / "absent.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"bin\.csv:1: not UTF-8 text \(byte 0xff, 0 bytes in\)"):
        load_csv(binary)
    # Python's position is within the block it decodes: "position 1231" for byte 328,911.
    rows = "".join(f"{t},{t % 7}.5\n" for t in range(20_000))
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"t,caf\u00e9\n{rows}".encode() + b"20000,3\xe9\n")
    at = len(f"t,caf\u00e9\n{rows}".encode()) + len("20000,3")
    with pytest.raises(DataError, match=f"latin.csv:20002: not UTF-8 text \\(byte 0xe9, {at:,} "):
        load_csv(latin)
    # A character cut short by the end of the file.
    short = tmp_path / "short.csv"
    short.write_bytes(b"t,v\n1,2\n2,\xc3")
    with pytest.raises(DataError, match=r"short\.csv:3: not UTF-8 text \(byte 0xc3, 10 bytes"):
        load_csv(short)
    # A character cut by the end of the 64 KiB block it is looked for in is no error.
    cut = tmp_path / "cut.csv"
    cut.write_bytes(b"t,vv\n" + "\u00e9".encode() * 40_000 + b"\n\xff\n")
    with pytest.raises(DataError, match=r"cut\.csv:3: not UTF-8 text \(byte 0xff, 80,006 "):
        load_csv(cut)
    # No line end: read until memory ran out.
    with pytest.raises(DataError, match="/dev/zero:1: no line end in this line's first 16,777,216"):
        load_csv(Path("/dev/zero"))


@pytest.mark.timeout(30)
def test_a_pipe_that_is_no_utf8_is_an_error_not_a_wait(tmp_path: Path) -> None:
    """Opened again to find the byte, a pipe whose writer had gone waited for ever."""
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("wb") as f:
            f.write(b"t,v\n1,\xff\n")

    writer = threading.Thread(target=write)
    writer.start()
    with pytest.raises(DataError, match=r"cannot read .*pipe\.csv: not UTF-8 text \(invalid"):
        load_csv(fifo)
    writer.join()


def test_the_daily_period_comes_from_the_times_in_the_first_column(tmp_path: Path) -> None:
    steps = {
        "water_flow.csv": 24,
        "electricity_demand.csv": 48,
        "sea_surface_temperature.csv": 48,
        "electricity_load.csv": 24,
    }
    for name, period in steps.items():
        assert load_csv(DATA / name).daily_period() == period, name
    # Times that do not divide a day, or no times at all: no period to go by.
    odd = tmp_path / "odd.csv"
    odd.write_text("t,v\n2024-01-01T00:00:00,1\n2024-01-01T00:07:00,2\n2024-01-01T00:14:00,3\n")
    assert load_csv(odd).daily_period() == 0
    names = tmp_path / "names.csv"
    names.write_text("step,v\na,1\nb,2\nc,3\n")
    assert load_csv(names).step_s is None
    assert load_csv(names).daily_period() == 0
    # Row numbers are times 1 s apart, as replay reads them: a day of them is past any
    # period a model may have.
    plain = tmp_path / "plain.csv"
    plain.write_text("step,v\n1,1\n2,2\n3,3\n")
    assert load_csv(plain).daily_period() == 0
    assert load_dataset("sines", n_series=2).daily_period() == 0


def test_epoch_counts_in_any_unit_give_the_period_iso_times_give(tmp_path: Path) -> None:
    """Integer ms since the epoch, which replay takes, gave no period: `train` and
    `demo --csv` built another model for the same recording. Seconds were read as ms
    (an hourly file's day, 24,000 steps, no period at all; a daily file's day, 1,000)
    and pandas' ns refused."""
    start_s = 1_455_494_400  # 2016-02-15T00:00:00Z
    iso = [f"2016-02-15T{h // 2:02d}:{h % 2 * 30:02d}:00Z" for h in range(48)]
    columns = {"iso.csv": iso}
    for name, per_s in (("s.csv", 1), ("ms.csv", 10**3), ("us.csv", 10**6), ("ns.csv", 10**9)):
        columns[name] = [str((start_s + h * 1800) * per_s) for h in range(48)]
    for name, times in columns.items():
        path = tmp_path / name
        path.write_text("time,v\n" + "".join(f"{t},{k}\n" for k, t in enumerate(times)))
        data = load_csv(path)
        assert (data.step_s, data.daily_period()) == (1800.0, 48), name
    assert [time_ms(column[1]) for column in columns.values()] == [1_455_496_200_000] * 5


def test_epoch_counts_with_a_fraction_are_times(tmp_path: Path) -> None:
    """Seconds with a decimal fraction, as many loggers write them, made the whole time
    column no time at all: no period, and only a note."""
    times = [f"{1_455_494_400 + h * 1800}.25" for h in range(48)]
    path = tmp_path / "frac.csv"
    path.write_text("time,v\n" + "".join(f"{t},{k}\n" for k, t in enumerate(times)))
    data = load_csv(path)
    assert (data.step_s, data.daily_period()) == (1800.0, 48)
    assert time_ms("1455494400.1259") == 1_455_494_400_125  # below a ms, floored
    assert time_ms("1455494400125.9") == time_ms("1455494400125999") == 1_455_494_400_125
    for text in ("1455494400.", ".5", "1455494400.5.1", "-1455494400.5", "1_455", "20.5"):
        with pytest.raises(ValueError, match="isoformat"):
            time_ms(text)
