"""The `attnlstm` command line, run as a user runs it: in a child process, or in this one
where what a test checks is the status and what is printed (the fixture `here`)."""

from __future__ import annotations

import http.server
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from attnlstm.baselines import available
from attnlstm.checkpoint import load, save
from attnlstm.data import Dataset, Gaps, fingerprint, load_dataset
from attnlstm.device import resolve_device
from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import article_sine
from tests.conftest import CLI, DATA
from tests.helpers import as_user, free_port, wait_for, worker_env
from worker.cli.commands import _print_human
from worker.cli.live import worker_settings
from worker.cli.offline import _note_gaps, _note_repeats
from worker.cli.parser import MAX_POOL_WORKERS, build_parser

REPORT_KEYS = {"val_mse", "val_mae", "naive_mse", "mase", "seconds", "params", "version"}


def run(*args: str, cwd: Path, threads: int = 1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args, "--threads", str(threads)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


Ran = tuple[int | str | None, str, str]  # exit status, stdout, stderr


@pytest.fixture
def here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Ran]:
    """The command line run in this process, in ``tmp_path``, not in a process of its
    own (each paid 1-2 s of imports): the status main() returns is the one the
    `attnlstm` script exits with, and an exception that escaped it, the traceback a user
    would see, fails the test. What the process would print besides goes to the stderr
    returned too: the log lines (from INFO for the commands that set up logging, from
    WARNING for the others, as Python's last-resort handler prints them), and warnings.
    Here, pytest's handlers and its record of warnings took them."""
    monkeypatch.chdir(tmp_path)
    from worker.cli import main

    def run_here(*args: str) -> Ran:
        root, stderr = logging.getLogger(), logging.StreamHandler(sys.stderr)  # capsys's
        stderr.setLevel(logging.INFO if args[0] in ("worker", "demo", "bench") else logging.WARNING)
        level = root.level
        root.setLevel(min(level, stderr.level))  # (setLevel: loggers cache what it allows)
        root.addHandler(stderr)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                try:
                    status: int | str | None = main(list(args))
                except SystemExit as e:  # the parser's refusals
                    status = e.code
        finally:
            root.removeHandler(stderr)
            root.setLevel(level)
        for w in caught:
            print(warnings.formatwarning(w.message, w.category, w.filename, w.lineno), end="",
                  file=sys.stderr)  # fmt: skip
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run_here


def last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def small_model(workdir: Path) -> dict[str, Any]:
    """A quick checkpoint on the article's sine, and train's report of it."""
    return last_json(
        run("train", "--data", "sine", "--epochs", "30", "--json", "--out", "m.st", cwd=workdir)
    )


def test_train_with_defaults_forecasts_the_article_sine(tmp_path: Path) -> None:
    report = last_json(run("train", "--data", "sine", "--json", cwd=tmp_path, threads=2))
    assert set(report) >= REPORT_KEYS
    assert report["val_mse"] <= 1e-5  # naive last value: about 1.3e-3; the article: 0.507
    assert report["naive_mse"] == pytest.approx(1.28e-3, rel=0.01)
    assert (tmp_path / "model.safetensors").is_file()


def test_train_on_fifty_sines_beats_naive_five_times_over(tmp_path: Path) -> None:
    report = last_json(
        run("train", "--data", "sines", "--series", "50", "--json", cwd=tmp_path, threads=2)
    )
    assert report["mase"] <= 0.2


def test_evaluate_agrees_with_train(small_model: dict[str, Any], workdir: Path) -> None:
    report = last_json(run("evaluate", "--model", "m.st", "--json", cwd=workdir))
    assert set(report) >= REPORT_KEYS
    assert report["version"] == small_model["version"]
    assert report["val_mse"] == pytest.approx(small_model["val_mse"], rel=1e-9)
    assert report["val_mse"] < report["naive_mse"]


def test_evaluate_against_seasonal_naive(small_model: dict[str, Any], workdir: Path) -> None:
    # The article's sine has a period of 2 * pi / 0.05 = 125.66 steps.
    report = last_json(run("evaluate", "--model", "m.st", "--period", "126", "--json", cwd=workdir))
    # The held-out tail is the last 20% of the 1,000 values: each against the one 126
    # steps before it.
    sine, tail = article_sine(), np.arange(800, 1000)
    seasonal_mae = np.abs(sine[tail] - sine[tail - 126]).mean()
    assert report["seasonal_naive_mae"] == pytest.approx(seasonal_mae, rel=1e-9)
    assert report["mase_seasonal"] == pytest.approx(report["val_mae"] / seasonal_mae, rel=1e-6)


def test_plot_writes_the_figures(small_model: dict[str, Any], workdir: Path) -> None:
    report = last_json(run("plot", "--model", "m.st", "--out", "figs", "--json", cwd=workdir))
    names = sorted(Path(p).name for p in report["written"])
    assert names == ["attention.png", "forecast.png", "loss.png"]
    for name in names:
        data = (workdir / "figs" / name).read_bytes()
        assert data.startswith(b"\x89PNG")
        assert len(data) > 10_000
    proc = run("plot", "--model", "m.st", "--out", "m.st", cwd=workdir)  # a file, no folder
    assert (proc.returncode, proc.stderr) == (
        1,
        "attnlstm plot: error: cannot write the figures into m.st: it is not a folder\n",
    )


