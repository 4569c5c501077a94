"""The worker end to end, against a real server: the stream contract and its guarantees."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis
import torch

from attnlstm.checkpoint import load
from attnlstm.model import AttentionLSTM
from tests.helpers import (
    RunningWorker,
    by_src,
    entries,
    expected,
    fill,
    forecasts_by_src,
    free_port,
    run_worker,
    sine_values,
    worker_cmd,
)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
        ),
    ],
)
def test_every_full_window_gets_exactly_one_forecast_equal_to_the_offline_model(
    device: str,
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    values = sine_values(200, 100, seed=1)
    ids = fill(redis_client, f"{stream_prefix}sensors", values)
    cmd = worker_cmd(model_file, redis_url, stream_prefix)
    cmd[cmd.index("--device") + 1] = device
    report = run_worker(cmd, cwd=tmp_path)

    want = expected(trained_sines, values, ids, device)  # the same model on the same device
    got = forecasts_by_src(redis_client, f"{stream_prefix}forecasts")
    assert set(got) == set(want)  # exactly the inputs whose window is full, once each
    assert len(got) == 200 * (100 - trained_sines.config.window + 1)
    version = load(model_file).version
    index = {entry_id: k for k, entry_id in enumerate(ids)}
    for src, fields in got.items():
        yhat = np.array(json.loads(fields[b"yhat"]))
        np.testing.assert_allclose(yhat, want[src], rtol=1e-5, atol=1e-5)
        attn = json.loads(fields[b"attn"])
        assert len(attn) == trained_sines.config.window
        assert abs(sum(attn) - 1) < 1e-5
        assert fields[b"model"].decode() == version
        assert fields[b"series"] == f"s{index[src] % 200}".encode()
        assert int(fields[b"ts"]) == int(src.split(b"-")[0])
    assert report["forecasts"] == len(want)
    assert report["warming"] == 200 * (trained_sines.config.window - 1)
    assert report["dead"] == 0
    assert redis_client.xlen(f"{stream_prefix}sensors") == len(ids)  # input never trimmed
    assert redis_client.xpending(f"{stream_prefix}sensors", "forecasters")["pending"] == 0


BAD_ENTRIES: list[tuple[dict[str, bytes], str]] = [
    ({"value": b"1.0"}, "missing field: series"),
    ({"series": b"", "value": b"1.0"}, "series is empty"),
    ({"series": b"x" * 129, "value": b"1.0"}, "longer than 128"),
    ({"series": b"has space", "value": b"1.0"}, "characters outside"),
    ({"series": b"\xff\xfe", "value": b"1.0"}, "not UTF-8"),
    ({"series": b"s0"}, "missing field: value"),
    ({"series": b"s0", "value": b"abc"}, "not a decimal number"),
    ({"series": b"s0", "value": b"nan"}, "not a decimal number"),
    ({"series": b"s0", "value": b"1e999"}, "out of range"),
    ({"series": b"s0", "value": b"\xff"}, "not a decimal number"),
    ({"series": b"s0", "value": b"1.0", "ts": b"yesterday"}, "ts is not"),
    ({"series": b"s0", "value": b"1.0", "ts": b"-5"}, "ts is not"),
]


def test_malformed_entries_go_to_the_dead_stream_and_the_worker_keeps_going(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    sensors, window = f"{stream_prefix}sensors", load(model_file).config.window
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        values = sine_values(3, window + 10, seed=2)
        bad_ids: dict[bytes, str] = {}
        for t in range(values.shape[0]):  # bad entries mixed among good ones
            for j in range(3):
                redis_client.xadd(sensors, {"series": f"s{j}", "value": repr(float(values[t, j]))})
            if t < len(BAD_ENTRIES):
                fields, reason = BAD_ENTRIES[t]
                bad_ids[cast(bytes, redis_client.xadd(sensors, fields))] = reason  # type: ignore[arg-type]
        good = 3 * (values.shape[0] - window + 1)
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= good)
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}sensors:dead") >= len(bad_ids))
        assert worker.proc.poll() is None, "the worker died"
        dead = by_src(redis_client, f"{stream_prefix}sensors:dead")
        assert set(dead) == set(bad_ids)
        inputs = dict(entries(redis_client, sensors))
        for src, reason in bad_ids.items():
            assert reason in dead[src][b"error"].decode(), (reason, dead[src])
            original = inputs[src]
            assert {k: dead[src][k] for k in original} == original  # the fields, unchanged
        assert redis_client.xlen(f"{stream_prefix}forecasts") == good
        assert redis_client.xpending(sensors, "forecasters")["pending"] == 0
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "stopped: saved windows of 3 series" in worker.stderr


def test_metrics_and_health_endpoints(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    cmd[cmd.index("--metrics-port") + 1] = str(port)
    fill(redis_client, f"{stream_prefix}sensors", sine_values(5, 30))
    redis_client.xadd(f"{stream_prefix}sensors", {"series": "s0", "value": "oops"})
    with RunningWorker(cmd, tmp_path) as worker:
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}sensors:dead") == 1)
        worker.wait_for(lambda: _get(port, "/healthz")[0] == 200)
        _, body = _get(port, "/healthz")
        assert json.loads(body)["redis"] is True
        _, text = _get(port, "/metrics")
        samples = _samples(text)
        assert samples["attnlstm_entries_read_total"] == 151
        assert samples["attnlstm_forecasts_published_total"] == 5 * (30 - 20 + 1)
        assert samples['attnlstm_dead_lettered_total{reason="value"}'] == 1
        assert samples["attnlstm_end_to_end_latency_seconds_count"] == 55
        assert samples["attnlstm_batch_size_count"] >= 1
        # The lag gauge is refreshed on a timer: it drops to 0 once that has run.
        worker.wait_for(lambda: _samples(_get(port, "/metrics")[1])["attnlstm_group_lag"] == 0)


def test_a_second_worker_waits_for_the_lease_and_takes_over(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """Two workers on one stream would each see half of every series' values."""
    lease = f"{stream_prefix}sensors:lease:forecasters"
    first = worker_cmd(model_file, redis_url, stream_prefix, "--consumer", "a")
    second = worker_cmd(model_file, redis_url, stream_prefix, "--consumer", "b")
    port = free_port()
    second[second.index("--metrics-port") + 1] = str(port)
    with RunningWorker(first, tmp_path) as active:
        active.wait_for(lambda: redis_client.get(lease) == b"a")
        standby = RunningWorker(second, tmp_path)
        standby.wait_for(lambda: _get(port, "/healthz")[0] == 200)
        assert json.loads(_get(port, "/healthz")[1])["role"] == "standby"  # healthy, waiting
    assert active.returncode == 0
    with standby:
        fill(redis_client, f"{stream_prefix}sensors", sine_values(2, 25))
        standby.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") == 2 * 6)
        assert redis_client.get(lease) == b"b"
        assert json.loads(_get(port, "/healthz")[1])["role"] == "active"
    assert standby.returncode == 0
    assert "waiting: a holds the lease" in standby.stderr
    assert redis_client.get(lease) is None  # released at exit


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out
