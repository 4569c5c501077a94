"""Crashes, restarts and lost replies: every valid input gets exactly one forecast,
the same one an uninterrupted run publishes."""

from __future__ import annotations

import logging
import random
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis

from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import sine_steps
from tests.chaos.proxy import holding_proxy
from tests.helpers import (
    WorkerProcess,
    WorkerThread,
    assert_forecasts,
    by_src,
    drain,
    drained,
    entries,
    expected,
    fill,
    free_port,
    kill_connections,
    kill_named,
    new_worker,
    same_output,
    server_binaries,
    settings_for,
    spiked,
    stood_in,
    wait_for,
    worker_cmd,
    worker_env,
)
from worker import loop
from worker.app import run_service
from worker.batch import Batch, triage
from worker.contract import entry_ms
from worker.embedded import EmbeddedServer
from worker.keys import Keys
from worker.lease import LIBRARY, VERSION
from worker.metrics import Metrics
from worker.recovery import Recovery
from worker.settings import Settings
from worker.signals import StopRequest
from worker.streams import PLAIN_TO_TLS_HINT, Command, Entry, connect


@pytest.fixture(autouse=True)
def _worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnlstm")


def _pending(client: redis.Redis, keys: Keys) -> int:
    return int(client.xpending(keys.input, keys.group)["pending"])


def _added_and_read(
    client: redis.Redis, keys: Keys, values: np.ndarray, reader: str
) -> list[bytes]:
    """``values`` (steps, series ``s{j}``) added and read in ``reader``'s name in one
    transaction, so that no worker's read can take them first: their ids."""
    pipe = client.pipeline(transaction=True)
    for row in values:
        for j, v in enumerate(row):
            pipe.xadd(keys.input, {"series": f"s{j}", "value": repr(float(v))})
    pipe.xreadgroup(keys.group, reader, {keys.input: ">"}, count=values.size)
    return cast(list[bytes], pipe.execute()[:-1])


def _samples(metrics: Metrics, name: str) -> list[Any]:
    return [
        s
        for family in metrics.registry.collect()
        if family.name == name
        for s in family.samples
        if s.name.endswith("_total")
    ]


