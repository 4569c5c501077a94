"""`attnlstm demo` and `attnlstm plot --from-stream`, run as a user runs them."""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import redis

from attnlstm.checkpoint import save
from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import SineSpec, sine_steps
from tests.conftest import CLI
from tests.helpers import drain, fill, settings_for, wait_for, worker_env
from worker.keys import Keys
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
    proc = subprocess.run(
        [*cmd, "--out", str(demo_dir)],
        capture_output=True,
        text=True,
        env=worker_env(),
        cwd=demo_dir,
        timeout=180,
        check=False,
    )
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


def test_sines_the_replay_would_refuse_stop_the_demo_before_it_trains(tmp_path: Path) -> None:
    """60 s at 500 entries/s over 50 series is 601 points a series: a drift at 5000 is
    refused in one line before a model is trained or a server started, not by the
    replay's process once the worker runs."""
    proc = subprocess.run(
        [*CLI, "demo", "--drift-at", "5000", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=worker_env(),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "attnlstm demo: error: the sines to replay (601 points a series: --seconds x rate / "
        "--series): drift_at must lie inside the series, got 5000"
    )
    assert list(tmp_path.iterdir()) == []


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
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert 500 <= report["forecasts"] < 120 * 500
    assert "Traceback" not in err
    assert (demo_dir / "forecasts.png").is_file()


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
