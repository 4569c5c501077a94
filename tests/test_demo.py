"""`attnlstm demo` and `attnlstm plot --from-stream`, run as a user runs them."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from attnlstm.checkpoint import save
from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import SineSpec
from tests.conftest import CLI
from tests.helpers import fill, run_worker, sine_values, worker_cmd, worker_env
from worker.replay import sine_entries

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


def test_ctrl_c_stops_the_demo_with_the_summary_so_far(demo_dir: Path) -> None:
    cmd = [*CLI, "demo", "--seconds", "120", "--series", "10", "--json", "--out", str(demo_dir)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(),
        cwd=demo_dir,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the worker is up; let it forecast for a while
            if "created consumer group" in line:
                break
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["interrupted"] is True
    assert 0 < report["forecasts"] < 120 * 500
    assert "Traceback" not in err
    assert (demo_dir / "forecasts.png").is_file()


def test_plot_from_stream_draws_one_series_of_a_running_system(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    values = sine_values(5, 80, seed=4)
    fill(redis_client, f"{stream_prefix}sensors", values)
    run_worker(worker_cmd(model_file, redis_url, stream_prefix), cwd=tmp_path)
    env = worker_env() | {
        "ATTNLSTM_INPUT_STREAM": f"{stream_prefix}sensors",
        "ATTNLSTM_OUTPUT_STREAM": f"{stream_prefix}forecasts",
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
        f"of {stream_prefix}forecasts"
    )