def test_five_kill_9s_publish_what_an_uninterrupted_run_does(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """The worker as a process, killed with SIGKILL at five random moments of a drain."""
    values = spiked(sine_steps(500, 100, seed=5), 50, seed=5)  # 50,000 entries
    ref, crash, to_ref = _beside_a_reference(redis_client, stream_prefix, values)
    drain(settings_for(redis_url, ref), trained_sines)

    # Small batches and frequent state checkpoints, so the kills land everywhere:
    # mid-batch, between a checkpoint and the next, during a re-sync. A killed worker's
    # lease is left to expire: a short one, so that each next run waits 1 s, not 10.
    flags = ("--consumer", "w", "--max-batch", "37", "--checkpoint-interval-s", "0.3",
             "--lease-ttl-ms", "1000")  # fmt: skip
    cmd = worker_cmd(model_file, redis_url, crash, *flags)
    total = 500 * (100 - 20 + 1)
    # Five random moments during the drain, as points in its progress.
    moments = sorted(random.Random(11).sample(range(total // 20, total * 9 // 10), 5))
    for moment in moments:
        _kill_at(redis_client, cmd, crash, moment, tmp_path)
    assert redis_client.xlen(crash.output) < total  # work was left for the last run
    last = settings_for(
        redis_url, crash, max_batch=37, checkpoint_interval_s=0.3, lease_ttl_ms=1000
    )
    drain(last, trained_sines)
    # Each series' scoring went on from its last save, and the re-read entries after it
    # were scored again: intervals and anomaly events are an uninterrupted run's too.
    assert same_output(redis_client, crash, ref, to_ref) == (total, 50)
    assert _pending(redis_client, crash) == 0


def _beside_a_reference(
    client: redis.Redis, prefix: str, values: np.ndarray
) -> tuple[Keys, Keys, dict[bytes, bytes]]:
    """``values`` written to two input streams: a reference's, and the crashing run's
    (their keys); each crashing run's entry id to the reference's."""
    ref, crash = Keys.prefixed(f"{prefix}ref:"), Keys.prefixed(f"{prefix}crash:")
    ref_ids = fill(client, ref.input, values)
    return ref, crash, dict(zip(fill(client, crash.input, values), ref_ids, strict=True))


def _kill_at(client: redis.Redis, cmd: list[str], keys: Keys, forecasts: int, cwd: Path) -> None:
    """The worker ``cmd`` as a process, killed with SIGKILL once ``forecasts`` are out."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=worker_env(), stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: client.xlen(keys.output) >= forecasts or proc.poll() is not None,
            what=f"{forecasts} forecasts",
        )
        assert proc.poll() is None, "the worker exited before it was killed"
    finally:  # killed either way: a failed wait leaves no worker draining
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_restart_from_an_old_checkpoint_scores_what_it_re_reads_as_it_went(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Killed mid-drain with one checkpoint, saved at its start: the restart re-reads
    every entry acked since and forecasts them again, unpublished. The intervals after it
    are an uninterrupted run's, and the anomalies it meets again are not published again."""
    values = spiked(sine_steps(100, 200, seed=6), 40, seed=6)  # 20,000 entries
    ref, crash, to_ref = _beside_a_reference(redis_client, stream_prefix, values)
    drain(settings_for(redis_url, ref), trained_sines)
    # A 1 s lease: the restart waits that long for the killed worker's to expire.
    flags = ("--consumer", "w", "--checkpoint-interval-s", "3600", "--lease-ttl-ms", "1000")
    total = 100 * (200 - 20 + 1)
    _kill_at(
        redis_client, worker_cmd(model_file, redis_url, crash, *flags), crash, total // 2, tmp_path
    )
    restart = settings_for(redis_url, crash, checkpoint_interval_s=3600, lease_ttl_ms=1000)
    drain(restart, trained_sines)
    re_read = [
        int(m) for r in caplog.records for m in re.findall(r"(\d+) entries re-read", r.getMessage())
    ]
    assert re_read, "no re-read after the restart"
    assert re_read[0] >= total // 2  # everything since the first batch
    forecasts, events = same_output(redis_client, crash, ref, to_ref)
    assert forecasts == total
    assert events >= 35


def test_a_re_sync_scores_each_forecast_once(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A dropped connection re-syncs from the checkpoint saved at the start: the entries
    acked since are forecast again, unpublished, to take each series' scoring on as it
    went. Their errors went into the worker's averages and the scored count a second
    time (2,600 scored beside 1,810 forecasts)."""
    values = sine_steps(10, 200, seed=5)
    settings = settings_for(redis_url, keys, max_batch=64, checkpoint_interval_s=3600)
    worker = new_worker(settings, trained_sines)
    sample = worker.metrics.registry.get_sample_value
    with WorkerThread(worker) as running:
        fill(redis_client, keys.input, values[:100])
        running.wait_for(lambda: redis_client.xlen(keys.output) == 10 * 81)
        running.wait_for(lambda: drained(redis_client, keys))
        kill_named(redis_client, "test-worker")
        running.wait_for(lambda: sample("attnlstm_recoveries_total") == 2)
        fill(redis_client, keys.input, values[100:])
        # (scored before they are published)
        running.wait_for(lambda: sample("attnlstm_forecasts_published_total") == 10 * 181)
    # Each value after a series' first forecast met one forecast, once.
    assert sample("attnlstm_forecasts_scored_total") == worker.scores.scored == 10 * 180
    assert sample("attnlstm_entries_read_total") == 10 * 200


def test_a_re_sync_counts_the_pending_entries_it_handles_as_read(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Entries a crashed worker read and never acked are handled by the next one's
    re-sync: they were left out of its entries read and batches (read 0, beside 410
    forecasts and 190 warming)."""
    fill(redis_client, keys.input, sine_steps(10, 60, seed=5))
    settings = settings_for(redis_url, keys, max_batch=64)
    redis_client.xgroup_create(keys.input, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "w", {keys.input: ">"})  # then the crash
    report = drain(settings, trained_sines)
    assert (report["read"], report["forecasts"], report["warming"]) == (600, 410, 190)
    assert report["batches"] >= 1


def test_sigterm_mid_drain_handles_the_batch_read_ahead_and_leaves_nothing_pending(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    """While draining, the next read goes out before the batch in hand is published:
    SIGTERM must handle those entries too, not leave them pending. What it saves at the
    stop holds each series' scoring: the intervals after the restart are an uninterrupted
    run's."""
    values = spiked(sine_steps(300, 60, seed=8), 30, seed=8)  # 18,000 entries
    ref, stopped, to_ref = _beside_a_reference(redis_client, stream_prefix, values)
    drain(settings_for(redis_url, ref, max_batch=50), trained_sines)
    cmd = worker_cmd(model_file, redis_url, stopped, "--max-batch", "50")
    with WorkerProcess(cmd, tmp_path) as w:
        w.wait_for(lambda: redis_client.xlen(stopped.output) >= 2000)
        w.stop()
        assert w.returncode == 0, w.stderr[-3000:]
    total = 300 * (60 - 19)
    assert redis_client.xlen(stopped.output) < total  # it stopped mid-drain
    assert _pending(redis_client, stopped) == 0
    # Saved at the stop, and the lease handed back: the next worker takes it at once.
    saved = re.search(r"saved windows of 300 series at entry (\S+)", w.stderr)
    assert saved, w.stderr[-3000:]
    last_read = redis_client.xinfo_groups(stopped.input)[0]["last-delivered-id"]
    assert saved[1].encode() == last_read
    assert redis_client.get(stopped.lease) is None
    drain(settings_for(redis_url, stopped, max_batch=50), trained_sines)
    # Equal to the offline model on the windows the reference's anomaly events give.
    windowed = stood_in(redis_client, ref, values, list(to_ref.values()))
    assert_forecasts(redis_client, stopped.output, expected(trained_sines, windowed, list(to_ref)))
    forecasts, events = same_output(redis_client, stopped, ref, to_ref)
    assert forecasts == total
    assert events >= 25


def test_entries_delivered_but_never_received_are_still_forecast(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The redis-py trap: a lost XREADGROUP reply leaves entries pending on this consumer
    while the next read returns later ones. Here a read in the worker's name takes them."""
    values = sine_steps(4, 60, seed=7)
    ids = fill(redis_client, keys.input, values[:30])
    settings = settings_for(redis_url, keys, block_ms=100)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 4 * 11)
        # Added and read in the worker's name in one transaction, so the worker's own
        # blocked read cannot take them first.
        ids += _added_and_read(redis_client, keys, values[30:40], "w")  # the lost reply
        ids += fill(redis_client, keys.input, values[40:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 4 * 41)
        running.wait_for(lambda: _pending(redis_client, keys) == 0)
    assert "never reached it" in caplog.text  # the gap was seen, not papered over
    # Equal to the offline model: the windows saw every value, in stream order.
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_a_connection_reset_once_redis_has_answered_hints_at_no_tls(
    keys: Keys, trained_sines: AttentionLSTM, caplog: pytest.LogCaptureFixture
) -> None:
    """A server killed under load resets the worker's connections. Once Redis has
    answered, the URL's scheme is right: the warning hinted at TLS on the port all the
    same (a review's failovers logged it at each primary killed)."""
    values = sine_steps(4, 60, seed=9)
    with EmbeddedServer(port=free_port()) as server, holding_proxy(server.port) as proxy:
        client = redis.Redis.from_url(server.url)
        ids = fill(client, keys.input, values[:30])
        with WorkerThread(new_worker(settings_for(proxy.url, keys), trained_sines)) as running:
            running.wait_for(lambda: client.xlen(keys.output) >= 4 * 11)
            proxy.reset()
            ids += fill(client, keys.input, values[30:])
            running.wait_for(lambda: client.xlen(keys.output) >= 4 * 41)
        assert_forecasts(client, keys.output, expected(trained_sines, values, ids))
        client.close()
    said = [r.getMessage() for r in caplog.records if r.name == "attnlstm.worker"]
    assert any("Connection reset by peer'); retrying" in line for line in said), said
    assert not any(PLAIN_TO_TLS_HINT in line for line in said), said


def test_a_group_destroyed_by_hand_is_not_taken_for_redis_gone_back(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An operator's XGROUP DESTROY: the worker creates the group again, with an error
    that says it vanished, and loses nothing. A review found it counted as Redis gone
    back four times, one for each re-sync until the group passed the saved windows, each
    saying that forecasts were gone."""
    values = sine_steps(4, 60, seed=10)
    ids = fill(redis_client, keys.input, values[:30])
    settings = settings_for(redis_url, keys, block_ms=100, checkpoint_interval_s=0.05)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 4 * 11)
        wait_for(lambda: redis_client.exists(keys.state) == 1, what="saved windows")
        redis_client.xgroup_destroy(keys.input, keys.group)
        ids += fill(redis_client, keys.input, values[30:])
        running.wait_for(lambda: drained(redis_client, keys))
        sample = running.worker.metrics.registry.get_sample_value
        counted = sample("attnlstm_redis_rollbacks_total")
        recreated = sample("attnlstm_groups_recreated_total")
    assert "had vanished" in caplog.text
    assert "Redis went back" not in caplog.text
    assert (counted, recreated) == (0, 1)  # its own counter, which pages
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_a_snapshot_that_brings_back_anothers_lease_is_found_by_the_worker_that_took_it(
    keys: Keys, trained_sines: AttentionLSTM, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis gone back to before a takeover: the lease is the first worker's again, and
    the worker that took it over finds the partition no longer its own. It dropped the
    partition without a look at the group, and the forecasts it had published since,
    lost with their acks, went unsaid (a review)."""
    values = sine_steps(4, 80, seed=11)
    with EmbeddedServer() as server:
        client = redis.Redis.from_url(server.url)
        fill(client, keys.input, values[:30])
        # A lease that outlives the test, however slow: the snapshot's holds at the restart.
        first = settings_for(server.url, keys, consumer="first", block_ms=100, lease_ttl_ms=120_000)
        with WorkerThread(new_worker(first, trained_sines)):
            wait_for(lambda: client.xlen(keys.output) >= 4 * 11, what="the first's forecasts")
            client.save()  # the first's lease in it
        second = settings_for(server.url, keys, consumer="second", block_ms=100)
        with WorkerThread(new_worker(second, trained_sines)) as running:
            fill(client, keys.input, values[30:50])
            running.wait_for(lambda: client.xlen(keys.output) >= 4 * 31)
            client.close()
            server.restart()  # from the snapshot: the first's lease, its forecasts only
            running.wait_for(lambda: "is no longer ours" in caplog.text)
            counted = running.worker.metrics.registry.get_sample_value(
                "attnlstm_redis_rollbacks_total"
            )
    assert counted == 1
    assert "Redis went back on" in caplog.text


def test_a_dead_consumers_entries_are_claimed_once_its_lease_expires(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    values = sine_steps(3, 40, seed=8)
    ids = fill(redis_client, keys.input, values)
    redis_client.xgroup_create(keys.input, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "ghost", {keys.input: ">"}, count=50)  # then it died
    redis_client.set(keys.lease, "ghost", px=1500)
    expires = time.time() + redis_client.pttl(keys.lease) / 1000
    report = drain(settings_for(redis_url, keys), trained_sines)
    want = expected(trained_sines, values, ids)
    assert_forecasts(redis_client, keys.output, want)
    assert report["forecasts"] == len(want)
    assert _pending(redis_client, keys) == 0
    # Not before: the first forecast went out once the ghost's lease had lapsed (by its
    # entry id, the server's clock; 50 ms for the two clocks and the call's rounding).
    ((first, _),) = cast(list[Entry], redis_client.xrange(keys.output, count=1))
    assert entry_ms(first) / 1000 >= expires - 0.05


def _crash_at(poison: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handling ``poison`` takes the worker down, every time: a poison entry."""
    handle_batch = triage

    def crashing(entries: list[Entry], **kwargs: Any) -> Batch:
        batch = handle_batch(entries, **kwargs)
        if poison in batch.ids:
            raise RuntimeError("handling the poison entry crashed the worker")
        return batch

    monkeypatch.setattr(loop, "triage", crashing)


def _drain_through_crashes(settings: Settings, model: AttentionLSTM) -> int:
    """A supervisor restarting the worker (a new process, a new token, each time) until
    a drain ends; how many times it crashed."""
    crashes = 0
    while True:
        try:
            drain(settings, model)
            return crashes
        except RuntimeError:
            crashes += 1
            assert crashes <= 3, "the poison entry was never put aside"


def test_an_entry_whose_handling_keeps_crashing_the_worker_goes_to_the_dead_stream(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A poison entry: handling it takes the worker down, every time. Each new worker
    counts one more attempt; from the second, suspects are handled alone, and at
    max_attempts the poison goes to the dead stream while its batch's others are served."""
    values = sine_steps(2, 40, seed=9)
    ids = fill(redis_client, keys.input, values[:25])
    poison = cast(bytes, redis_client.xadd(keys.input, {"series": "p", "value": "1.0"}))
    ids += fill(redis_client, keys.input, values[25:])
    _crash_at(poison, monkeypatch)
    settings = settings_for(redis_url, keys, max_batch=8, lease_ttl_ms=1000, max_attempts=3)
    assert _drain_through_crashes(settings, trained_sines) == 3
    dead = by_src(redis_client, keys.dead)
    assert list(dead) == [poison]
    assert dead[poison][b"error"] == b"the worker stopped while handling it, 3 times"
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))
    assert _pending(redis_client, keys) == 0


def test_entries_delivered_many_times_but_never_cut_short_are_forecast(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Redis's delivery count grows with every read and claim (a worker whose connection
    keeps dropping claims its entries at every re-sync); it decides nothing here."""
    values = sine_steps(2, 25, seed=10)
    ids = fill(redis_client, keys.input, values)
    redis_client.xgroup_create(keys.input, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "w", {keys.input: ">"}, count=100)
    for _ in range(8):
        redis_client.xclaim(keys.input, keys.group, "w", 0, cast(list[Any], ids))
    drain(settings_for(redis_url, keys), trained_sines)
    assert redis_client.xlen(keys.dead) == 0
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_entries_another_consumer_reads_during_a_re_sync_are_still_forecast(
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """A worker frozen while it held a read wakes, and its read takes new entries while
    the worker that took its lease re-syncs: between the group's last delivered entry
    being asked and the pending entries being claimed. Those entries are claimed but
    past what the re-sync re-reads; before, each was acked unhandled and counted lost
    ("deleted from the stream while pending"). Now the worker re-syncs again, and
    forecasts them in order with the rest."""
    values = sine_steps(3, 50, seed=9)
    ids = fill(redis_client, keys.input, values[:40])
    claim = Recovery._claim_pending
    woke = False

    def woken_reader_first(self: Recovery) -> list[bytes]:
        nonlocal woke, ids
        if not woke:
            woke = True
            ids += _added_and_read(redis_client, keys, values[40:50], "woken")
        return claim(self)

    monkeypatch.setattr(Recovery, "_claim_pending", woken_reader_first)
    report = drain(settings_for(redis_url, keys), trained_sines)
    assert woke
    assert report["lost"] == 0
    want = expected(trained_sines, values, ids)
    assert_forecasts(redis_client, keys.output, want)
    assert report["forecasts"] == len(want)
    assert _pending(redis_client, keys) == 0


def test_entries_another_reader_holds_are_not_counted_lost_unread(
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """Another reader in the worker's group takes entries between the worker's reads:
    the worker has not read them, yet they are not lost (it claims them once they are
    idle for claim_idle_ms, or at its next re-sync). Before, its audit counted them as
    input lost unread, with a record in the dead stream."""
    monkeypatch.setattr(loop, "AUDIT_INTERVAL_S", 0.0)
    accounted = 0
    account = Recovery.account_unread

    def counted(self: Recovery, group: dict[str, Any] | None = None) -> None:
        nonlocal accounted
        account(self, group)
        accounted += 1

    monkeypatch.setattr(Recovery, "account_unread", counted)
    values = sine_steps(2, 30, seed=10)
    fill(redis_client, keys.input, values[:20])
    # A group whose read counter Redis knows (one made at the stream's start has none
    # until its first read), as after the worker's first re-sync.
    redis_client.xgroup_create(keys.input, keys.group, id="0", entries_read=0)
    metrics = Metrics()
    worker = new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines, metrics=metrics)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: drained(redis_client, keys))
        _added_and_read(redis_client, keys, values[20:30], "other")
        since = accounted
        running.wait_for(lambda: accounted >= since + 3)  # audits that saw them held
    assert worker.metrics.totals(1.0)["lost"] == 0
    assert not any(b"lost" in fields for _, fields in entries(redis_client, keys.dead))


def test_entries_a_dead_reader_holds_are_claimed_once_idle_and_forecast_once(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A consumer of the group reads entries and dies holding them: once they have been
    idle for claim_idle_ms, the worker claims them and forecasts each once, as the
    offline model does. Nothing comes after them, so only the audit's look at idle
    entries can find them."""
    values = sine_steps(2, 40, seed=11)
    ids = fill(redis_client, keys.input, values[:25])
    redis_client.xgroup_create(keys.input, keys.group, id="0", entries_read=0)
    worker = new_worker(
        settings_for(redis_url, keys, block_ms=100, claim_idle_ms=300), trained_sines
    )
    with WorkerThread(worker) as running:
        running.wait_for(lambda: drained(redis_client, keys))
        ids += _added_and_read(redis_client, keys, values[25:], "gone")
        running.wait_for(lambda: drained(redis_client, keys), timeout=60)
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))
    assert worker.metrics.totals(1.0)["lost"] == 0


def test_input_trimmed_while_pending_or_unread_is_accounted_for(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    values = sine_steps(2, 40, seed=12)
    ids = fill(redis_client, keys.input, values)  # 80 entries
    redis_client.xgroup_create(keys.input, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "ghost", {keys.input: ">"}, count=30)  # then it died
    redis_client.xtrim(keys.input, maxlen=40, approximate=False)  # 30 pending, 10 unread gone
    metrics = Metrics()
    worker = new_worker(settings_for(redis_url, keys), trained_sines, burst=True, metrics=metrics)
    report = worker.run()
    assert report["lost"] == 40
    by_reason = {s.labels["reason"]: s.value for s in _samples(metrics, "attnlstm_entries_lost")}
    assert by_reason == {"pending": 30, "unread": 10}
    records = {fields[b"reason"]: fields for _, fields in entries(redis_client, keys.dead)}
    assert records[b"pending"][b"lost"] == b"30"
    assert records[b"pending"][b"src"] == ids[0]  # the first of them
    assert (
        records[b"pending"][b"error"] == b"30 input entries deleted from the stream while pending"
    )
    assert records[b"unread"][b"lost"] == b"10"
    assert records[b"unread"][b"src"] == ids[-1]  # where the worker was when it noticed
    assert "30 input entries lost (pending" in caplog.text
    assert "10 input entries lost (unread" in caplog.text
    assert report["forecasts"] == redis_client.xlen(keys.output) > 0  # the rest is served
    assert drained(redis_client, keys)  # Redis's lag counts them as read: no false lag
    assert drain(settings_for(redis_url, keys), trained_sines)["lost"] == 0  # counted once


class _Killed(BaseException):
    """The process killed at that point: nothing after it runs."""


@pytest.mark.parametrize("binary", server_binaries())
def test_input_lost_unread_is_recorded_once_by_a_worker_killed_as_it_records_it(
    monkeypatch: pytest.MonkeyPatch, binary: Path, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """The dead letter of entries lost unread, and the group's read counter moved past
    them, are one step. Before, the dead letter was written first: on a server whose
    counter does not count trimmed entries as read (Debian's Redis 7.0; Valkey 8 does),
    a worker killed just after it left the loss to be found, and recorded, again."""
    write = Recovery._write

    def killed_once_recorded(self: Recovery, call: Command) -> Any:
        reply = write(self, call)
        if any(b"lost" in fields for _, fields in entries(self.client, keys.dead)):
            raise _Killed
        return reply

    with EmbeddedServer(binary=binary) as server, redis.Redis.from_url(server.url) as client:
        fill(client, keys.input, sine_steps(2, 40, seed=13))  # 80 entries
        client.xgroup_create(keys.input, keys.group, id="0", entries_read=0)
        client.xtrim(keys.input, maxlen=70, approximate=False)  # 10 gone unread
        with monkeypatch.context() as patch:
            patch.setattr(Recovery, "_write", killed_once_recorded)
            with pytest.raises(_Killed):  # its lease left to lapse, as a killed one's
                drain(settings_for(server.url, keys, lease_ttl_ms=1000), trained_sines)
        report = drain(settings_for(server.url, keys), trained_sines)
        records = [fields for _, fields in entries(client, keys.dead) if b"lost" in fields]
        assert [(r[b"reason"], r[b"lost"]) for r in records] == [(b"unread", b"10")]
        assert report["lost"] == 0
        assert drained(client, keys)


def test_pending_input_deleted_is_recorded_by_a_worker_killed_as_it_counts_it(
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """The claim that finds pending entries deleted from the stream drops them from the
    group: their dead letter is written in the same call. Before, it came after: a
    worker killed between the two left them recorded nowhere (its successor's claim
    finds nothing)."""
    fill(redis_client, keys.input, sine_steps(2, 40, seed=15))  # 80 entries
    redis_client.xgroup_create(keys.input, keys.group, id="0")
    redis_client.xreadgroup(keys.group, "ghost", {keys.input: ">"}, count=30)  # then it died
    redis_client.xtrim(keys.input, maxlen=50, approximate=False)  # the 30 pending are gone
    count = Recovery._count

    def killed_at_pending(self: Recovery, lost: Any) -> None:
        if lost.reason == "pending":
            raise _Killed
        count(self, lost)

    with monkeypatch.context() as patch:
        patch.setattr(Recovery, "_count", killed_at_pending)
        with pytest.raises(_Killed):
            drain(settings_for(redis_url, keys, lease_ttl_ms=1000), trained_sines)
    drain(settings_for(redis_url, keys), trained_sines)
    records = [fields for _, fields in entries(redis_client, keys.dead) if b"lost" in fields]
    assert [(r[b"reason"], r[b"lost"]) for r in records] == [(b"pending", b"30")]
    assert drained(redis_client, keys)


def test_input_trimmed_unread_is_counted_on_the_group_the_worker_created(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """XGROUP CREATE ... 0 leaves the group's entries-read nil, and the worker's count of
    what it read stayed unknown: for a deployment's whole first run, input trimmed
    unread went uncounted."""
    metrics = Metrics()
    settings = settings_for(redis_url, keys, block_ms=100)
    with WorkerThread(new_worker(settings, trained_sines, metrics=metrics)) as running:
        running.wait_for(lambda: redis_client.exists(keys.input))  # the group is there
        pipe = redis_client.pipeline(transaction=True)  # no read comes between
        for t in range(30):
            for j in range(2):
                pipe.xadd(keys.input, {"series": f"s{j}", "value": str(float(t + j))})
        pipe.xtrim(keys.input, maxlen=30, approximate=False)
        pipe.execute()
        running.wait_for(lambda: "30 input entries lost (unread" in caplog.text)
    by_reason = {s.labels["reason"]: s.value for s in _samples(metrics, "attnlstm_entries_lost")}
    assert by_reason == {"unread": 30, "pending": 0}  # each reason there from the start


@pytest.mark.parametrize("binary", server_binaries())
def test_a_group_count_of_entries_read_short_of_the_truth_loses_nothing(
    binary: Path, keys: Keys, trained_sines: AttentionLSTM, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica of Redis 7.0, once promoted, gives a group a count of entries read
    thousands short of its primary's, its last delivered entry in step (a review's
    failovers: 9,496 short after a CLUSTER FAILOVER). Nothing was ever removed from the
    stream, so nothing is lost: the count is set right, and a loss after it is counted as
    it is. Before, each failover logged, counted and dead-lettered that many entries as
    lost unread."""
    values = sine_steps(2, 70, seed=16)
    with EmbeddedServer(binary=binary) as server, redis.Redis.from_url(server.url) as client:
        ids = fill(client, keys.input, values[:40])  # 80 entries
        drain(settings_for(server.url, keys), trained_sines)
        client.xgroup_setid(keys.input, keys.group, ids[-1], entries_read=30)  # 50 short
        ids += fill(client, keys.input, values[40:60])  # 40 more
        with caplog.at_level(logging.INFO, logger="attnlstm.worker"):
            report = drain(settings_for(server.url, keys), trained_sines)
        assert report["lost"] == 0
        assert not [f for _, f in entries(client, keys.dead) if b"lost" in f]
        assert "was 70, not 120, with nothing ever removed: set to 120" in caplog.text
        assert client.xinfo_groups(keys.input)[0]["lag"] == 0  # Redis's count set right
        assert_forecasts(client, keys.output, expected(trained_sines, values[:60], ids))
        ids += fill(client, keys.input, values[60:])  # 20 more, 10 of them trimmed unread
        client.xtrim(keys.input, maxlen=10, approximate=False)
        assert drain(settings_for(server.url, keys), trained_sines)["lost"] == 10
        records = [f for _, f in entries(client, keys.dead) if b"lost" in f]
        assert [(r[b"reason"], r[b"lost"]) for r in records] == [(b"unread", b"10")]


@pytest.mark.parametrize("binary", server_binaries())
def test_input_trimmed_unread_that_a_dead_worker_read_past_is_counted(
    binary: Path, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Entries trimmed unread, then a read past them by a worker that died before it
    counted them: its successor's count, taken from the group's, shows the loss, which
    a count "set right" for a stream with nothing removed past its entry hid (a review
    of that fix, on Redis 7.0). Valkey's group counts the trimmed entries as read: no
    count shows this loss there."""
    if "valkey" in binary.name:
        pytest.skip("Valkey's group counts entries trimmed unread as read")
    values = sine_steps(2, 60, seed=17)
    with EmbeddedServer(binary=binary) as server, redis.Redis.from_url(server.url) as client:
        fill(client, keys.input, values[:40])  # 80 entries
        drain(settings_for(server.url, keys), trained_sines)
        fill(client, keys.input, values[40:])  # 40 more
        client.xtrim(keys.input, maxlen=20, approximate=False)  # 20 of them unread
        client.xreadgroup(keys.group, "died", {keys.input: ">"})  # then it died
        assert drain(settings_for(server.url, keys, claim_idle_ms=0), trained_sines)["lost"] == 20
        records = [f for _, f in entries(client, keys.dead) if b"lost" in f]
        assert [(r[b"reason"], r[b"lost"]) for r in records] == [(b"unread", b"20")]


def test_input_trimmed_past_the_saved_state_rebuilds_the_windows_not_joins_a_gap(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Entries handled and acked, but after the saved state's (checkpoints lag), are
    trimmed; then a dropped connection re-syncs from the saved state. The re-read missed
    them, and each series' window joined the values before the gap to those after it:
    forecasts that no uninterrupted run gives, and not a word."""
    values = sine_steps(3, 80, seed=12)
    settings = settings_for(redis_url, keys, checkpoint_interval_s=600.0, max_batch=6)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        ids = fill(redis_client, keys.input, values[:40], chunk=6)
        running.wait_for(lambda: drained(redis_client, keys))
        redis_client.xtrim(keys.input, maxlen=0, approximate=False)  # all handled, acked
        assert kill_named(redis_client, "test-worker") > 0
        ids += fill(redis_client, keys.input, values[40:], chunk=6)
        running.wait_for(lambda: drained(redis_client, keys))
    assert "the input was trimmed past the saved window state's entry" in caplog.text
    # The windows fill again from the first value after the gap.
    before = expected(trained_sines, values[:40], ids[:120])
    after = expected(trained_sines, values[40:], ids[120:])
    assert_forecasts(redis_client, keys.output, before | after)


class _NewerFunctions:
    """``worker`` run in a thread of its own while a newer release's functions are loaded
    (:meth:`load`), for a ``with`` block; then this release's again, the worker stopped."""

    def __init__(self, client: redis.Redis, worker: loop.Worker) -> None:
        self.client, self.worker = client, worker
        self.version = str(int(VERSION) + 1)
        self.failed: list[ValueError] = []
        self.running = threading.Thread(target=self._run, name="worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except ValueError as e:
            self.failed.append(e)

    def __enter__(self) -> _NewerFunctions:
        self.running.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.function_load(LIBRARY, replace=True)
        self.worker.stop()

    def load(self) -> None:
        newer = LIBRARY.replace(f"local VERSION = '{VERSION}'", f"local VERSION = '{self.version}'")
        self.client.function_load(newer, replace=True)

    def stopped_with(self) -> list[str]:
        """What stopped the worker (it must stop within 60 s)."""
        self.running.join(timeout=60)
        assert not self.running.is_alive()
        return [str(e) for e in self.failed]


def test_a_worker_stopped_by_a_newer_library_hands_its_lease_back(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A newer release's workers loaded their functions mid-run; this worker's re-sync
    found them and stopped (it may not call them), its lease held until it lapsed: the
    newer workers waited that long for its partitions."""
    worker = new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)
    with _NewerFunctions(redis_client, worker) as newer:
        wait_for(lambda: redis_client.exists(keys.lease))
        wait_for(lambda: worker._in_step)
        newer.load()
        kill_named(redis_client, "test-worker")  # a re-sync: the library checked again
        assert newer.stopped_with() == [
            f"Redis has version {newer.version} of the attnlstm functions, newer than this "
            f"worker's {VERSION}: run this worker's newer release (its workers loaded them; "
            "in the docker-compose deployment, `docker compose up -d --build` builds the "
            "image of the checkout whose functions were loaded)"
        ]
        assert not redis_client.exists(keys.lease)


def test_a_worker_calling_a_newer_library_mid_run_writes_nothing_and_stops(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A newer release's workers loaded their functions while this one ran. It checks the
    version only at its start and re-syncs, so it went on calling them, with arguments
    laid out for its own: where the layout had changed, a publish wrote a batch wrong or
    half of it (what a rolling upgrade from before the functions checked versions did,
    forecasts with a value for a src). Each call now names its version, and the newer
    functions refuse it before writing anything: the worker stops, its lease handed
    back, its batch left pending for the newer worker that follows."""
    values = sine_steps(2, 30, seed=21)
    worker = new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)
    with _NewerFunctions(redis_client, worker) as newer:
        fill(redis_client, keys.input, values[:10])
        wait_for(lambda: drained(redis_client, keys))
        published = redis_client.xlen(keys.output)
        newer.load()
        fill(redis_client, keys.input, values[10:])
        [said] = newer.stopped_with()
        assert (
            f"ATTNLSTM_VERSION Redis has version {newer.version} of the attnlstm functions, "
            f"and this worker calls version {VERSION}" in said
        )
        assert said.endswith(
            "run one release on every worker (a worker loads its own at start over an older "
            "release's, never over a newer one)"
        )
        assert redis_client.xlen(keys.output) == published  # not a forecast more
        assert redis_client.xlen(keys.dead) == 0
        assert not redis_client.exists(keys.lease)
        pending = redis_client.xpending(keys.input, keys.group)["pending"]
        assert 0 < pending <= 2 * 20  # read, not handled: the next worker's to forecast


def test_connection_churn_never_dead_letters_valid_input(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every connection of the worker killed every 20-50 ms through a drain, at least
    10 times: Redis's delivery count of the pending entries grows at every re-sync's
    claim, but the same process never counts an attempt against them."""
    values = sine_steps(100, 300, seed=11)
    ids = fill(redis_client, keys.input, values)
    want = expected(trained_sines, values, ids)
    settings = settings_for(redis_url, keys, max_batch=500)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        kills, deadline = 0, time.monotonic() + 60
        while kills < 10 and time.monotonic() < deadline:  # backing off, it is seldom there
            kills += kill_connections(redis_client, "test-worker", seconds=1, seed=11 + kills)
        running.wait_for(lambda: drained(redis_client, keys), timeout=120)
    assert redis_client.xlen(keys.dead) == 0
    assert kills >= 10
    assert caplog.text.count("retrying") >= 3  # backing off between them
    assert_forecasts(redis_client, keys.output, want)


def test_a_vanished_group_is_recreated_loudly(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a Redis restarted without persistence looks like: NOGROUP, not a crash loop."""
    worker = new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: worker.metrics.role == "active")
        redis_client.delete(keys.input, keys.state)
        values = sine_steps(2, 30, seed=10)
        ids = fill(redis_client, keys.input, values)
        running.wait_for(lambda: drained(redis_client, keys))
    assert "had vanished" in caplog.text
    # Counted, for an alert: only the log said so, and the input unread then was gone
    # without a count (a review).
    assert worker.metrics.registry.get_sample_value("attnlstm_groups_recreated_total") == 1
    # A fresh start on the new stream: each of its entries forecast once, from its values.
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


@pytest.mark.parametrize("stream", ["anomalies", "dead"])
def test_a_key_of_another_type_where_a_stream_goes_stops_the_worker_before_it_writes_twice(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM, stream: str
) -> None:
    """A string where the anomalies (or dead-letter) stream should be: the batch with an
    event (a dead letter) for it is refused whole, before any write (a function keeps the
    writes made before one that fails, and each retry would publish the batch's forecasts
    again), and the worker exits saying what to fix, its lease handed back (a successor
    used to wait for it to lapse). With the key gone, a restart publishes every forecast
    once."""
    values = spiked(sine_steps(100, 60, seed=35), 10, seed=35)
    ids = fill(redis_client, keys.input, values)
    redis_client.xadd(keys.input, {"series": "s0", "value": "abc"})  # a dead letter
    key = getattr(keys, stream)
    redis_client.set(key, b"an admin's")
    with pytest.raises(ValueError, match=f"{re.escape(key)} holds a string, not a stream"):
        new_worker(settings_for(redis_url, keys), trained_sines, burst=True).run()
    assert redis_client.get(keys.lease) is None
    redis_client.delete(key)
    drain(settings_for(redis_url, keys), trained_sines)
    windowed = stood_in(redis_client, keys, values, ids)
    assert_forecasts(redis_client, keys.output, expected(trained_sines, windowed, ids))
    assert redis_client.xlen(keys.dead) == 1


def test_a_group_reset_under_a_saved_state_repeats_nothing(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The group is destroyed but the stream and the window state are not: the group
    comes back from the start of the stream, and the entries the state already holds
    must be acked, not forecast a second time."""
    values = sine_steps(3, 60, seed=12)
    ids = fill(redis_client, keys.input, values[:40])
    with WorkerThread(
        new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)
    ) as running:
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 3 * 21)
        running.wait_for(lambda: _pending(redis_client, keys) == 0)
        assert redis_client.exists(keys.state)
        redis_client.xgroup_destroy(keys.input, keys.group)
        ids += fill(redis_client, keys.input, values[40:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 3 * 41)
        running.wait_for(lambda: _pending(redis_client, keys) == 0)
    assert "had vanished" in caplog.text
    assert "or the group was reset; re-syncing" in caplog.text
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_a_database_the_server_does_not_have_is_an_error_not_a_wait(
    trained_sines: AttentionLSTM,
) -> None:
    """Unlike a server not up yet, no retry mends a database number past the server's
    (16 by default): the worker exits saying so, instead of retrying forever."""
    with EmbeddedServer(port=free_port()) as server:
        url = server.tcp_url.removesuffix("/0") + "/99"
        worker = new_worker(settings_for(url, Keys(), block_ms=100), trained_sines)
        refused = r"Redis refused this worker \(DB index is out of range\); the URL's database"
        with pytest.raises(ValueError, match=refused):
            worker.run()


@pytest.mark.parametrize(
    ("planted", "refused"),
    [
        (
            "lease",
            r"Redis refused this worker \(Command # 1 \(GET .*\) of pipeline caused error: "
            r"WRONGTYPE .*\); a key this command uses holds another type",
        ),
        (
            "fence",
            r"Redis refused this worker \(value is not an integer or out of range .*\); a key "
            r"where the worker counts \(a lease's fence: sensors:fence:forecasters",
        ),
    ],
)
def test_a_lease_or_fence_of_another_making_is_an_error_not_a_wait(
    planted: str,
    refused: str,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """A hash where the lease is (read in a pipeline, whose refusal redis-py words after
    "Command # 1 (...) of pipeline caused error:"), or text where the fence counts: no
    retry mends either, and the worker retried them every 5 s for ever."""
    if planted == "lease":
        redis_client.hset(keys.lease, "a", "b")
    else:
        redis_client.set(keys.fence, "zz")
    worker = new_worker(settings_for(redis_url, keys, block_ms=100), trained_sines)
    with pytest.raises(ValueError, match=refused):
        worker.run()


def test_redis_unreachable_at_start_is_waited_for(
    trained_sines: AttentionLSTM, caplog: pytest.LogCaptureFixture
) -> None:
    keys, port = Keys(), free_port()
    settings = settings_for(f"redis://127.0.0.1:{port}/0", keys, block_ms=100)
    worker = new_worker(settings, trained_sines)
    with WorkerThread(worker) as running:
        errors = worker.metrics.registry
        running.wait_for(lambda: errors.get_sample_value("attnlstm_redis_errors_total") or 0)
        with EmbeddedServer(port=port) as server:  # only now does anything listen there
            client = redis.Redis.from_url(server.tcp_url)
            values = sine_steps(2, 30, seed=13)
            ids = fill(client, keys.input, values)
            running.wait_for(lambda: client.xlen(keys.output) == 2 * 11)
            assert_forecasts(client, keys.output, expected(trained_sines, values, ids))
            running.stop()
            client.close()
    assert "Connection refused" in caplog.text
    assert "retrying in" in caplog.text


def test_a_server_that_does_not_answer_at_start_is_waited_for(
    model_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that takes the connection and says nothing (frozen, or behind a firewall
    that drops): redis-py's TimeoutError, which is no ConnectionError, ended the worker as
    it started (its question whether the server is a cluster's node timed out), where a
    refused connection is waited for."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts, never answers
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        settings = settings_for(url, Keys(), model=model_file, block_ms=100, socket_timeout_s=0.5)
        stop, outcome = StopRequest(), list[object]()

        def serve() -> None:
            try:
                outcome.append(run_service(settings, burst=False, stop=stop))
            except ValueError as e:  # what the command line says
                outcome.append(str(e))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        wait_for(lambda: caplog.text.count("retrying in") >= 2 or not thread.is_alive())
        stop(signal.SIGTERM, None)
        thread.join(timeout=60)
    assert "Redis: Timeout reading from" in caplog.text
    assert "stopped while waiting for the Redis: Timeout reading from" in caplog.text
    (report,) = outcome  # a stop as any other (exit 0): it was an error (exit 1)
    assert isinstance(report, dict)
    assert report["read"] == report["forecasts"] == 0


def test_credentials_redis_refuses_are_an_error_not_a_wait(
    trained_sines: AttentionLSTM, tmp_path: Path
) -> None:
    """A password missing or wrong (redis-py's AuthenticationError, a ConnectionError) was
    retried for ever, the log saying nothing of the password."""
    with EmbeddedServer(port=free_port()) as server:
        url = server.tcp_url.replace("redis://", "redis://nobody:wrong@")
        worker = new_worker(settings_for(url, Keys(), block_ms=100), trained_sines)
        refused = (
            r"Redis refused this worker \(invalid username-password pair.*\); give the URL's "
            r"user and password \(redis://USER:PASSWORD@HOST:PORT/DB\), or the password in a "
            r"file named by ATTNLSTM_REDIS_PASSWORD_FILE"
        )
        with pytest.raises(ValueError, match=refused):
            worker.run()
        # A password from a file: that file's is the one to check.
        password_file = tmp_path / "pw"
        password_file.write_text("wrong\n")
        user_only = server.tcp_url.replace("redis://", "redis://nobody@")
        settings = settings_for(user_only, Keys(), block_ms=100, redis_password_file=password_file)
        refused = (
            r"Redis refused this worker \(invalid username-password pair.*\); the password in "
            f"{password_file} is not the one of the URL's user: check both$"
        )
        with pytest.raises(ValueError, match=refused):
            new_worker(settings, trained_sines).run()


def test_a_server_of_no_cluster_taken_for_one_is_an_error_not_a_wait() -> None:
    """ATTNLSTM_CLUSTER=true against one server: redis-py's cluster client refuses it
    (cluster mode not enabled), which was taken for no node answering, and the worker
    waited for ever."""
    refused = "Cluster mode is not enabled on this node: the"
    with EmbeddedServer(port=free_port()) as server, pytest.raises(ValueError, match=refused):
        connect(server.tcp_url, socket_timeout_s=5, client_name="test", cluster=True)


def test_a_lost_state_is_rebuilt_from_the_stream_without_publishing_again(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    values = sine_steps(3, 50, seed=14)
    ids = fill(redis_client, keys.input, values[:40])
    settings = settings_for(redis_url, keys)
    drain(settings, trained_sines)
    assert redis_client.delete(keys.state) == 1
    ids += fill(redis_client, keys.input, values[40:])
    report = drain(settings, trained_sines)
    assert report["forecasts"] == 3 * 10  # only the new entries
    want = expected(trained_sines, values, ids)
    assert_forecasts(redis_client, keys.output, want)  # windows were whole


# -- fenced ownership: one writer, whatever happens to the others ---------------------


def test_two_workers_with_one_consumer_name_publish_each_input_once(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A consumer name is a role, not a process: two processes started with one name
    (ATTNLSTM_CONSUMER set for both) must not both write."""
    values = sine_steps(200, 60, seed=15)  # 12,000 entries
    ids = fill(redis_client, keys.input, values)
    settings = settings_for(redis_url, keys, consumer="same", max_batch=64, block_ms=100)
    workers = [new_worker(settings, trained_sines) for _ in range(2)]
    with WorkerThread(workers[0]) as first, WorkerThread(workers[1]):
        first.wait_for(lambda: redis_client.xlen(keys.output) >= 200 * 41)
        first.wait_for(lambda: _pending(redis_client, keys) == 0)
        # While both run: at exit the one stopped second may take the lease the first
        # gave back, and end active too.
        assert sorted(w.metrics.role for w in workers) == ["active", "standby"]
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    model_file: Path,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGSTOP mid-drain, a second worker takes over once the lease expires, SIGCONT:
    the first one's next write is refused by Redis, and it steps back."""
    values = sine_steps(300, 80, seed=16)  # 24,000 entries
    ids = fill(redis_client, keys.input, values)
    flags = ("--max-batch", "50", "--lease-ttl-ms", "1000", "--block-ms", "100")
    frozen = WorkerProcess(worker_cmd(model_file, redis_url, keys, *flags), tmp_path)
    with frozen:
        frozen.wait_for(lambda: redis_client.xlen(keys.output) >= 3000)
        frozen.proc.send_signal(signal.SIGSTOP)
        settings = settings_for(redis_url, keys, max_batch=50, lease_ttl_ms=1000, block_ms=100)
        successor = new_worker(settings, trained_sines)
        with WorkerThread(successor) as running:
            running.wait_for(lambda: successor.metrics.role == "active")
            frozen.proc.send_signal(signal.SIGCONT)  # it wakes up believing it is active
            running.wait_for(lambda: redis_client.xlen(keys.output) >= 300 * 61)
            running.wait_for(lambda: _pending(redis_client, keys) == 0)
            assert frozen.proc.poll() is None  # stepped back, still running
    log = frozen.stderr
    refused = [line for line in log.splitlines() if "re-syncing" in line and "fence" in line]
    assert refused, log[-3000:]  # its write (or its renewal) was refused: fenced
    assert "waiting:" in log.split(refused[0])[1]  # then a standby
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))


def test_a_quiet_stream_keeps_a_short_lease(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A lease as long as block_ms (2 s each; the default is 1 s each) on a stream with
    nothing to read: each read blocks at most a third of the lease, and the renewals
    between them keep it (before, every idle read let it lapse, and the renewal after
    took it back at the next fence number and re-synced, once a lease)."""
    settings = settings_for(redis_url, keys, lease_ttl_ms=2000, block_ms=2000)
    worker = new_worker(settings, trained_sines)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: worker.metrics.role == "active")
        quiet_until = time.monotonic() + 5.0  # two and a half leases' lives
        running.wait_for(lambda: time.monotonic() > quiet_until)
        assert redis_client.get(keys.fence) == b"1"
        assert worker.metrics.registry.get_sample_value("attnlstm_recoveries_total") == 1


def test_a_resync_longer_than_the_lease_keeps_it(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """No state key, and a stream whose entries were all handled: a start re-reads them
    all, page by page (pages of max_batch 4 here), publishing nothing, for longer than
    the lease lives. It renews the lease as it goes, so a second worker started
    meanwhile waits instead of taking over and publishing what was published."""
    values = sine_steps(400, 100, seed=17)  # 40,000 entries
    fill(redis_client, keys.input, values)
    redis_client.xgroup_create(keys.input, keys.group, id="$")  # all delivered, none pending
    settings = settings_for(redis_url, keys, lease_ttl_ms=1000, block_ms=100, max_batch=4)
    first, second = new_worker(settings, trained_sines), new_worker(settings, trained_sines)
    with WorkerThread(first) as running:
        running.wait_for(lambda: redis_client.get(keys.lease) is not None)
        started = time.monotonic()
        with WorkerThread(second):
            running.wait_for(lambda: first.metrics.role == "active")  # re-synced
            resync_s = time.monotonic() - started
            assert second.metrics.role == "standby"
            assert redis_client.get(keys.fence) == b"1"  # one holder all along
            assert resync_s > 1.5, f"the re-sync took {resync_s:.1f} s: not past the lease"
            more = fill(redis_client, keys.input, sine_steps(400, 101, seed=17)[100:])
            running.wait_for(lambda: redis_client.xlen(keys.output) == len(more))
            running.wait_for(lambda: _pending(redis_client, keys) == 0)
    assert redis_client.xlen(keys.output) == 400  # only the new entries: one forecast each


def test_an_entry_put_aside_is_not_handled_again_by_a_restart_before_the_checkpoint(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Put aside, a poison entry is acked, and the checkpoint passes it once every chunk
    changed before it is saved again. A worker killed before that re-read it as an acked
    entry, into its series' window and through the model: a crash at every start, and no
    attempt counted. The put-aside names it in the state's meta: the re-read skips it,
    and every later forecast of its series is an uninterrupted run's."""
    values = sine_steps(2, 40, seed=9)
    ids = fill(redis_client, keys.input, values[:25])
    poison = cast(bytes, redis_client.xadd(keys.input, {"series": "s0", "value": "1.0"}))
    _crash_at(poison, monkeypatch)
    # Each worker killed -9 once drained: nothing saved at its stop.
    monkeypatch.setattr(Recovery, "save", lambda self, state, scoring: self.lease.release())
    settings = settings_for(redis_url, keys, max_batch=8, lease_ttl_ms=1000, max_attempts=3)
    assert _drain_through_crashes(settings, trained_sines) == 3
    assert list(by_src(redis_client, keys.dead)) == [poison]
    drain(settings, trained_sines)  # restarted: the re-read meets the poison, acked
    ids += fill(redis_client, keys.input, values[25:])
    drain(settings, trained_sines)  # and again, with more input
    assert list(by_src(redis_client, keys.dead)) == [poison]
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))
    assert _pending(redis_client, keys) == 0


def test_entry_ids_past_int64_are_dead_lettered_and_every_restart_goes_on(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Redis takes ids of two unsigned 64-bit numbers; the worker holds them as int64.
    Such an entry was forecast (a sequence number past it) and saved as the windows'
    last entry, and every restore after raised OverflowError; or it raised at once (the
    milliseconds). Now each goes to the dead stream, as does every entry after one of
    2**63 ms (their ids inherit it); a state saved at one is refused and rebuilt."""
    values = sine_steps(2, 30, seed=21)
    ids = fill(redis_client, keys.input, values)
    last_ms = int(ids[-1].split(b"-")[0])
    settings = settings_for(redis_url, keys, max_batch=8)
    reading: dict[Any, Any] = {"series": "s0", "value": "1.0"}
    bad = [cast(bytes, redis_client.xadd(keys.input, reading, id=f"{last_ms}-{2**63}"))]
    drain(settings, trained_sines)
    drain(settings, trained_sines)  # the windows' last entry is past int64
    bad.append(cast(bytes, redis_client.xadd(keys.input, reading, id=f"{2**63}-0")))
    bad.append(cast(bytes, redis_client.xadd(keys.input, reading)))  # 2**63 ms too
    drain(settings, trained_sines)
    drain(settings, trained_sines)  # the idle sweep's clock is past int64
    dead = by_src(redis_client, keys.dead)
    assert list(dead) == bad
    assert {f[b"error"].split(b":")[0] for f in dead.values()} == {
        b"id has a part past 2**63-1 (the worker keeps ids as int64)"
    }
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))
    assert _pending(redis_client, keys) == 0
