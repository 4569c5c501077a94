"""Crashes, restarts and lost replies: every valid input gets exactly one forecast,
the same one an uninterrupted run publishes."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path
from typing import cast

import redis

from attnlstm.model import AttentionLSTM
from tests.helpers import (
    RunningWorker,
    assert_forecasts,
    by_src,
    expected,
    fill,
    forecasts_by_src,
    free_port,
    run_worker,
    sine_values,
    worker_cmd,
    worker_env,
)
from worker.embedded import EmbeddedServer


def test_five_kill_9s_publish_what_an_uninterrupted_run_does(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    values = sine_values(500, 100, seed=5)  # 50,000 entries
    ref, crash = f"{stream_prefix}ref:", f"{stream_prefix}crash:"
    ref_ids = fill(redis_client, f"{ref}sensors", values)
    crash_ids = fill(redis_client, f"{crash}sensors", values)
    run_worker(worker_cmd(model_file, redis_url, ref), cwd=tmp_path)

    # Small batches and frequent state checkpoints, so the kills land everywhere:
    # mid-batch, between a checkpoint and the next, during a re-sync.
    cmd = worker_cmd(
        model_file, redis_url, crash, "--consumer", "w", "--max-batch", "37",
        "--checkpoint-interval-s", "0.3",
    )  # fmt: skip
    output = f"{crash}forecasts"
    total = 500 * (100 - 20 + 1)
    # Five random moments during the drain, as points in its progress.
    moments = sorted(random.Random(11).sample(range(total // 20, total * 9 // 10), 5))
    for moment in moments:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=worker_env(), stderr=subprocess.DEVNULL)
        while redis_client.xlen(output) < moment:
            assert proc.poll() is None, "the worker exited before it was killed"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert redis_client.xlen(output) < total  # work was left for the last run
    run_worker(cmd, cwd=tmp_path)

    want = forecasts_by_src(redis_client, f"{ref}forecasts")
    got = forecasts_by_src(redis_client, output)  # fails on a duplicate
    assert len(got) == len(want) == 500 * (100 - 20 + 1)
    to_ref = dict(zip(crash_ids, ref_ids, strict=True))
    for src, fields in got.items():
        reference = want[to_ref[src]]
        assert fields[b"yhat"] == reference[b"yhat"], src  # value for value, to the bit
        assert fields[b"attn"] == reference[b"attn"], src
    assert redis_client.xpending(f"{crash}sensors", "forecasters")["pending"] == 0


def test_a_stop_mid_drain_handles_the_batch_read_ahead_and_leaves_nothing_pending(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """While draining, the next read goes out before the batch in hand is published:
    SIGTERM must handle those entries too, not leave them pending."""
    values = sine_values(300, 60, seed=8)  # 18,000 entries
    sensors, forecasts = f"{stream_prefix}sensors", f"{stream_prefix}forecasts"
    ids = fill(redis_client, sensors, values)
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--max-batch", "50")
    with RunningWorker(cmd, tmp_path) as worker:
        worker.wait_for(lambda: redis_client.xlen(forecasts) >= 2000)
        worker.stop()
        assert worker.returncode == 0, worker.stderr[-3000:]
    stopped_at = redis_client.xlen(forecasts)
    assert stopped_at < 300 * (60 - 19)  # it stopped mid-drain
    assert redis_client.xpending(sensors, "forecasters")["pending"] == 0
    run_worker(cmd, tmp_path)
    assert_forecasts(redis_client, forecasts, expected(trained_sines, values, ids))


def test_a_redis_restart_mid_run_loses_and_repeats_nothing(
    model_file: Path, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    with EmbeddedServer(appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        values = sine_values(300, 100, seed=6)
        ids = fill(client, "sensors", values)
        cmd = worker_cmd(model_file, server.url, "", "--max-batch", "50")
        proc = subprocess.Popen(
            [*cmd, "--burst"], cwd=tmp_path, env=worker_env(), stderr=subprocess.PIPE, text=True
        )
        while client.xlen("forecasts") < 2000:
            time.sleep(0.01)
        client.close()
        server.restart()  # SHUTDOWN flushes the AOF; the worker sees its connection drop
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert "retrying" in err
        client = redis.Redis.from_url(server.url)
        assert_forecasts(client, "forecasts", expected(trained_sines, values, ids))
        client.close()


def test_entries_delivered_but_never_received_are_still_forecast(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """The redis-py trap: a lost XREADGROUP reply leaves entries pending on this consumer
    while the next read returns later ones. Here a read in the worker's name takes them."""
    sensors = f"{stream_prefix}sensors"
    values = sine_values(4, 60, seed=7)
    ids = fill(redis_client, sensors, values[:30])
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--consumer", "w", "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= 4 * 11)
        # Added and read in the worker's name in one transaction, so the worker's own
        # blocked read cannot take them first.
        pipe = redis_client.pipeline(transaction=True)
        for t in range(30, 40):
            for j in range(4):
                pipe.xadd(sensors, {"series": f"s{j}", "value": repr(float(values[t, j]))})
        pipe.xreadgroup("forecasters", "w", {sensors: ">"}, count=40)  # the lost reply
        ids += pipe.execute()[:-1]
        ids += fill(redis_client, sensors, values[40:])
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= 4 * 41)
        time.sleep(0.5)
    assert "never reached it" in worker.stderr  # the gap was seen, not papered over
    # Equal to the offline model: the windows saw every value, in stream order.
    assert_forecasts(
        redis_client, f"{stream_prefix}forecasts", expected(trained_sines, values, ids)
    )