def test_human_output_without_json(small_model: dict[str, Any], workdir: Path) -> None:
    proc = run("evaluate", "--model", "m.st", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "val_mse" in proc.stdout
    assert "{" not in proc.stdout
    assert "note" not in proc.stderr  # the data it was trained on


def test_a_report_row_of_figures_prints_as_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """demo --csv's held-out tail printed as Python's dict without --json."""
    _print_human({"held_out_v": {"points": 12, "mae": 0.123456789, "naive_mae": None}})
    assert capsys.readouterr().out == "          held_out_v  points=12  mae=0.123457  naive_mae=-\n"


def test_evaluate_on_other_data_than_the_model_was_trained_on_says_so(
    small_model: dict[str, Any], workdir: Path, here: Callable[..., Ran]
) -> None:
    """A model trained on 50 sines, evaluated with no --data, was scored on the article's
    sine without a word (as plot drew it)."""
    model = str(workdir / "m.st")  # the article's sine
    status, _, err = here("evaluate", "--model", model, "--data", "sines", "--series", "2")
    assert status == 0, err
    assert err == (
        "attnlstm evaluate: note: no series of --data sines is one the model was trained on "
        "(--data sine): its figures are of other data than it was held out from\n"
    )
    # The same spec, read with other flags: the note named it twice, as if in conflict.
    trained = ("--data", "sines", "--series", "2", "--epochs", "1", "--out", "s.st")
    assert here("train", *trained)[0] == 0
    status, _, err = here("evaluate", "--model", "s.st", "--data", "sines", "--series", "2")
    assert (status, err) == (0, "")
    status, _, err = here("evaluate", "--model", "s.st", "--data", "sines", "--seed", "1")
    assert status == 0, err
    assert err == (
        "attnlstm evaluate: note: no series of --data sines is one the model was trained on "
        "(--data sines too, but with another --series or --seed): its figures are of other "
        "data than it was held out from\n"
    )


def test_train_says_when_the_times_give_no_daily_period_it_can_take(tmp_path: Path) -> None:
    """Values a second apart make a day of 86,400 steps, past a checkpoint's bound: the
    model is trained with no period, and the user told why and how to set one."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        f"{(start + timedelta(seconds=i)).isoformat()},{math.sin(i / 10):.4f}" for i in range(300)
    ]
    (tmp_path / "s.csv").write_text("time,v\n" + "\n".join(rows) + "\n")
    proc = run(
        "train", "--data", "csv:s.csv", "--epochs", "1", "--json", "--out", "m.st", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert last_json(proc)["period"] == 0
    assert "values 1 s apart" in proc.stderr
    assert "a day of 86,400 steps" in proc.stderr
    assert "--period N sets one" in proc.stderr


def test_train_says_when_the_first_column_holds_no_times(tmp_path: Path) -> None:
    """A file with no time column (`temp,hum`) was trained with no period and the first
    column dropped, without a word."""
    rows = [f"{20 + math.sin(i / 10):.4f},{math.cos(i / 10):.4f}" for i in range(300)]
    (tmp_path / "s.csv").write_text("temp,hum\n" + "\n".join(rows) + "\n")
    proc = run(
        "train", "--data", "csv:s.csv", "--epochs", "1", "--json", "--out", "m.st", cwd=tmp_path
    )
    assert last_json(proc)["period"] == 0
    assert "note: the first column, taken to be the time, holds no time" in proc.stderr
    assert "--column NAME reads a column as a series" in proc.stderr


def test_train_and_evaluate_read_a_long_file_as_replay_does(tmp_path: Path) -> None:
    """A row per reading, its series in a column: `replay --series-column` read it, but
    `train` took the series names for times and trained on the time column as a series
    (`sensor,time,reading`), or stopped at a time it took for a value."""
    hours = range(24 * 20)
    rows = [
        f"{name},{1_700_000_000 + 3600 * h},{offset + math.sin(2 * math.pi * h / 24):.4f}"
        for h in hours
        for name, offset in (("a", 0.0), ("b", 5.0))
    ]
    (tmp_path / "long.csv").write_text("sensor,time,reading\n" + "\n".join(rows) + "\n")
    flags = ["--data", "csv:long.csv", "--series-column", "sensor", "--time-column", "time"]
    flags += ["--value-column", "reading"]
    trained = run("train", *flags, "--epochs", "1", "--json", "--out", "m.st", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert last_json(trained)["period"] == 24  # a day of hourly readings, from the times
    scored = run("evaluate", *flags, "--model", "m.st", "--json", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr
    assert "note" not in scored.stderr  # the series it was trained on, held out as then
    assert last_json(scored)["mase"] < 1.0


def test_one_row_with_a_time_is_too_little_data_not_a_file_with_no_time(tmp_path: Path) -> None:
    """Its first row's time was read, but one row has no step: the note said the first
    column held no time there, before the error that mattered."""
    (tmp_path / "one.csv").write_text("time,v\n2024-01-01T00:00:00,1\n")
    proc = run("train", "--data", "csv:one.csv", "--out", "m.st", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "attnlstm train: error: too little data: the shortest series has 1 point before its "
        "held-out tail, and forecasts that read 20 values and 1 ahead leave 0 training and 0 "
        "validation windows at val_fraction 0.2"
    )


def test_train_says_when_too_few_validation_windows_fitted_the_blend(tmp_path: Path) -> None:
    """On 150 hourly values the blend and the intervals were fitted on one validation
    window (a 99% spread as narrow as the 50%), and nothing said so."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [f"{(start + timedelta(hours=i)).isoformat()},{math.sin(i / 4):.4f}" for i in range(150)]
    (tmp_path / "s.csv").write_text("time,v\n" + "\n".join(rows) + "\n")
    proc = run(
        "train", "--data", "csv:s.csv", "--epochs", "1", "--json", "--out", "m.st", cwd=tmp_path
    )
    assert last_json(proc)["period"] == 24
    assert re.search(r"note: \d validation windows \(the last 0\.2 of what comes", proc.stderr)
    assert "too few to trust them; more data, or a larger --val-fraction" in proc.stderr
    sines = run("train", "--data", "sines", "--series", "3", "--epochs", "1", cwd=tmp_path)
    assert sines.returncode == 0, sines.stderr
    assert "validation windows" not in sines.stderr


def test_a_short_column_is_named_and_sizes_no_model(tmp_path: Path) -> None:
    """A column of 30 values beside 30 days of hourly ones took the weekly lags from the
    model (the shortest series decided them) and was itself never trained on, without a
    word."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    rows = [
        f"{(start + timedelta(hours=i)).isoformat()},{math.sin(i * math.pi / 12):.4f},"
        + (f"{i}" if i < 30 else "")
        for i in range(720)
    ]
    (tmp_path / "s.csv").write_text("time,v,spare\n" + "\n".join(rows) + "\n")
    proc = run(
        "train", "--data", "csv:s.csv", "--epochs", "1", "--json", "--out", "m.st", cwd=tmp_path
    )
    assert last_json(proc)["lags"] == [24, 144, 168]
    assert (
        "note: 1 of 2 series are too short to train on (the model reads 192 values and "
        "forecasts 24 ahead, before each series' held-out tail): spare (30 values)"
    ) in proc.stderr
    assert "times skip steps" not in proc.stderr  # spare's cells end: no gap in its times


def test_the_gaps_note_names_three_series_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gaps = {f"s{i}": Gaps(i + 1, 2 * i + 1, min(i + 1, 2)) for i in range(5)}
    _note_gaps(Dataset(list(gaps), [np.zeros(3)] * 5, 3600.0, gaps), "train")
    assert capsys.readouterr().err == (
        "attnlstm train: note: the times skip steps in s0 (1 step missing in 1 place, the "
        "longest 1); s1 (3 steps missing in 2 places, the longest 2); s2 (5 steps missing "
        "in 3 places, the longest 2); and 2 more series: values are taken one step apart, as the "
        "worker takes a live series, so across a gap the window, the lags and the profile "
        "span more time than they say\n"
    )
    _note_gaps(Dataset(["a"], [np.zeros(3)], 3600.0), "train")
    assert capsys.readouterr().err == ""


def test_the_repeats_note_names_the_series_whose_times_come_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """55 repeated times passed train and evaluate without a word, where gaps get one."""
    repeats = {"s0": 55, "s1": 1}
    _note_repeats(Dataset(list(repeats), [np.zeros(3)] * 2, 3600.0, repeats=repeats), "evaluate")
    assert capsys.readouterr().err == (
        "attnlstm evaluate: note: a time comes again in s0 (55 times); s1 (1 time): each "
        "reading is taken as a step of its own, so there the window and the lags span less "
        "time than they say\n"
    )
    _note_repeats(Dataset(["a"], [np.zeros(3)], 3600.0), "train")
    assert capsys.readouterr().err == ""


def test_train_on_a_real_recording(tmp_path: Path) -> None:
    data = f"csv:{DATA / 'water_flow.csv'}"
    trained = run(
        "train", "--data", data, "--column", "Water flow [l/s]", "--epochs", "5", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    report = last_json(trained)
    # The recording lacks 111 of its hours: said, since the lags reach across them.
    assert (
        "attnlstm train: note: the times skip steps in Water flow [l/s] (111 steps missing "
        "in 10 places, the longest 31): values are taken one step apart"
    ) in trained.stderr
    assert report["val_mae"] > 0
    assert report["naive_mae"] > 0
    # Hourly times: a day of 24 steps, forecast a day ahead, from yesterday and the same
    # hours a week before.
    assert (report["period"], report["window"], report["horizon"]) == (24, 24, 24)
    assert report["lags"] == [24, 144, 168]
    no_period = last_json(
        run("train", "--data", data, "--period", "0", "--epochs", "1", "--json", cwd=tmp_path)
    )
    assert (no_period["period"], no_period["window"], no_period["horizon"]) == (0, 20, 1)


def test_evaluate_scores_the_tail_the_model_was_trained_without(tmp_path: Path) -> None:
    """Trained with --val-fraction 0.1, a checkpoint is scored on the last 0.1 of each
    series unless told otherwise; a longer tail of the same data is refused. evaluate's
    own default, 0.2, used to score it on values it had trained on, without a word."""
    data = ("--data", "sines", "--series", "3")
    last_json(run("train", *data, "--epochs", "1", "--val-fraction", "0.1", "--json", cwd=tmp_path))
    assert last_json(run("evaluate", *data, "--json", cwd=tmp_path))["val_fraction"] == 0.1
    shorter = run("evaluate", *data, "--val-fraction", "0.05", "--json", cwd=tmp_path)
    assert last_json(shorter)["val_fraction"] == 0.05
    longer = run("evaluate", *data, "--val-fraction", "0.2", cwd=tmp_path)
    assert longer.returncode == 1
    assert longer.stderr.strip() == (
        "attnlstm evaluate: error: the model trained on the first 900 of the 1,000 values "
        "of sine-0 of sines (and 2 more series): a held-out tail of 0.2 would score it on "
        "values it trained on; pass --val-fraction 0.1 or less"
    )


def test_a_longer_tail_is_refused_on_the_series_trained_on_whatever_their_path(
    tmp_path: Path,
) -> None:
    """The data spec was compared as text: `csv:./f.csv` for `csv:f.csv`, or a copy of
    the file, scored the model on values it trained on."""
    rows = [f"{i},{math.sin(i / 5):.4f},{math.cos(i / 7):.4f}" for i in range(300)]
    (tmp_path / "f.csv").write_text("t,a,b\n" + "\n".join(rows) + "\n")
    (tmp_path / "copy.csv").write_bytes((tmp_path / "f.csv").read_bytes())
    other_rows = [f"{i},{math.sin(i / 3):.4f}" for i in range(300)]
    (tmp_path / "other.csv").write_text("t,a\n" + "\n".join(other_rows) + "\n")
    last_json(run("train", "--data", "csv:f.csv", "--epochs", "1", "--json", cwd=tmp_path))
    for data in (["csv:./f.csv"], ["csv:copy.csv"], ["csv:copy.csv", "--column", "b"]):
        proc = run("evaluate", "--data", *data, "--val-fraction", "0.3", cwd=tmp_path)
        assert proc.returncode == 1, data
        assert "a held-out tail of 0.3 would score it on values it trained on" in proc.stderr
    other = run(
        "evaluate", "--data", "csv:other.csv", "--val-fraction", "0.3", "--json", cwd=tmp_path
    )
    assert last_json(other)["val_fraction"] == 0.3
    # Rows added since: the model's 240 training values of each column are the first
    # 240 of 400 now. A tail of 0.3 starts at 280, after them; one of 0.5 at 200, in them
    # (its whole-series fingerprint no longer matched: it was scored there).
    more = [f"{i},{math.sin(i / 5):.4f},{math.cos(i / 7):.4f}" for i in range(300, 400)]
    (tmp_path / "grown.csv").write_text("t,a,b\n" + "\n".join(rows + more) + "\n")
    grown = run(
        "evaluate", "--data", "csv:grown.csv", "--val-fraction", "0.3", "--json", cwd=tmp_path
    )
    assert last_json(grown)["val_fraction"] == 0.3
    proc = run("evaluate", "--data", "csv:grown.csv", "--val-fraction", "0.5", cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (
        1,
        "attnlstm evaluate: error: the model trained on the first 240 of the 400 values of "
        "a of csv:grown.csv (and 1 more series): a held-out tail of 0.5 would score it on "
        "values it trained on; pass --val-fraction 0.4 or less",
    )
    # Rows removed: its own tail of 0.2, of 250 values, starts at 200, in the 240.
    (tmp_path / "cut.csv").write_text("t,a,b\n" + "\n".join(rows[:250]) + "\n")
    proc = run("evaluate", "--data", "csv:cut.csv", cwd=tmp_path)
    assert proc.returncode == 1
    assert "a held-out tail of 0.2 would score it on values it trained on; pass" in proc.stderr


def test_a_checkpoint_of_the_release_before_refuses_a_longer_tail_by_its_fingerprints(
    tmp_path: Path,
) -> None:
    """Checkpoints written before each training part had its fingerprint kept those of
    the whole series (``data_fingerprints``). Read as no fingerprints at all, a copy of
    the file under another name was scored on values the model trained on."""
    rows = [f"{i},{math.sin(i / 5):.4f}" for i in range(300)]
    (tmp_path / "f.csv").write_text("t,a\n" + "\n".join(rows) + "\n")
    (tmp_path / "copy.csv").write_bytes((tmp_path / "f.csv").read_bytes())
    last_json(run("train", "--data", "csv:f.csv", "--epochs", "1", "--json", cwd=tmp_path))
    checkpoint = load(tmp_path / "model.safetensors")
    meta = {k: v for k, v in checkpoint.meta.items() if k != "trained_values"}
    meta["data_fingerprints"] = [fingerprint(load_dataset(f"csv:{tmp_path / 'f.csv'}").series[0])]
    save(tmp_path / "old.safetensors", checkpoint.model, meta)
    old = ("evaluate", "--model", "old.safetensors", "--data", "csv:copy.csv")
    proc = run(*old, "--val-fraction", "0.3", cwd=tmp_path)
    assert (proc.returncode, proc.stderr.strip()) == (
        1,
        "attnlstm evaluate: error: the model was trained on all but the last 0.2 of each "
        "series of csv:copy.csv: --val-fraction 0.3 would score it on values it trained "
        "on; pass at most 0.2",
    )
    assert last_json(run(*old, "--json", cwd=tmp_path))["val_fraction"] == 0.2


def test_evaluate_with_baselines_scores_every_forecaster_on_the_same_points(
    tmp_path: Path,
) -> None:
    data = f"csv:{DATA / 'water_flow.csv'}"
    last_json(run("train", "--data", data, "--epochs", "3", "--json", cwd=tmp_path))
    evaluated = run("evaluate", "--data", data, "--baselines", "--json", cwd=tmp_path)
    report = last_json(evaluated)
    # Scored across the same gaps as trained across (train says so, and now evaluate).
    assert (
        "attnlstm evaluate: note: the times skip steps in Water flow [l/s] (111 steps "
        "missing in 10 places, the longest 31): values are taken one step apart"
    ) in evaluated.stderr
    rows = {row["name"]: row for row in report["baselines"]}
    # MSTL also with the daily season alone: the data is long enough for a weekly one
    stats = {"AutoETS", "MSTL", "MSTL (24)", "AutoARIMA"} if available() else set()
    assert set(rows) == {"model", "naive", "seasonal naive (24)"} | stats
    assert rows["naive"]["mase"] == 1.0
    assert 0.8 <= rows["model"]["coverage"] <= 0.98
    for name in stats:
        assert rows[name]["mase"] > 0
        assert rows[name]["ahead_mase"] > 0
        assert 0.8 <= rows[name]["coverage"] <= 1.0  # adapted online, as the model's
    # Each one's margin to the model: against naive (MASE 1), the model's own MASE.
    margins = {margin["name"]: margin for margin in report["margins"]}
    assert set(margins) == set(rows) - {"model"}
    assert margins["naive"]["ratio"] == pytest.approx(rows["model"]["mase"])
    assert margins["naive"]["ahead_ratio"] == pytest.approx(rows["model"]["ahead_mase"])
    assert margins["naive"]["origins"] == 10  # the 10 day-ahead origins of the README
    # The tables people read, on a shorter tail (the baselines' refits are most of the time).
    human = run("evaluate", "--data", data, "--baselines", "--val-fraction", "0.05", cwd=tmp_path)
    assert "| forecaster | MASE, 1 step |" in human.stdout
    assert "| the model's MASE over | 1 step (95% interval) |" in human.stdout


BAD_RUNS = [
    (["train", "--window", "x"], 2, "argument --window: expected a whole number, got 'x'"),
    (["train", "--window", "0"], 2, "must be >= 1, got 0"),
    (["train", "--period", "-1"], 2, "argument --period: must be >= 0, got -1"),
    (["train", "--val-fraction", "1.5"], 2, "must be between 0 and 1"),
    (["launch"], 2, "invalid choice: 'launch'"),
    (["train", "--data", "csv:/no/such.csv"], 1, "cannot read /no/such.csv"),
    (["train", "--data", "cosine"], 2, "--data: expected sine, sines or csv:PATH, got 'cosine'"),
    (["train", "--data", "sine", "--window", "990"], 1, "has 800 points before its held-out tail"),
    (["train", "--data", "sine", "--period", "400"], 1, "forecasts that read 800 values and 400"),
    (["train", "--device", "tpu"], 2, "--device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["evaluate", "--model", "absent.st"], 1, "no model at absent.st: train one with"),
    (["evaluate", "--model", "junk.st"], 1, "junk.st: not a safetensors checkpoint"),
    # torch.set_num_threads(100000) was a segfault, with no word.
    (["train", "--threads", "100000"], 2, "argument --threads: must be at most 1,024, got 100000"),
    (["evaluate", "--threads", "1025"], 2, "argument --threads: must be at most 1,024, got 1025"),
    # Refused before the data is read (there is none here) or a model is trained.
    (
        ["train", "--data", "csv:/no/such.csv", "--out", "/proc/m.st"],
        1,
        "cannot write checkpoint /proc/m.st",
    ),
    (["train", "--data", "csv:/no/such.csv", "--out", "."], 1, "checkpoint .: it is a folder"),
    (
        ["train", "--data", "csv:/no/such.csv", "--out", "junk.st/m.st"],
        1,
        "cannot write checkpoint junk.st/m.st: junk.st is not a folder",
    ),
    (
        ["train", "--data", "csv:/no/such.csv", "--hidden", "5000"],
        2,
        "argument --hidden: must be at most 4,096 (a checkpoint's bound) (see attnlstm train",
    ),
    (["train", "--data", "csv:/no/such.csv", "--horizon", "1001"], 2, "--horizon: must be at"),
    (["train", "--data", "csv:/no/such.csv", "--layers", "17"], 2, "--layers: must be at most"),
    (["train", "--data", "csv:/no/such.csv", "--window", "1"], 2, "--window: must be at least 2"),
    (["train", "--data", "csv:/no/such.csv", "--period", "1"], 2, "--period: 1 step is no cycle"),
    (
        ["train", "--data", "sines", "--series", "30000000"],
        2,
        "--series: 30,000,000 sines of 1,000 points are more than the 10,000,000 values",
    ),
    (
        ["train", "--data", "csv:minutes.csv"],  # a day of minutes: horizon 1440
        1,
        "the model for period 1440: horizon 1440 is out of bounds (a whole number from 1 to "
        "1000): no checkpoint of it would load; pass a smaller --window or --horizon, or "
        "--period N (0: none)",
    ),
    (["worker", "--model", "absent.st"], 1, "no model at absent.st: train one with"),
    (["worker", "--max-batch", "0"], 2, "argument --max-batch: must be >= 1, got 0"),
    (["models", "list", "--events", "10001"], 2, "argument --events: must be at most 10,000"),
    # A flag the command does not know: the error named no command, and its --help none of
    # the command's flags.
    (
        ["worker", "--bogus"],
        2,
        "attnlstm worker: error: unrecognized arguments: --bogus (see attnlstm worker --help)",
    ),
    (
        ["models", "list", "--bogus", "x"],
        2,
        "attnlstm models list: error: unrecognized arguments: --bogus x",
    ),
    # 999,999,999 partitions ran until killed.
    (["bench", "--partitions", "5000"], 2, "argument --partitions: must be at most 4,096, got"),
    (["worker", "--redis-url", "http://h"], 2, "bad settings: redis_url: must start"),
    # redis-py took a URL with no host for localhost:6379, a server no one named.
    (["worker", "--redis-url", "redis:///0"], 2, "redis_url: it names no host (redis"),
    (["worker", "--redis-url", "redis://:pw@"], 2, "redis_url: it names no host ("),
    (["worker", "--redis-url", "unix://"], 2, "redis_url: it names no socket (unix://"),
    (["bench", "--redis-url", "redis://"], 2, "--redis-url: it names no host (redis://HOST:PORT)"),
    # A setting refused as a flag: a usage error, as the parser's refusals are (it was 1).
    (["worker", "--coverage", "1"], 2, "bad settings: coverage: Input should be less than 1 (see"),
    # ... and one that clashes with another setting (it was 1, too), said without
    # pydantic's words ("settings: Value error, ").
    (["worker", "--block-ms", "9000"], 2, "error: bad settings: block_ms (9000) must be at most"),
    (["worker", "--stand-in-anomalies", "maybe"], 2, "expected on or off, got 'maybe'"),
    (["worker", "--device", "gpu"], 2, "--device: expected auto, cpu, cuda or cuda:N"),
    (["worker", "--dead-stream", "sensors"], 2, "dead_stream and input_stream are both"),
    (["bench", "--device", "tpu"], 2, "--device: expected auto, cpu, cuda or cuda:N"),
    (["bench", "--runs", "models,gpu"], 2, "--runs: expected some of drains,latency,models, got"),
    (["bench", "--workers", "1,2", "--runs", "models"], 2, "not of a pool (--workers) (see"),
    (["bench", "--workers", "1", "--runs", "models"], 2, "not of a pool (--workers) (see"),
    # Flags the bench asked for would not use: they were dropped without a word.
    (
        ["bench", "--workers", "1", "--repeats", "9"],
        2,
        "--threads, --repeats are for the bench of one worker, not of a pool (--workers) (see",
    ),
    (["bench", "--partitions", "12"], 2, "--partitions is for a pool of workers (--workers) (see"),
    (["bench", "--no-cluster"], 2, "--no-cluster is for a pool of workers (--workers) (see"),
    (["bench", "--model", "m.st", "--runs", "models"], 2, "--model is not read by --runs models"),
    (["bench", "--runs", "models", "--seconds", "5"], 2, "--seconds is not read by --runs models"),
    (["bench", "--runs", "latency", "--repeats", "2"], 2, "--repeats is not read by --runs lat"),
    (
        ["bench", "--workers", "2", "--no-cluster", "--redis-url", "redis://h:1/0"],
        2,
        "--no-cluster is for the servers the bench starts, not --redis-url (see",
    ),
    # A file named in the URL that is not there: a connection lost, retried for ever.
    (
        ["worker", "--redis-url", "rediss://h:1/0?ssl_ca_certs=absent.crt"],
        2,
        "bad settings: redis_url: its ssl_ca_certs= names absent.crt, which does not exist (see",
    ),
    (
        ["bench", "--redis-url", "rediss://h:1/0?ssl_certfile=c.crt&ssl_keyfile=absent.key"],
        2,
        "--redis-url: its ssl_certfile= names c.crt, which does not exist (see",
    ),
    (["bench", "--redis-password-file", "pw"], 2, "--redis-password-file is for the user of"),
    (
        ["bench", "--redis-url", "redis://u:p@h:1/0", "--redis-password-file", "pw"],
        2,
        "--redis-url has a password already: keep one of the two (see",
    ),
    # A URL the pool's workers refused, after the raw clients had run on database 0.
    (
        ["bench", "--workers", "1", "--redis-url", "redis://h:1/l"],
        2,
        "--redis-url: what follows the host must be a database number (/0) (see",
    ),
    # Usage errors found as the command runs: exit 2, as the parser's, not 1.
    (["train", "--data", "bogus"], 2, "argument --data: expected sine, sines or csv:PATH"),
    (["plot", "--series", "abc"], 2, "--series: expected a whole number, got 'abc' (a series"),
    # Flags of other data, refused rather than ignored.
    (["train", "--data", "sines", "--column", "x"], 2, "--column is for --data csv:PATH, not"),
    (
        ["evaluate", "--series-column", "s", "--time-column", "t"],
        2,
        "--time-column, --series-column are for --data csv:PATH, not --data sine",
    ),
    (
        ["train", "--data", "csv:minutes.csv", "--value-column", "v"],
        2,
        "--value-column is for a long file, with --series-column",
    ),
    (
        ["train", "--data", "csv:minutes.csv", "--time-column", "when"],
        1,
        "minutes.csv: no column 'when'; it has ['time', 'value']",
    ),
    (["train", "--data", "sine", "--series", "4"], 2, "--series: for --data sines, not --data"),
    (["evaluate", "--series", "4"], 2, "--series: for --data sines, not --data sine"),
    (
        ["bench", "--redis-url", "rediss://h:1/0?ssl_cert_reqs=no", "--runs", "models"],
        2,
        "attnlstm bench: error: --redis-url: redis-py refuses its query: Invalid SSL "
        "Certificate Requirements Flag: no",
    ),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD_RUNS)
def test_user_errors_are_one_line_and_a_nonzero_exit(
    here: Callable[..., Ran], tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    (tmp_path / "junk.st").write_bytes(b"\x00" * 64)
    minutes = (f"2024-01-01T{t // 60:02d}:{t % 60:02d}:00,{t % 7}\n" for t in range(100))
    (tmp_path / "minutes.csv").write_text("time,value\n" + "".join(minutes))
    status, _, err = here(*args, "--threads", "1")
    assert status == code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0]


def test_train_writes_over_a_checkpoint_and_nothing_else(
    here: Callable[..., Ran], tmp_path: Path
) -> None:
    """`--out` was renamed onto whatever was there: the CSV trained on (its data lost),
    another library's model.safetensors, a device (`/dev/null` became a file), a link
    (`/dev/stdout`)."""
    rows = "".join(f"{t},{math.sin(t / 5):.4f}\n" for t in range(200))
    (tmp_path / "d.csv").write_text("t,a\n" + rows)
    data = (tmp_path / "d.csv").read_bytes()
    status, _, err = here("train", "--data", "csv:d.csv", "--epochs", "1", "--out", "d.csv")
    assert (status, err.strip()) == (
        1,
        "attnlstm train: error: --out d.csv holds something other than a checkpoint of "
        "attnlstm: not written over (remove it, or pass another --out)",
    )
    assert (tmp_path / "d.csv").read_bytes() == data
    os.mkfifo(tmp_path / "pipe")  # a device's stand-in that nothing is lost by
    status, _, err = here("train", "--data", "csv:d.csv", "--epochs", "1", "--out", "pipe")
    assert (status, err.strip()) == (
        1,
        "attnlstm train: error: cannot write checkpoint pipe: it is no regular file (a "
        "device, pipe or socket)",
    )
    assert stat.S_ISFIFO((tmp_path / "pipe").lstat().st_mode)
    (tmp_path / "link.st").symlink_to("d.csv")
    status, _, err = here("train", "--data", "csv:d.csv", "--epochs", "1", "--out", "link.st")
    assert (status, err.strip()) == (
        1,
        "attnlstm train: error: --out link.st is a link: pass the path of the file it names, "
        "or another --out",
    )
    assert (tmp_path / "link.st").is_symlink()
    for seed in ("0", "1"):  # a new file, then one written over
        args = ("--data", "csv:d.csv", "--epochs", "1", "--seed", seed, "--out", "m/m.st")
        status, out, err = here("train", *args, "--json")
        assert status == 0, err
        version = json.loads(out.splitlines()[-1])["version"]
        assert load(tmp_path / "m" / "m.st").version == version
    # The figures' --out, a file: "File exists" from a stream (from a checkpoint, said).
    status, _, err = here("plot", "--from-stream", "--series", "a", "--out", "d.csv")
    assert (status, err.strip()) == (
        1,
        "attnlstm plot: error: cannot write the figures into d.csv: it is not a folder",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # Settings that clash: exit 1, as if the environment had set them, until now.
        (["list", "--models-stream", "forecasts"], "models_stream and output_stream are both"),
        # The hint named `attnlstm models --help`, which has no --model-key-file.
        (["promote", "m.st", "--model-key-file", "absent.key"], "cannot read absent.key"),
    ],
)
def test_a_models_command_s_usage_error_names_its_action(
    here: Callable[..., Ran], args: list[str], message: str
) -> None:
    status, _, err = here("models", *args)
    prog = f"attnlstm models {args[0]}"
    assert status == 2
    assert re.fullmatch(
        f"{prog}: error: bad settings: .*{message}.* \\(see {prog} --help\\)\n", err
    )


def test_version_prints_the_installed_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`attnlstm --version` said that a command was required."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"attnlstm {metadata.version('attnlstm')}\n"


def test_a_url_option_the_redis_client_refuses_is_one_line(tmp_path: Path) -> None:
    """redis-py refuses it as it builds the connection, with a RedisError that no clause
    caught: a traceback. (No server is asked: the settings' check makes a connection of
    the URL, without opening it.)"""
    url = "rediss://h:1/0?ssl_cert_reqs=no"
    proc = subprocess.run(
        [*CLI, "replay", "--fast", "--points", "2", "--redis-url", url],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        "attnlstm replay: error: bad settings: redis_url: redis-py refuses its "
        "query: Invalid SSL Certificate Requirements Flag: no (see attnlstm replay --help)\n",
    )


def test_a_server_that_is_not_redis_is_named_as_the_suspect(here: Callable[..., Ran]) -> None:
    """An HTTP server at the URL's port: redis-py's "Protocol error, got "<" as reply type
    byte" was all the command said."""

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass  # (on stderr, the command's)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"redis://127.0.0.1:{server.server_address[1]}/0"
    try:
        for argv in (["models", "list"], ["bench", "--runs", "drains"]):
            status, _, err = here(*argv, "--redis-url", url)
            assert status == 1, err
            assert err.startswith(f"attnlstm {argv[0]}: error: "), err
            assert err.endswith(
                ': Protocol error, got "<" as reply type byte: is the server at the URL\'s '
                "host and port a Redis?\n"
            ), err
    finally:
        server.shutdown()
        server.server_close()


def test_worker_settings_come_from_the_environment_and_flags_win(tmp_path: Path) -> None:
    env = {**os.environ, "ATTNLSTM_MAX_BATCH": "0"}
    proc = subprocess.run(
        [*CLI, "worker"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "attnlstm worker: error: bad settings: max_batch: Input should be greater than or "
        "equal to 1"
    )
    # The flag overrides the bad variable; what stops the worker now is the missing model.
    proc = subprocess.run(
        [*CLI, "worker", "--max-batch", "8", "--model", "model.safetensors"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "no model at model.safetensors" in proc.stderr


@pytest.mark.parametrize(
    ("given", "stand_in"), [([], True), (["--stand-in-anomalies", "off"], False)]
)
def test_anomalies_are_stood_in_for_unless_turned_off(given: list[str], stand_in: bool) -> None:
    args = build_parser().parse_args(["worker", *given])
    assert worker_settings(args).stand_in_anomalies is stand_in


def test_a_taken_metrics_port_is_a_one_line_error(tmp_path: Path, model_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("worker", "--model", str(model_file), "--metrics-port", str(port), cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        f"cannot serve metrics on 127.0.0.1:{port}: Address already in use; choose another "
        "with --metrics-port (0 turns them off)"
    )


def test_a_metrics_host_that_is_no_address_here_names_the_host(
    tmp_path: Path, model_file: Path, redis_url: str
) -> None:
    """It said to choose another --metrics-port, which was not the problem."""
    port = free_port()
    proc = run(
        "worker",
        *("--model", str(model_file), "--redis-url", redis_url),
        *("--metrics-host", "256.1.1.1", "--metrics-port", str(port)),
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert f"cannot serve metrics on 256.1.1.1:{port}: " in last
    assert last.endswith(
        "; choose another with --metrics-host: an address of this machine "
        "(--metrics-port 0 turns them off)"
    )


def test_a_worker_with_no_model_anywhere_and_no_fine_tuning_says_what_to_do(
    tmp_path: Path,
) -> None:
    """On the embedded server: nothing in its store, so nothing to serve (and no word of
    a Redis out of step: it said "stopped (not in step with Redis ...)" first)."""
    proc = run("worker", "--finetune-interval-s", "0", "--metrics-port", "0", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "not in step" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "attnlstm worker: error: no model: none in the store (models), none given; pass "
        "--model PATH (train one with: attnlstm train), or set a finetune interval for a "
        "cold start"
    )


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_the_device_setting_takes_what_resolve_device_takes(device: str) -> None:
    args = build_parser().parse_args(["worker", "--device", device])
    assert worker_settings(args).device == device


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:", "cuda:x", "cuda0"])
def test_the_device_setting_refuses_any_other_name(
    device: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a flag, a usage error; from the environment, a bad setting."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--device", device])
    assert "argument --device: expected auto, cpu, cuda or cuda:N" in capsys.readouterr().err
    monkeypatch.setenv("ATTNLSTM_DEVICE", device)
    args = build_parser().parse_args(["worker"])
    with pytest.raises(ValueError, match="bad settings: device: String should match pattern"):
        worker_settings(args)


@pytest.mark.parametrize(("count", "device"), [(1, "cuda:1"), (2, "cuda:2"), (2, "cuda:07")])
def test_a_gpu_index_past_the_machines_gpus_is_refused_as_the_worker_starts(
    monkeypatch: pytest.MonkeyPatch, count: int, device: str
) -> None:
    """The settings check takes any ``cuda:N``; what this machine has is checked where the
    device is resolved, before the model loads (torch itself would fail later, on the first
    tensor moved there, with "invalid device ordinal"). The GPUs are made up here: this
    check needs no GPU to run, only the count torch reports."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(ValueError, match=rf"this machine has {count} CUDA GPU\(s\): cuda:0 to"):
        resolve_device(device)
    assert resolve_device(f"cuda:{count - 1}") == f"cuda:{count - 1}"


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc to read")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_start_up_stops_the_worker_cleanly(
    sig: signal.Signals, model_file: Path, tmp_path: Path
) -> None:
    """A stop signal as soon as the process catches one, while it still imports torch and
    loads its model: once the worker exists it stops, exit 0, and the embedded server it
    started is gone with its directory. Before, SIGTERM then killed it outright (and as a
    container's PID 1, was lost: `docker stop` waited, then killed it with its leases),
    and a hang-up at any time left the embedded server's directory behind."""
    cmd = [*CLI, "worker", "--model", str(model_file), "--metrics-port", "0", "--device", "cpu"]
    env = {**worker_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: proc.poll() is not None or _catches(proc.pid, sig))
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "libtorch" not in maps  # caught before torch is imported: seconds before
    assert proc.returncode == 0, err[-3000:]
    assert "stopping: finishing the batch in flight" in err
    assert "started embedded valkey" in err
    assert not list(tmp_path.glob("attnlstm-redis-*"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU asked for")
def test_a_device_this_machine_lacks_stops_the_worker_as_it_starts(tmp_path: Path) -> None:
    """As deploy/docker-compose.gpu.yml promises: before the worker connects or waits for
    a model (none here: with a cold start, or from the store)."""
    env = {**os.environ, "ATTNLSTM_DEVICE": "cuda"}
    proc = subprocess.run(
        [*CLI, "worker", "--burst", "--metrics-port", "0"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "attnlstm worker: error: device 'cuda' asked for, but this torch build sees no CUDA GPU"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["replay", "--rate", "100", "--seconds", "-5"], "--seconds: must be a positive number"),
        (["replay", "--rate", "100", "--seconds", "0"], "--seconds: must be a positive number"),
        (["replay", "--rate", "100", "--seconds", "inf"], "--seconds: expected a finite number"),
        (["replay", "--rate", "100", "--seconds", "nan"], "--seconds: expected a finite number"),
        (["replay", "--rate", "nan"], "--rate: expected a finite number, got 'nan'"),
        (["replay", "--fast", "--noise", "-1"], "--noise: must be >= 0, got '-1'"),
        (["replay", "--fast", "--noise", "nan"], "--noise: expected a finite number"),
        (["replay", "--fast", "--anomaly-rate", "nan"], "--anomaly-rate: expected a finite"),
        (["replay", "--fast", "--anomaly-rate", "1.5"], "--anomaly-rate: must be from 0 to 1"),
        (["replay", "--fast", "--bad-rate", "-0.1"], "--bad-rate: must be from 0 to 1"),
        (["replay", "--fast", "--freq", "0.1", "inf"], "--freq: expected a finite number"),
        (["replay", "--fast", "--drift-factor", "nan", "2"], "--drift-factor: expected a finite"),
        (["demo", "--seconds", "-5"], "--seconds: must be a positive number"),
        (["demo", "--seconds", "inf"], "--seconds: expected a finite number"),
        (["demo", "--rate", "inf"], "--rate: expected a finite number"),
        (["demo", "--noise", "-1"], "--noise: must be >= 0, got '-1'"),
        (["bench", "--seconds", "nan"], "--seconds: expected a finite number"),
        (["train", "--lr", "nan"], "--lr: expected a finite number"),
        (["train", "--lr", "0"], "--lr: must be a positive number"),
        (["demo", "--finetune-interval-s", "-1"], "--finetune-interval-s: must be >= 0"),
        (["train", "--lr", "1e300"], "--lr: must be at most 1, got '1e300'"),
        (["train", "--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["evaluate", "--seed", str(2**64)], f"--seed: must be at most {2**64 - 1}, got"),
        (["replay", "--fast", "--seed", "-1"], "--seed: must be >= 0, got -1"),
        (["bench", "--workers", "1,100000"], f"--workers: must be at most {MAX_POOL_WORKERS}"),
        (["worker", "--max-wait-ms", "inf"], "--max-wait-ms: expected a finite number"),
        (["worker", "--series-idle-s", "inf"], "--series-idle-s: expected a finite number"),
        (["worker", "--checkpoint-interval-s", "inf"], "--checkpoint-interval-s: expected a"),
        (["worker", "--finetune-interval-s", "inf"], "--finetune-interval-s: expected a finite"),
        (["worker", "--drift-ratio", "nan"], "--drift-ratio: expected a finite number"),
        (["worker", "--anomaly-threshold", "inf"], "--anomaly-threshold: expected a finite"),
        (["worker", "--coverage", "nan"], "--coverage: expected a finite number"),
        (["worker", "--promote-margin", "inf"], "--promote-margin: expected a finite number"),
        (["evaluate", "--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"),
        (["plot", "--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"),
        (["demo", "--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_values_out_of_range_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as the arguments are read (exit 2): --seconds -5 once made a replay wait
    forever, inf and nan ended in a traceback or a bare message, 0 wrote nothing, and
    --workers 1,1000 would have started a thousand processes."""
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]


def _with_db(url: str, db: int) -> str:
    return f"{url}{'&' if '?' in url else '?'}db={db}"


REPLAY_TWO = ["replay", "--fast", "--points", "2"]


@pytest.mark.parametrize(
    ("argv", "refusal", "said", "fix"),
    [
        (REPLAY_TWO, "db", "DB index is out of range", "databases"),
        (["models", "list"], "db", "DB index is out of range", "databases"),
        (
            ["plot", "--from-stream", "--series", "s0"],
            "db",
            "DB index is out of range",
            "databases",
        ),
        (REPLAY_TWO, "user", "no permissions to run", "users.acl.template"),
        (["models", "list"], "user", "no permissions to run", "users.acl.template"),
        (["models", "list"], "password", "invalid username-password", "PASSWORD_FILE"),
        # The password from a file: it said to give one in the URL, or in a file.
        (
            ["plot", "--from-stream", "--series", "s0"],
            "password file",
            "invalid username-password",
            "; the password in pw.txt is not the one of the URL's user: check both",
        ),
        ([*REPLAY_TWO, "--stream", "{prefix}text"], "", "WRONGTYPE", "name other streams"),
    ],
)
def test_a_command_redis_refuses_is_one_line_with_what_to_fix(
    argv: list[str],
    refusal: str,
    said: str,
    fix: str,
    redis_url: str,
    redis_client: redis.Redis,
    stream_prefix: str,
    tmp_path: Path,
) -> None:
    """A database the server does not have, a user without the right, a stream name
    that holds a string: what Redis said and what to change, exit 1, no traceback."""
    user = stream_prefix.rstrip(":") + "-reader"  # an ACL user of this test's own
    url = {
        "db": _with_db(redis_url, 9999),
        "user": as_user(redis_url, user, "pw"),
        "password": as_user(redis_url, user, "not-pw"),
        "password file": as_user(redis_url, user),
        "": redis_url,
    }[refusal]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTNLSTM_")}
    if refusal == "password file":
        (tmp_path / "pw.txt").write_text("not-pw\n")
        env["ATTNLSTM_REDIS_PASSWORD_FILE"] = "pw.txt"
    redis_client.set(f"{stream_prefix}text", "not a stream")
    redis_client.acl_setuser(user, enabled=True, passwords=["+pw"], categories=["+@connection"])
    try:
        proc = subprocess.run(
            [*CLI, *(arg.format(prefix=stream_prefix) for arg in argv), "--redis-url", url],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        redis_client.acl_deluser(user)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    where, _, what = lines[0].partition(" refused: ")
    assert where.startswith(f"attnlstm {argv[0]}: error: Redis at ")
    assert said in what
    assert fix in what


@pytest.mark.parametrize(
    ("where", "said"),
    [
        ("unreachable", "error: cannot reach Redis: "),
        ("db", "error: Redis refused: DB index"),
        # The URL alone: bench reads no ATTNLSTM_REDIS_PASSWORD_FILE (it was named).
        ("password", "invalid username-password pair or user is disabled.; give the URL's "),
    ],
)
def test_bench_on_a_redis_it_cannot_use_ends_in_one_line(
    where: str, said: str, redis_url: str, tmp_path: Path
) -> None:
    """`bench --redis-url` (and demo's ATTNLSTM_REDIS_URL) go through no Redis helper of
    the other commands: a server that is not there, or refuses, ended in a traceback."""
    url = {
        "unreachable": f"redis://127.0.0.1:{free_port()}/0",
        "db": _with_db(redis_url, 9999),
        "password": as_user(redis_url, "nobody", "wrong"),
    }[where]
    proc = subprocess.run(
        [*CLI, "bench", "--redis-url", url, "--runs", "models", "--entries", "100"],
        cwd=tmp_path,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert said in proc.stderr.strip().splitlines()[-1]
    assert "ATTNLSTM_" not in proc.stderr


def test_json_output_is_standard_json(small_model: dict[str, Any], workdir: Path) -> None:
    """The naive forecast has no interval: its coverage was NaN, printed as the bare word
    NaN, which no strict JSON parser takes. Now null."""

    def refuse(word: str) -> None:
        raise ValueError(f"not JSON: {word}")

    proc = run("evaluate", "--model", "m.st", "--baselines", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1], parse_constant=refuse)
    rows = {row["name"]: row for row in report["baselines"]}
    assert rows["naive"]["coverage"] is None
    assert rows["model"]["coverage"] > 0


@pytest.mark.skipif(not available(), reason="needs statsforecast (the baselines extra)")
def test_a_period_of_one_step_leaves_the_statistical_baselines_out(
    small_model: dict[str, Any], workdir: Path
) -> None:
    """MSTL of seasons 1 and 7 died inside statsforecast: a traceback, after AutoETS ran."""
    proc = run("evaluate", "--model", "m.st", "--baselines", "--period", "1", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert "AutoETS, MSTL and AutoARIMA need a period of 2 steps or more" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {row["name"] for row in report["baselines"]} == {"model", "naive", "seasonal naive (1)"}


def test_a_period_of_zero_is_none_for_evaluate_as_for_train(
    small_model: dict[str, Any], workdir: Path
) -> None:
    """`train --period 0` takes none; evaluate refused 0 (must be >= 1)."""
    proc = run("evaluate", "--model", "m.st", "--baselines", "--period", "0", "--json", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    if available():
        assert "AutoETS, MSTL and AutoARIMA need the data's period: --period 0 leaves them out" in (
            proc.stderr
        )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {row["name"] for row in report["baselines"]} == {"model", "naive"}


def test_a_reader_gone_ends_the_command_quietly(small_model: dict[str, Any], workdir: Path) -> None:
    """`attnlstm evaluate | true`: writing the report fails (EPIPE), which was a traceback,
    and another as Python flushed stdout at exit."""
    read, write = os.pipe()
    os.close(read)  # gone before the command writes
    try:
        proc = subprocess.run(
            [*CLI, "evaluate", "--model", "m.st", "--threads", "1"],
            cwd=workdir,
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=240,
            check=False,
        )
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (1, "")


@pytest.mark.parametrize(
    "meta",
    [
        {"train_loss": 5, "val_loss": 5},
        {"train_loss": {"a": 1}, "val_loss": {"a": 1}},
        {"train_loss": [1.0, 0.5], "val_loss": [1.0]},
        {"train_loss": [math.nan], "val_loss": [1.0]},  # a training that diverged
        {"train_loss": [10**400], "val_loss": [1.0]},  # JSON takes it; a float cannot
    ],
)
def test_plot_draws_no_loss_curves_from_a_meta_that_holds_none(
    here: Callable[..., Ran], meta: dict[str, Any], trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    """Its hash valid, a checkpoint's meta may hold anything: these ended in a TypeError
    or matplotlib's error, as tracebacks, or drew NaN."""
    save(tmp_path / "m.st", trained_sines, meta)
    status, out, err = here("plot", "--model", "m.st", "--out", "figs", "--json")
    assert status == 0
    report = json.loads(out.splitlines()[-1])
    assert sorted(Path(p).name for p in report["written"]) == ["attention.png", "forecast.png"]
    assert err.strip() == (
        "attnlstm plot: no loss.png: the checkpoint's meta holds no train_loss and val_loss "
        "of as many finite numbers"
    )


def test_plot_refuses_data_too_short_for_the_model(
    small_model: dict[str, Any], workdir: Path
) -> None:
    """As evaluate does: it wrote empty figures and exited 0."""
    (workdir / "short.csv").write_text("t,v\n" + "".join(f"{t},{t % 3}\n" for t in range(15)))
    proc = run("plot", "--data", "csv:short.csv", "--model", "m.st", "--out", "short", cwd=workdir)
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "attnlstm plot: error: too little data to score: the shortest series has 15 points"
    )
    assert not (workdir / "short").exists()


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action, as a process started from a shell prompt has it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# A signal (Ctrl-C's, a stop's), made to come while the CLI imports one module: the
# import's first look-up raises it in the process itself.
SIGNAL_DURING_IMPORT = """
import signal, sys

class Signal:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.{sig})
        return None

sys.meta_path.insert(0, Signal())
from worker.cli import main
sys.exit(main({argv!r}))
"""


def _signalled_during_import(
    module: str, sig: str, argv: list[str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI[0], "-c", SIGNAL_DURING_IMPORT.format(module=module, sig=sig, argv=argv)],
        cwd=cwd,
        env={**worker_env(), "TMPDIR": str(cwd)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=_as_from_a_terminal,
    )


@pytest.mark.parametrize(
    ("module", "sig"),
    [
        ("numpy", "SIGINT"),  # the parser's, as the arguments are read
        ("redis", "SIGINT"),  # the commands', once they are
        ("numpy", "SIGTERM"),
        ("numpy", "SIGHUP"),
    ],
)
def test_a_signal_while_the_command_line_starts_is_one_line_and_exit_130(
    module: str, sig: str, redis_url: str, stream_prefix: str, tmp_path: Path
) -> None:
    """In its first 0.2-0.4 s any command ended in a KeyboardInterrupt traceback from
    `import redis` (or numpy's): those imports ran before run()'s handler. A SIGTERM or
    SIGHUP there killed it (exit 143, 129), and one to a container's PID 1 was lost."""
    argv = ["replay", "--fast", "--points", "2", "--redis-url", redis_url]
    argv += ["--stream", f"{stream_prefix}in"]
    proc = _signalled_during_import(module, sig, argv, tmp_path)
    assert (proc.returncode, proc.stderr) == (130, "attnlstm replay: interrupted\n")


def test_a_stop_signal_as_the_parser_is_imported_stops_the_worker_cleanly(
    model_file: Path, tmp_path: Path
) -> None:
    """Before the worker's handler: it was set once the arguments were read (0.1 s)."""
    argv = ["worker", "--model", str(model_file), "--metrics-port", "0", "--device", "cpu"]
    proc = _signalled_during_import("numpy", "SIGTERM", argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopping: finishing the batch in flight" in proc.stderr
    assert not list(tmp_path.glob("attnlstm-redis-*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--from-stream", "--series", "s", "--data", "sines", "--model", "m.st"],
            "--data, --model are for a plot from a checkpoint, not --from-stream",
        ),
        (
            ["--from-stream", "--series", "s", "--seed", "0"],
            "--seed is for a plot from a checkpoint, not --from-stream",
        ),
        (["--last", "5", "--points", "9"], "--last, --points are for --from-stream"),
    ],
)
def test_plot_refuses_the_other_sources_flags(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """With --from-stream, --data and --model were ignored: the plot drew what the
    streams held, whatever model the user named."""
    proc = subprocess.run(
        [*CLI, "plot", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        f"attnlstm plot: error: {message} (see attnlstm plot --help)\n",
    )


def test_plot_from_stream_without_a_series_is_a_usage_error(redis_url: str, tmp_path: Path) -> None:
    """It exited 1, as for what a system holds, not 2 as for the arguments given."""
    proc = subprocess.run(
        [*CLI, "plot", "--from-stream", "--redis-url", redis_url, "--out", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stderr) == (
        2,
        "attnlstm plot: error: plot --from-stream needs --series ID: the series to draw "
        "(see attnlstm plot --help)\n",
    )
