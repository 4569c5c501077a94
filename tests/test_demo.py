"""`attnlstm demo` and `attnlstm plot --from-stream`, run as a user runs them."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib.axes
import numpy as np
import pytest
import redis

from attnlstm.checkpoint import save
from attnlstm.model import AttentionLSTM
from attnlstm.plots import plot_latency, plot_series_forecasts
from attnlstm.synthetic import SineSpec, sine_steps
from tests.conftest import CLI
from tests.helpers import drain, fill, free_port, gone, settings_for, wait_for, worker_env
from worker.cli.parser import build_parser
from worker.embedded import EmbeddedServer
from worker.keys import Keys
from worker.online.store import ModelStore
from worker.tools import demo as demo_tool
from worker.tools import readback
from worker.tools.demo import DEMO_KEYS
from worker.tools.replay import sine_entries

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def demo_dir(tmp_path: Path, trained_sines: AttentionLSTM) -> Path:
    """An output folder holding a cached demo model, so that the demo skips training."""
    save(tmp_path / "model.safetensors", trained_sines, {"data": "sines"})
    return tmp_path


def test_demo_runs_the_whole_product_and_reports_what_it_saw(
    demo_dir: Path, trained_sines: AttentionLSTM
) -> None:
    cmd = [*CLI, "demo", "--seconds", "4", "--series", "10", "--rate", "500", "--json"]
    proc = _run([*cmd, "--out", str(demo_dir)], demo_dir, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "reusing the demo model" in proc.stderr

    # What the replay wrote: the first 4 s x 500/s of the seeded sines, bad ones among them.
    spec = SineSpec(n_series=10, n_points=201)
    written = list(itertools.islice(sine_entries(spec, seed=1, bad_rate=0.002), 2000))
    good = [e for e in written if e[1].startswith(b"sine-")]
    window = trained_sines.config.window
    per_series = [sum(e[1] == f"sine-{j}".encode() for e in good) for j in range(10)]
    assert report["entries"] == 2000
    assert report["dead"] == len(written) - len(good) > 0
    assert report["forecasts"] == sum(n - window + 1 for n in per_series)
    assert report["scored"] == report["forecasts"] - 10  # each series' last has no actual yet
    assert report["mae"] < report["naive_mae"] / 3  # a briefly trained model, see conftest
    assert 0 < report["p50_latency_ms"] <= report["p99_latency_ms"]
    assert report["interrupted"] is False
    for name in ("forecasts.png", "attention.png", "latency.png"):
        assert (demo_dir / name).read_bytes()[:8] == PNG


def test_an_out_that_is_a_file_stops_the_demo_before_it_trains(tmp_path: Path) -> None:
    """It trained for 15 s, then could not write its model there."""
    (tmp_path / "t.csv").write_text("time,v\n")
    proc = _run([*CLI, "demo", "--out", "t.csv"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "attnlstm demo: error: --out t.csv is a file: the demo writes into a folder "
        "(see attnlstm demo --help)"
    )


def test_an_out_folder_the_demo_cannot_write_into_stops_it_before_it_trains(
    tmp_path: Path,
) -> None:
    """One under a file, here (a read-only one alike): it trained, then failed writing
    its model; with a model there already, it ran the whole replay, then failed drawing."""
    (tmp_path / "t.csv").write_text("time,v\n")
    proc = _run([*CLI, "demo", "--out", "t.csv/out"], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "attnlstm demo: error: cannot write into --out t.csv/out: Not a directory"
    )


def test_sines_the_replay_would_refuse_stop_the_demo_before_it_trains(tmp_path: Path) -> None:
    """60 s at 500 entries/s over 50 series is 601 points a series: a drift at 5000 is
    refused in one line before a model is trained or a server started, not by the
    replay's process once the worker runs."""
    proc = _run([*CLI, "demo", "--drift-at", "5000", "--out", str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "attnlstm demo: error: the sines to replay (601 points a series: --seconds x rate / "
        "--series): drift_at (--drift-at) must lie inside the series' 601 points (1 to 600), "
        "got 5000 (see attnlstm demo --help)"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_fails_at_its_start_stops_the_demo_then(demo_dir: Path) -> None:
    """A user whose rights lack FUNCTION LOAD: the worker's thread died at its start,
    and the demo said so only once its whole replay had run, and a minute more."""
    with EmbeddedServer(port=free_port()) as server:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser(
            "demo", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
            commands=["+@all", "-function|load"],
        )  # fmt: skip
        url = server.tcp_url.replace("redis://", "redis://demo:pw@")
        proc = _run(
            [*CLI, "demo", "--seconds", "60", "--series", "5", "--out", str(demo_dir)],
            demo_dir,
            env=worker_env() | {"ATTNLSTM_REDIS_URL": url},
        )
        replayed = admin.xlen(f"{DEMO_KEYS.input}")
    assert proc.returncode == 1
    assert "FUNCTION" in proc.stderr.strip().splitlines()[-1].upper()
    assert replayed < 60 * 500 / 2  # the replay stopped with the worker, not at its end


def test_the_demo_deletes_the_model_versions_its_last_run_stored(demo_dir: Path) -> None:
    """It deleted the list of versions and left each version's checkpoint and signature
    behind, on a shared Redis: a day-ahead model is hundreds of KB a fine-tune."""
    keys = DEMO_KEYS
    with EmbeddedServer(port=free_port()) as server:
        client = redis.Redis.from_url(server.url)
        client.lpush(keys.versions, "feedc0de")
        client.set(keys.model("feedc0de"), b"checkpoint bytes")
        client.set(keys.model_signature("feedc0de"), b"signature")
        proc = _run(
            [*CLI, "demo", "--seconds", "2", "--series", "5", "--out", str(demo_dir)],
            demo_dir,
            env=worker_env() | {"ATTNLSTM_REDIS_URL": server.tcp_url},
        )
        assert proc.returncode == 0, proc.stderr
        left = client.exists(keys.model("feedc0de"), keys.model_signature("feedc0de"))
    assert left == 0


def test_the_demo_reads_every_model_event(redis_client: redis.Redis, stream_prefix: str) -> None:
    """Not the first 100: a long demo's later promotions went unseen in its figures."""
    keys = Keys.prefixed(stream_prefix)
    for k in range(250):
        redis_client.xadd(keys.models, {"event": "promoted", "k": str(k)})
    events = demo_tool._events(ModelStore(redis_client, keys, keep=1, source="test"))
    assert [e[b"k"] for e in events if e is not None] == [b"%d" % k for k in range(250)]


def _as_from_a_terminal() -> None:
    """Ctrl-C's default action, as a process started from a shell prompt has it. A
    test run started in the background by a shell without job control (a CI script's
    `&`) ignores SIGINT, and its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_the_demo_with_the_summary_so_far(demo_dir: Path) -> None:
    cmd = [*CLI, "demo", "--seconds", "120", "--series", "10", "--json", "--out", str(demo_dir)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=demo_dir,
        preexec_fn=_as_from_a_terminal,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the embedded server's address, once it is up
            if found := re.search(r"started embedded .* at (unix://\S+)", line):
                break
        assert found, "the demo never said where its server is"
        with redis.Redis.from_url(found[1]) as server:  # forecasts are flowing
            wait_for(lambda: server.xlen(DEMO_KEYS.output) >= 500, what="the demo's forecasts")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err  # the summary so far, and cut short
    assert err.endswith("attnlstm demo: interrupted\n")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert 500 <= report["forecasts"] < 120 * 500
    assert "Traceback" not in err
    # The replay's process, stopped, left tqdm's lock (a semaphore) to the tracker.
    assert "leaked semaphore" not in err
    assert (demo_dir / "forecasts.png").is_file()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc to read")
def test_ctrl_c_as_the_replay_starts_is_no_traceback(demo_dir: Path) -> None:
    """Ctrl-C reaches the whole process group, the replay's process too, which imports
    torch for 1-2 s before it ran a line of its own: it died of a KeyboardInterrupt in
    that import, a traceback on the demo's stderr. Here Ctrl-C reaches that process
    first, while it loads torch (the demo, stopping at once, killed it before it could
    print one), and the demo once the replay writes, or has died."""
    demo = _Demo(demo_dir, "--seconds", "120", env=_env(demo_dir / "tmp"))
    try:
        replay: list[int] = []

        def importing() -> bool:
            replay[:] = [
                pid
                for pid, cmd in _children(demo.proc.pid).items()
                if "spawn_main" in cmd and _loads_torch(pid)
            ]
            return bool(replay) or demo.proc.poll() is not None

        wait_for(importing, what="the replay's process to load torch")
        os.kill(replay[0], signal.SIGINT)
        found = re.search(r"started embedded .* at (unix://\S+)", "".join(demo.lines))
        assert found, "".join(demo.lines)
        with redis.Redis.from_url(found[1]) as server:
            wait_for(
                lambda: gone(replay[0]) or server.xlen(DEMO_KEYS.input) > 0,
                what="the replay to write, or to die",
            )
        demo.proc.send_signal(signal.SIGINT)
        report, err = demo.end()
    finally:
        demo.kill()
    assert demo.proc.returncode == 130, err
    assert "Traceback" not in err
    assert report["interrupted"] is True


def _loads_torch(pid: int) -> bool:
    """A library of torch's is mapped into the process (gone: False)."""
    try:
        return "/torch/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_plot_from_stream_draws_one_series_of_a_running_system(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    values = sine_steps(5, 80, seed=4)
    fill(redis_client, keys.input, values)
    drain(settings_for(redis_url, keys), trained_sines)
    env = worker_env() | {
        "ATTNLSTM_INPUT_STREAM": keys.input,
        "ATTNLSTM_OUTPUT_STREAM": keys.output,
    }
    base = [*CLI, "plot", "--from-stream", "--redis-url", redis_url, "--out", str(tmp_path)]
    proc = subprocess.run(
        [*base, "--series", "s3", "--json"], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    forecasts = 80 - trained_sines.config.window + 1
    assert report["series"] == "s3"
    assert report["forecasts"] == forecasts
    assert report["scored"] == forecasts - 1
    assert report["mae"] < report["naive_mae"]
    for name in ("forecasts.png", "attention.png", "latency.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG

    missing = subprocess.run(
        [*base, "--series", "nope"], capture_output=True, text=True, env=env, check=False
    )
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "attnlstm plot: error: no forecast for series 'nope' among the last 100,000 entries "
        f"of {keys.output}"
    )


def test_plot_from_stream_skips_and_counts_entries_that_are_no_forecast(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """Another producer's entry on the output stream was a KeyError and a traceback."""
    fill(redis_client, keys.input, sine_steps(2, 40, seed=4))
    drain(settings_for(redis_url, keys), trained_sines)
    foreign: list[dict[str, str | bytes]] = [
        {"hello": "world"},  # no series
        {"series": "s1"},  # no src, yhat, attn
        {"series": b"\xff", "src": "1-0", "yhat": "[1]", "attn": "[1]"},
        {"series": "s1", "src": "1-0", "yhat": "not json", "attn": "[1]"},
        {"series": "s1", "src": "oops", "yhat": "[1]", "attn": "[1]"},
        {"series": "s1", "src": "1-0", "yhat": "[]", "attn": "[1]"},
        {"series": "s1", "src": "1-0", "yhat": "[1]", "attn": '["a"]'},
        {"series": "s0", "yhat": "x"},  # another series': not read, not counted
    ]
    for fields in foreign:
        redis_client.xadd(keys.output, fields)  # type: ignore[arg-type]
    env = worker_env() | {
        "ATTNLSTM_INPUT_STREAM": keys.input,
        "ATTNLSTM_OUTPUT_STREAM": keys.output,
    }
    cmd = [*CLI, "plot", "--from-stream", "--redis-url", redis_url, "--out", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--series", "s1", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["skipped"] == 7
    assert report["forecasts"] == 40 - trained_sines.config.window + 1


def test_plot_from_stream_of_a_partitioned_stream_read_as_one_says_to_pass_partitions(
    redis_url: str, keys: Keys, tmp_path: Path
) -> None:
    """A stream written in 4 partitions, drawn without --partitions: the series was "not
    among the last entries" of the one stream read, and nothing said why."""
    env = worker_env() | {
        "ATTNLSTM_INPUT_STREAM": keys.input,
        "ATTNLSTM_OUTPUT_STREAM": keys.output,
    }
    replay = [*CLI, "replay", "--redis-url", redis_url, "--fast", "--series", "4"]
    done = subprocess.run(
        [*replay, "--points", "5", "--partitions", "4"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    plot = [*CLI, "plot", "--from-stream", "--redis-url", redis_url, "--out", str(tmp_path)]
    done = subprocess.run(
        [*plot, "--series", "sine-3"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().endswith(
        f"{keys.partitions} says the stream is written in 4 partitions: pass --partitions 4"
    ), done.stderr


def test_a_forecast_an_hour_late_is_drawn_in_a_few_bins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The latency histogram had a bin a millisecond up to the slowest forecast: one an
    hour late was 3.6 M bins, minutes and GBs to draw."""
    bins: list[np.ndarray] = []
    hist = matplotlib.axes.Axes.hist

    def counted(ax: matplotlib.axes.Axes, x: Any, **kwargs: Any) -> Any:
        bins.append(np.asarray(kwargs["bins"]))
        assert bins[-1].size <= 200, f"{bins[-1].size} bins"  # before drawing them
        return hist(ax, x, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", counted)
    latency = np.array([0.0, 3.0, 5.0, 8.0, 3_600_000.0])
    plot_latency(latency, tmp_path / "latency.png", title="one forecast an hour late")
    (edges,) = bins
    assert np.histogram(latency, edges)[0].sum() == latency.size  # every one drawn
    assert (tmp_path / "latency.png").read_bytes()[:8] == PNG


class _Demo:
    """`attnlstm demo` run as a user runs it, its stderr read as it comes (on a server of
    its own, embedded, unless ``env`` names one)."""

    def __init__(self, out: Path, *args: str, env: dict[str, str]) -> None:
        cmd = [*CLI, "demo", "--series", "10", "--finetune-interval-s", "0", "--json"]
        self.proc = subprocess.Popen(
            [*cmd, "--out", str(out), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=out,
            preexec_fn=_as_from_a_terminal,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def said(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def forecasting(self, url: str | None = None) -> str:
        """Until forecasts flow (on ``url``; None: the embedded server it says it
        started); the server's URL."""
        if url is None:
            wait_for(lambda: self.said("started embedded") or self.proc.poll() is not None)
            found = re.search(r"started embedded .* at (unix://\S+)", "".join(self.lines))
            assert found, "".join(self.lines)
            url = found[1]
        with redis.Redis.from_url(url) as server:
            wait_for(lambda: server.xlen(DEMO_KEYS.output) >= 100, what="the demo's forecasts")
        return url

    def end(self, timeout: float = 60) -> tuple[dict[str, Any], str]:
        """Its report (empty: it printed none) and stderr, once it exits."""
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read().strip()
        return (json.loads(out.splitlines()[-1]) if out else {}), "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _env(tmp: Path, **settings: str) -> dict[str, str]:
    """The demo's environment: ``tmp`` its TMPDIR, and ATTNLSTM_ ``settings``."""
    tmp.mkdir(exist_ok=True)
    return worker_env() | {"TMPDIR": str(tmp)} | {f"ATTNLSTM_{k}": v for k, v in settings.items()}


def test_ctrl_c_again_while_the_demo_stops_cannot_hang_it(demo_dir: Path) -> None:
    """More Ctrl-C while the demo stops: one that landed in its wait for the replay
    skipped the worker's stop, the embedded server went, and the worker's thread retried
    forever on it: the demo never exited. Ctrl-C comes every 5 ms until the worker says
    it is stopping (or the demo that it was interrupted: it ends)."""
    demo = _Demo(demo_dir, "--seconds", "120", env=_env(demo_dir / "tmp"))
    try:
        demo.forecasting()
        demo.proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and demo.proc.poll() is None:
            if demo.said("stopping: finishing the batch") or demo.said("demo: interrupted"):
                break
            demo.proc.send_signal(signal.SIGINT)
            time.sleep(0.005)  # the fault's pace, not a wait
        report, err = demo.end()
    finally:
        demo.kill()
    # A report, unless a last Ctrl-C came after the stop, as the forecasts were read back.
    assert demo.proc.returncode == 130, err
    if report:
        assert report["interrupted"] is True
    assert "stopping: finishing the batch in flight" in err  # the worker's stop ran
    assert "Traceback" not in err
    assert not list((demo_dir / "tmp").glob("attnlstm-redis-*"))


def test_sigterm_stops_the_demo_as_ctrl_c_does(demo_dir: Path) -> None:
    """SIGTERM (`kill`, a container stopped) killed the demo on the spot, exit 143: no
    report, the embedded server's directory left in TMPDIR."""
    demo = _Demo(demo_dir, "--seconds", "120", env=_env(demo_dir / "tmp"))
    try:
        demo.forecasting()
        demo.proc.send_signal(signal.SIGTERM)
        report, err = demo.end()
    finally:
        demo.kill()
    assert demo.proc.returncode == 130, err
    assert report.get("interrupted") is True
    assert report["forecasts"] >= 100
    assert "Traceback" not in err
    assert not list((demo_dir / "tmp").glob("attnlstm-redis-*"))


def _children(pid: int) -> dict[int, str]:
    """The child processes of ``pid``: their command lines, by pid."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rpartition(")")[2].split()[1])
            if parent == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_text()
        except (OSError, ValueError):  # gone meanwhile
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc to read")
def test_the_replay_dies_with_a_killed_demo(demo_dir: Path) -> None:
    """kill -9 of a demo on a Redis of the user's (ATTNLSTM_REDIS_URL; an embedded one
    dies with the demo, and the replay with it): its replay process went on writing, a
    producer with no demo, until its --seconds ran out."""
    with EmbeddedServer() as server:
        demo = _Demo(demo_dir, "--seconds", "120", env=_env(demo_dir / "tmp", REDIS_URL=server.url))
        try:
            demo.forecasting(server.url)
            children = _children(demo.proc.pid)
            (replay,) = [pid for pid, cmd in children.items() if "spawn_main" in cmd]
        finally:
            demo.kill()
        wait_for(lambda: gone(replay), timeout=10, what="the replay to die with the demo")


def test_a_second_demo_on_one_redis_is_refused(demo_dir: Path) -> None:
    """Two demos on one ATTNLSTM_REDIS_URL emptied and read each other's streams, and
    both reported the mix, exit 0. The second is refused; the first runs on, and lets
    go of its lock at the end. (A server of their own: the demo's keys are no test's.)"""
    with EmbeddedServer() as server, redis.Redis.from_url(server.url) as client:
        env = _env(demo_dir / "tmp", REDIS_URL=server.url)
        first = _Demo(demo_dir, "--seconds", "120", env=env)
        try:
            first.forecasting(server.url)
            assert 0 < client.pttl("demo:lock") <= 30_000  # renewed while it runs
            firsts = [client.xrange(key, count=1) for key in (DEMO_KEYS.input, DEMO_KEYS.output)]
            # Its own folder: no model there. It trained one (15 s) before it was refused.
            out = demo_dir / "second"
            second = _run(
                [*CLI, "demo", "--seconds", "5", "--series", "10", "--out", str(out)],
                demo_dir,
                env=env,
                timeout=120,
            )
            # The first's streams stand: not emptied (their oldest entries are the same).
            assert [
                client.xrange(k, count=1) for k in (DEMO_KEYS.input, DEMO_KEYS.output)
            ] == firsts
            first.proc.send_signal(signal.SIGINT)
            report, err = first.end()
        finally:
            first.kill()
        assert not client.exists("demo:lock")
    assert second.returncode == 1
    assert "Traceback" not in second.stderr
    assert "training a model" not in second.stderr
    assert not (out / "model.safetensors").exists()
    assert second.stderr.strip().splitlines()[-1] == (  # after the log's lines
        "attnlstm demo: error: another demo is running on this Redis: it holds 'demo:lock' "
        "(a demo killed lets go of it within 30 s); wait for it to end, or "
        "unset ATTNLSTM_REDIS_URL to run this one on an embedded server of its own"
    )
    assert first.proc.returncode == 130, err
    assert report.get("interrupted") is True


def test_a_demo_on_a_shared_redis_empties_its_anomalies_stream_first(demo_dir: Path) -> None:
    """Its other streams were emptied, not `demo:anomalies`: every run's events piled up
    there."""
    with EmbeddedServer() as server, redis.Redis.from_url(server.url) as client:
        stale = client.xadd(DEMO_KEYS.anomalies, {"series": "old-run"})
        cmd = [*CLI, "demo", "--seconds", "1", "--series", "5", "--json", "--out", str(demo_dir)]
        proc = _run(cmd, demo_dir, env=_env(demo_dir / "tmp", REDIS_URL=server.url))
        assert proc.returncode == 0, proc.stderr
        assert client.xrange(DEMO_KEYS.anomalies, stale, stale) == []


def test_demo_csv_replays_for_seconds_and_scores_no_tail_it_did_not_reach(
    tmp_path: Path, trained_sines: AttentionLSTM
) -> None:
    """--seconds, the replay's length, was ignored for a CSV file: the whole file went.
    Stopped before the held-out tail, the tail's MAE was a mean of nothing: NaN, and
    numpy's warnings on stderr."""
    rows = [f"2024-01-01T{t // 60:02d}:{t % 60:02d}:00,{math.sin(t / 5):.4f}" for t in range(400)]
    path = tmp_path / "wave.csv"
    path.write_text("\n".join(["time,v", *rows]) + "\n")
    out = tmp_path / "out"
    save(out / "model-wave.safetensors", trained_sines, {"data": f"csv:{path}"})
    cmd = [*CLI, "demo", "--csv", str(path), "--rate", "50", "--seconds", "1", "--json"]
    proc = _run([*cmd, "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["entries"] == 50
    assert report["held_out_v"] == {"points": 0, "mae": None, "naive_mae": None}
    assert "Warning" not in proc.stderr


def test_a_series_with_no_forecast_scored_yet_is_drawn_without_a_mean(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A series' one forecast, its actual not come: its panel said "MAE nan", after
    numpy's "Mean of empty slice" on stderr."""
    fill(redis_client, keys.input, sine_steps(1, trained_sines.config.window, seed=4))
    drain(settings_for(redis_url, keys), trained_sines)
    views = readback.read_views(redis_client, keys)
    assert len(views["s0"].forecast) == 1
    assert not views["s0"].scored.any()
    titles: list[str] = []

    def seen(panels: Any, path: Path, **kwargs: Any) -> Path:
        titles.extend(panel[0] for panel in panels)
        return plot_series_forecasts(panels, path, **kwargs)

    monkeypatch.setattr(readback, "plot_series_forecasts", seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        readback.draw(views, tmp_path, shown=["s0"], points=200, label="one forecast")
    assert titles == ["s0: MAE none yet (no actual has come)"]


def test_a_csv_the_replay_refuses_stops_the_demo_before_it_starts(tmp_path: Path) -> None:
    """A file the replay refuses (an empty time cell; `train` refuses it too now): the
    demo trained on it, started the worker, and ended in two tracebacks once the replay
    reached line 252."""
    rows = [f"2024-01-01T{t // 60:02d}:{t % 60:02d}:00,{math.sin(t / 5):.4f}" for t in range(400)]
    rows[250] = f",{math.sin(250 / 5):.4f}"
    path = tmp_path / "gap.csv"
    path.write_text("\n".join(["time,v", *rows]) + "\n")
    proc = _run(
        [*CLI, "demo", "--csv", str(path), "--out", str(tmp_path / "out")], tmp_path, timeout=180
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"attnlstm demo: error: {path}:252: time '' is neither ISO 8601 nor a count since the epoch"
    )
    assert not (tmp_path / "out").exists()  # no model trained


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "1e9"], "(--seconds x rate: 5e+11 entries) are more than the 10,000,000"),
        (["--seconds", "1e300", "--rate", "1e300"], "(--seconds x rate: inf entries) are more"),
    ],
)
def test_sines_past_what_a_replay_draws_stop_the_demo_in_one_line(
    args: list[str], message: str, tmp_path: Path
) -> None:
    """A MemoryError (80 GB), or an OverflowError, each a traceback."""
    proc = _run([*CLI, "demo", *args, "--out", str(tmp_path)], tmp_path, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert message in line
    assert line.endswith("at once: a lower --seconds or --rate (see attnlstm demo --help)")
    assert list(tmp_path.iterdir()) == []


def _run(
    cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``cmd`` run to its end in ``cwd``, its output captured (the worker's environment
    unless ``env``)."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=worker_env() if env is None else env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--series", "3"], "--series is for sines, not --csv"),
        (["--series", "3", "--noise", "1", "--drift-at", "5"], "--series, --noise, --drift-at are"),
    ],
)
def test_demo_csv_refuses_the_sines_flags(args: list[str], message: str, tmp_path: Path) -> None:
    """They were ignored: the file was replayed as if they had not been given."""
    path = tmp_path / "ok.csv"
    path.write_text("time,v\n" + "".join(f"{t},{t % 7}\n" for t in range(1, 400)))
    out = tmp_path / "out"
    cmd = [*CLI, "demo", "--csv", str(path), "--seconds", "1", "--out", str(out), *args]
    proc = _run(cmd, tmp_path, timeout=180)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"attnlstm demo: error: {message}")
    assert line.endswith("(see attnlstm demo --help)")
    assert not out.exists()  # refused before a model was trained


def test_demo_help_names_every_stream_the_readme_says_it_empties(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README names demo:anomalies among them; --help left it out."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    found = re.search(r"on streams of its own\n\(([^)]*)", readme)
    assert found, "the README no longer lists the demo's streams"
    streams = re.findall(r"`(demo:[a-z:]+)`", found[1])
    assert "demo:anomalies" in streams
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the description
    assert [s for s in streams if s not in re.findall(r"demo:[a-z:]+\b", shown)] == []


def test_a_demo_with_no_redis_at_its_url_says_so_before_it_trains(tmp_path: Path) -> None:
    """It trained its model (15 s) first, and only then found no Redis to run on."""
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = _run(
        [*CLI, "demo", "--out", str(tmp_path / "out")],
        tmp_path,
        env=_env(tmp_path / "tmp", REDIS_URL=url),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "training a model" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1].startswith("attnlstm demo: error: cannot reach Redis")
    )
    assert not (tmp_path / "out" / "model.safetensors").exists()