def test_a_dead_consumers_entries_are_claimed_once_its_lease_expires(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    sensors = f"{stream_prefix}sensors"
    values = sine_values(3, 40, seed=8)
    ids = fill(redis_client, sensors, values)
    redis_client.xgroup_create(sensors, "forecasters", id="0")
    redis_client.xreadgroup("forecasters", "ghost", {sensors: ">"}, count=50)  # then it died
    redis_client.set(f"{sensors}:lease:forecasters", "ghost", px=1500)
    report = run_worker(worker_cmd(model_file, redis_url, stream_prefix), cwd=tmp_path)
    want = expected(trained_sines, values, ids)
    assert_forecasts(redis_client, f"{stream_prefix}forecasts", want)
    assert report["forecasts"] == len(want)
    assert redis_client.xpending(sensors, "forecasters")["pending"] == 0


def test_an_entry_that_keeps_failing_goes_to_the_dead_stream(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    sensors = f"{stream_prefix}sensors"
    fill(redis_client, sensors, sine_values(2, 25, seed=9))
    redis_client.xgroup_create(sensors, "forecasters", id="0")
    poison = cast(bytes, redis_client.xadd(sensors, {"series": "s0", "value": "1.0"}))
    redis_client.xreadgroup("forecasters", "w", {sensors: ">"}, count=100)
    for _ in range(5):  # five workers died holding it
        redis_client.xclaim(sensors, "forecasters", "w", 0, [poison])
    run_worker(worker_cmd(model_file, redis_url, stream_prefix, "--consumer", "w"), cwd=tmp_path)
    dead = by_src(redis_client, f"{stream_prefix}sensors:dead")
    assert list(dead) == [poison]
    assert b"delivered 7 times" in dead[poison][b"error"]
    assert redis_client.xlen(f"{stream_prefix}forecasts") == 2 * (25 - 20 + 1)


def test_a_vanished_group_is_recreated_loudly(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """What a Redis restarted without persistence looks like: NOGROUP, not a crash loop."""
    sensors = f"{stream_prefix}sensors"
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        worker.wait_for(lambda: redis_client.get(f"{sensors}:lease:forecasters") is not None)
        time.sleep(0.5)
        redis_client.delete(sensors, f"{sensors}:state:forecasters")
        fill(redis_client, sensors, sine_values(2, 30, seed=10))
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= 2 * 11)
    assert worker.returncode == 0
    assert "had vanished" in worker.stderr


def test_a_group_reset_under_a_saved_state_repeats_nothing(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """The group is destroyed but the stream and the window state are not: the group
    comes back from the start of the stream, and the entries the state already holds
    must be acked, not forecast a second time."""
    sensors = f"{stream_prefix}sensors"
    values = sine_values(3, 60, seed=12)
    ids = fill(redis_client, sensors, values[:40])
    cmd = worker_cmd(model_file, redis_url, stream_prefix, "--block-ms", "100")
    with RunningWorker(cmd, tmp_path) as worker:
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= 3 * 21)
        time.sleep(0.3)
        redis_client.xgroup_destroy(sensors, "forecasters")
        ids += fill(redis_client, sensors, values[40:])
        worker.wait_for(lambda: redis_client.xlen(f"{stream_prefix}forecasts") >= 3 * 41)
        time.sleep(0.5)
    assert worker.returncode == 0
    assert "had vanished" in worker.stderr
    assert "or the group was reset; re-syncing" in worker.stderr
    assert_forecasts(
        redis_client, f"{stream_prefix}forecasts", expected(trained_sines, values, ids)
    )
    assert redis_client.xpending(sensors, "forecasters")["pending"] == 0


def test_redis_unreachable_at_start_is_waited_for(
    model_file: Path, trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with RunningWorker(worker_cmd(model_file, url, "", "--block-ms", "100"), tmp_path) as worker:
        time.sleep(2)  # nothing listens there yet
        assert worker.proc.poll() is None
        with EmbeddedServer(port=port) as server:
            client = redis.Redis.from_url(server.tcp_url)
            values = sine_values(2, 30, seed=13)
            ids = fill(client, "sensors", values)
            worker.wait_for(lambda: client.xlen("forecasts") == 2 * 11)
            assert_forecasts(client, "forecasts", expected(trained_sines, values, ids))
            worker.stop()
            client.close()
    assert worker.returncode == 0
    assert "Connection refused" in worker.stderr
    assert "retrying in" in worker.stderr
    assert "Traceback" not in worker.stderr


def test_a_lost_state_is_rebuilt_from_the_stream_without_publishing_again(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    sensors = f"{stream_prefix}sensors"
    values = sine_values(3, 50, seed=14)
    ids = fill(redis_client, sensors, values[:40])
    cmd = worker_cmd(model_file, redis_url, stream_prefix)
    run_worker(cmd, cwd=tmp_path)
    assert redis_client.delete(f"{sensors}:state:forecasters") == 1
    ids += fill(redis_client, sensors, values[40:])
    report = run_worker(cmd, cwd=tmp_path)
    assert report["forecasts"] == 3 * 10  # only the new entries
    want = expected(trained_sines, values, ids)
    assert_forecasts(redis_client, f"{stream_prefix}forecasts", want)  # windows were whole
