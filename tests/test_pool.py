"""A pool of workers sharing P partitions: a fair share each through fenced leases,
takeover when one dies, rebalancing when one joins; every input forecast once, equal
to what one worker publishes."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import redis

from attnlstm.model import AttentionLSTM
from attnlstm.partition import partition_of
from attnlstm.synthetic import sine_steps
from tests.cluster import LocalCluster, local_cluster, owner
from tests.conftest import CLI
from tests.helpers import (
    WorkerProcess,
    WorkerThread,
    assert_forecasts,
    drain,
    drained,
    entries,
    expected,
    fill,
    kill_named,
    new_worker,
    same_output,
    settings_for,
    spiked,
    stood_in,
    wait_for,
    worker_cmd,
    worker_env,
)
from worker.app import run_service
from worker.keys import Keys
from worker.lease import Lease, ensure_library, process_token
from worker.loop import Lane, Worker
from worker.pool import PartitionsError, Pool
from worker.recovery import Recovery
from worker.settings import Settings
from worker.signals import StopRequest
from worker.streams import connect
from worker.tools.readback import read_views
from worker.tools.replay import replay


def _replay(client: redis.Redis, base: Keys, values: np.ndarray, partitions: int) -> list[str]:
    """``values`` (steps, series) into the partitions of ``base``, series ``s{j}``, as
    ``attnlstm replay --partitions`` writes them; the series names."""
    names = [f"s{j}" for j in range(values.shape[1])]
    flat = [
        (b"series", name.encode(), b"value", repr(float(v)).encode())
        for row in values
        for name, v in zip(names, row, strict=True)
    ]
    replay(client, base.input, flat, rate=None, partitions=partitions)
    return names


def _all_drained(client: redis.Redis, base: Keys, partitions: int) -> bool:
    return all(drained(client, base.partition(k, partitions)) for k in range(partitions))


def _assert_every_input_once(
    client: redis.Redis,
    base: Keys,
    partitions: int,
    model: AttentionLSTM,
    values: np.ndarray,
    names: list[str],
) -> None:
    """Each partition's output holds one forecast per input whose window is full, equal
    to the offline model's (which one worker's run publishes: tests/test_worker.py) on
    the windows its anomaly events give."""
    for k in range(partitions):
        keys = base.partition(k, partitions)
        mine = [j for j, name in enumerate(names) if partition_of(name, partitions) == k]
        ids = [entry_id for entry_id, _ in entries(client, keys.input)]
        windowed = stood_in(client, keys, values[:, mine], ids)
        assert_forecasts(client, keys.output, expected(model, windowed, ids))


def _assert_as_one_worker(
    target: Target, model: AttentionLSTM, values: np.ndarray, partitions: int
) -> int:
    """Each partition's output is what one worker serving every partition, never
    stopped, publishes: forecasts, intervals and anomaly events, to the bit (a
    partition's scoring goes with it from worker to worker). How many events."""
    _replay(target.client, target.ref, values, partitions)
    drain(settings_for(target.url, target.ref, partitions=partitions, max_batch=50), model)
    events = 0
    for k in range(partitions):
        got, want = target.base.partition(k, partitions), target.ref.partition(k, partitions)
        ids = [entry_id for entry_id, _ in entries(target.client, got.input)]
        ref_ids = [entry_id for entry_id, _ in entries(target.client, want.input)]
        to_ref = dict(zip(ids, ref_ids, strict=True))
        events += same_output(target.client, got, want, to_ref)[1]
    return events


def _holders(client: redis.Redis, base: Keys, partitions: int) -> list[str | None]:
    """Per partition, the consumer name of the worker holding its lease."""
    leases = [base.partition(k, partitions).lease for k in range(partitions)]
    held = [cast(bytes | None, client.get(lease)) for lease in leases]
    return [h.decode().rpartition("#")[0] if h else None for h in held]


@dataclass(frozen=True)
class Target:
    """Where a pool runs: one server, or a Redis Cluster (keys tagged for it)."""

    client: redis.Redis
    url: str
    base: Keys
    ref: Keys  # beside it, for a reference run


@pytest.fixture(params=["server", "cluster"])
def target(request: pytest.FixtureRequest, stream_prefix: str) -> Iterator[Target]:
    base, ref = Keys.prefixed(stream_prefix), Keys.prefixed(f"{stream_prefix}ref:")
    if request.param == "server":
        client, url = request.getfixturevalue("redis_client"), request.getfixturevalue("redis_url")
        yield Target(client, url, base, ref)
        return
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    client = connect(cluster.url, socket_timeout_s=10, client_name="test")
    try:
        yield Target(client, cluster.url, base.clustered(), ref.clustered())
    finally:
        client.close()


def test_each_worker_s_share_is_p_over_n_and_they_add_up_to_p(
    redis_client: redis.Redis, keys: Keys
) -> None:
    ensure_library(redis_client)
    tokens = [process_token(f"w{i}") for i in range(5)]
    pools = [Pool(redis_client, keys, token=t, ttl_ms=5000, partitions=12) for t in tokens]
    for pool in pools:
        pool.share()  # each announces itself
    shares = [pool.share() for pool in pools]
    assert sorted(shares) == [2, 2, 2, 3, 3]
    pools[0].leave()
    assert sum(pool.share() for pool in pools[1:]) == 12  # 4 workers: 3 each
    assert {pool.share() for pool in pools[1:]} == {3}
    alone = Pool(redis_client, keys, token=tokens[0], ttl_ms=5000, partitions=1)
    assert alone.share() == 1  # one partition: no pool, a standby waits for the lease


def test_a_worker_past_the_partitions_is_a_healthy_standby(
    redis_url: str, keys: Keys, trained_sines: AttentionLSTM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three workers, two partitions: the third's share is none. It asks no lease, yet it
    answers /healthz as a standby that Redis answers (its heartbeat stopped there, and
    after 10 s docker marked a container of `--scale worker=13` unhealthy)."""
    asked: list[tuple[float, str]] = []  # each lease asked for: when, and by which token
    acquire = Lease.acquire

    def recorded(lease: Lease, *, new_term: bool = False) -> tuple[str, int]:
        asked.append((time.monotonic(), lease.token))
        return acquire(lease, new_term=new_term)

    monkeypatch.setattr(Lease, "acquire", recorded)
    settings = settings_for(redis_url, keys, partitions=2, lease_ttl_ms=1500, block_ms=100)
    workers = [new_worker(settings.model_copy(update={"consumer": c}), trained_sines)
               for c in ("a", "b", "c")]  # fmt: skip
    with WorkerThread(workers[0]) as a, WorkerThread(workers[1]), WorkerThread(workers[2]):
        # Settled: the same worker a standby for three times the staleness below (at the
        # start, the shares move as the workers announce themselves).
        seen: list[tuple[Worker | None, float]] = [(None, 0.0)]  # the standby, since when

        def settled() -> bool:
            roles = sorted(w.metrics.role for w in workers)
            standby = next((w for w in workers if w.metrics.role == "standby"), None)
            now = time.monotonic()
            if roles != ["active", "active", "standby"] or standby is not seen[0][0]:
                seen[0] = (standby, now)
                return False
            return now - seen[0][1] > 3

        a.wait_for(settled, timeout=60)
        standby = seen[0][0]
        assert standby is not None
        ok, body = standby.metrics.health(stale_after_s=1.0)
        assert ok, body
        assert body["role"] == "standby"
        since, mine = seen[0][1], f"{standby.settings.consumer}#"
        assert not [t for at, t in asked if at > since and t.startswith(mine)]
        assert [t for at, t in asked if at > since]  # the two active ones renew theirs


def test_a_stop_during_a_taken_partitions_re_sync_saves_none_it_did_not_restore(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker takes partitions 1 and 2 at its first balance; a stop arrives in the
    first one's re-sync. The second, never restored, had its empty windows saved over
    its checkpoint (no chunks, its entries put aside forgotten): the next start rebuilt
    it from the whole stream. Now every checkpoint but the one of the partition the
    worker served in step stands as it was."""
    partitions = 3
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500)
    _replay(redis_client, keys, sine_steps(12, 30, seed=4), partitions)
    drain(settings, trained_sines)
    states = [keys.partition(k, partitions).state for k in range(partitions)]
    for state in states:  # re-read from the start: each re-sync has pages, and turns
        meta = json.loads(cast(bytes, redis_client.hget(state, "meta")))
        redis_client.hset(state, "meta", json.dumps(meta | {"last_id": "0-0"}))
    before = [redis_client.hgetall(state) for state in states]
    get_in_step, started = Worker._get_lane_in_step, []

    def stopped_at_the_first_balance(worker: Worker, lane: Lane) -> None:
        if worker._in_step:  # a partition taken at a balance, not at the start
            worker.stop()
        else:
            started.append(lane.k)
        get_in_step(worker, lane)

    monkeypatch.setattr(Worker, "_get_lane_in_step", stopped_at_the_first_balance)
    worker = new_worker(settings.model_copy(update={"consumer": "b"}), trained_sines)
    worker.run()
    (first,) = started
    for k, state in enumerate(states):
        if k != first:
            assert redis_client.hgetall(state) == before[k], k
    holders = [redis_client.get(keys.partition(k, partitions).lease) for k in range(partitions)]
    assert holders == [None] * partitions  # handed back, not left to lapse


def test_partitions_re_synced_one_after_another_keep_their_leases(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each partition's re-sync takes round trips, none of which renewed the leases: on a
    slow network, three taken together outlasted the first one's lease, and every re-sync
    began again, for ever (128 partitions 3 ms away never got in step). Here each re-sync
    is held 0.6 s, 1.8 s for three, past the 1.5 s a lease lasts."""
    ensure_group = Recovery.ensure_group

    def slow(recovery: Recovery) -> None:
        time.sleep(0.6)  # the round trips of a slow network
        ensure_group(recovery)

    monkeypatch.setattr(Recovery, "ensure_group", slow)
    partitions = 4
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500)
    values = sine_steps(8, 30, seed=4)
    names = _replay(redis_client, keys, values, partitions)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        running.wait_for(lambda: _all_drained(redis_client, keys, partitions))
    assert "lost the lease" not in caplog.text
    _assert_every_input_once(redis_client, keys, partitions, trained_sines, values, names)


def test_max_series_bounds_a_worker_across_its_partitions(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One worker serving three partitions keeps windows for at most ``max_series``
    series in all; the series past it go to the dead stream, and the log says so, at
    most once a minute (it said nothing). Before, each partition kept ``max_series`` of
    its own: three times the memory the setting bounds."""
    caplog.set_level(logging.WARNING, logger="attnlstm.worker")
    partitions, limit = 3, 5
    names = _replay(redis_client, keys, sine_steps(12, 30, seed=4), partitions)
    assert len({partition_of(name, partitions) for name in names}) == partitions
    report = drain(
        settings_for(redis_url, keys, partitions=partitions, max_series=limit), trained_sines
    )
    served, refused = set(), set()
    for k in range(partitions):
        part = keys.partition(k, partitions)
        served |= {f[b"series"] for _, f in entries(redis_client, part.output)}
        for _, f in entries(redis_client, part.dead):
            assert (
                f[b"error"]
                == (
                    f"series limit reached (max_series={limit}): raise max_series, or free "
                    "the slots of series gone quiet sooner (series_idle_s)"
                ).encode()
            )
            refused.add(f[b"series"])
    assert len(served) == limit
    assert len(refused) == len(names) - limit
    assert served.isdisjoint(refused)
    assert report["dead"] == (30 * (len(names) - limit))
    said = [r.getMessage() for r in caplog.records if "entries of new series" in r.getMessage()]
    assert len(said) == 1, said  # the first refusals: the next ones within the minute
    assert re.fullmatch(
        r"\d+ entries of new series dead-lettered since the last such line: this worker "
        r"holds max_series=5 series already; raise max_series, or free the slots of "
        r"series gone quiet sooner \(series_idle_s, now 604800 s\)",
        said[0],
    )


def _streams(keys: Keys) -> dict[str, str]:
    return {"INPUT": keys.input, "OUTPUT": keys.output, "DEAD": keys.dead}


def test_three_workers_share_twelve_partitions_and_forecast_every_input_once(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    trained_sines: AttentionLSTM,
    tmp_path: Path,
) -> None:
    partitions, values = 12, sine_steps(40, 60, seed=31)  # 40 series, 60 values each
    base = Keys.prefixed(stream_prefix)
    names = _replay(redis_client, base, values, partitions)
    workers = [
        new_worker(
            settings_for(redis_url, base, partitions=partitions, lease_ttl_ms=1500, consumer=c),
            trained_sines,
        )
        for c in ("a", "b", "c")
    ]
    with contextlib.ExitStack() as running:
        threads = [running.enter_context(WorkerThread(w)) for w in workers]
        threads[0].wait_for(lambda: _all_drained(redis_client, base, partitions))
        threads[0].wait_for(lambda: sorted(len(w.lanes) for w in workers) == [4, 4, 4])
        served = [set(w.lanes) for w in workers]
        for worker, mine in zip(workers, served, strict=True):
            sample = worker.metrics.registry.get_sample_value
            # set once a re-sync has got its lanes in step, a moment after it took them
            threads[0].wait_for(lambda: sample("attnlstm_partitions_served") == 4)  # noqa: B023
            for k in mine:  # the lag per partition, refreshed by each audit
                lag = {"partition": str(k)}
                threads[0].wait_for(lambda: sample("attnlstm_partition_lag", lag) == 0)  # noqa: B023
    assert set().union(*served) == set(range(partitions))  # each one by one worker
    assert sum(map(len, served)) == partitions
    _assert_every_input_once(redis_client, base, partitions, trained_sines, values, names)
    assert redis_client.exists(base.pool) == 0  # each left the pool at exit
    # Read back across the partitions, as `attnlstm plot --from-stream` does.
    views = read_views(redis_client, base, partitions=partitions)
    assert sorted(views) == sorted(names)
    assert {len(view.forecast) for view in views.values()} == {60 - 20 + 1}
    env = worker_env() | {f"ATTNLSTM_{k}_STREAM": v for k, v in _streams(base).items()}
    plot = [*CLI, "plot", "--from-stream", "--redis-url", redis_url, "--out", str(tmp_path)]
    done = subprocess.run(
        [*plot, "--partitions", str(partitions), "--series", "s7", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["forecasts"] == 60 - 20 + 1


def test_a_worker_joining_mid_drain_takes_its_share_and_nothing_is_lost_or_repeated(
    target: Target, trained_sines: AttentionLSTM
) -> None:
    partitions, values = 6, spiked(sine_steps(100, 240, seed=32), 30, seed=32)  # 24,000 entries
    redis_client, redis_url, base = target.client, target.url, target.base
    names = _replay(redis_client, base, values, partitions)

    def settings(consumer: str) -> Settings:
        return settings_for(
            redis_url, base, partitions=partitions, lease_ttl_ms=1500, max_batch=50,
            consumer=consumer,
        )  # fmt: skip

    first, second, late = (new_worker(settings(c), trained_sines) for c in ("a", "b", "c"))
    with WorkerThread(first) as a, WorkerThread(second):
        a.wait_for(lambda: sum(redis_client.xlen(base.partition(k, partitions).output)
                               for k in range(partitions)) >= 2000)  # fmt: skip
        assert not _all_drained(redis_client, base, partitions)  # mid-drain
        with WorkerThread(late) as c:
            c.wait_for(lambda: len(late.lanes) == 2, timeout=60)
            c.wait_for(lambda: _all_drained(redis_client, base, partitions), timeout=120)
            assert sorted(len(w.lanes) for w in (first, second, late)) == [2, 2, 2]
    _assert_every_input_once(redis_client, base, partitions, trained_sines, values, names)
    assert _assert_as_one_worker(target, trained_sines, values, partitions) >= 25


def test_a_worker_killed_mid_drain_has_its_partitions_taken_over(
    target: Target, trained_sines: AttentionLSTM, model_file: Path, tmp_path: Path
) -> None:
    """kill -9 of one of three worker processes: the others take its partitions once
    their leases lapse; nothing lost, nothing repeated."""
    partitions, values = 6, spiked(sine_steps(100, 240, seed=33), 30, seed=33)  # 24,000 entries
    redis_client, redis_url, base = target.client, target.url, target.base
    flags = ("--partitions", str(partitions), "--lease-ttl-ms", "1500", "--max-batch", "50",
             "--block-ms", "100")  # fmt: skip
    procs = [
        WorkerProcess(worker_cmd(model_file, redis_url, base, *flags, "--consumer", c), tmp_path)
        for c in ("a", "b", "c")
    ]

    def c_mid_drain() -> bool:
        """c has forecast in its partitions and not drained them: its kill leaves work."""
        mine = [base.partition(k, partitions) for k in range(partitions) if held[k] == "c"]
        return any(redis_client.xlen(keys.output) for keys in mine) and not all(
            drained(redis_client, keys) for keys in mine
        )

    with procs[0] as a, procs[1], procs[2] as c:
        # The input is written once the pool has settled, two partitions each, so that c
        # has its share of it to drain (not partitions another worker drained first).
        a.wait_for(lambda: sorted(map(str, _holders(redis_client, base, partitions)))
                   == ["a", "a", "b", "b", "c", "c"], timeout=90)  # fmt: skip
        held = _holders(redis_client, base, partitions)
        names = _replay(redis_client, base, values, partitions)
        a.wait_for(c_mid_drain, timeout=60)
        c.proc.send_signal(signal.SIGKILL)
        c.proc.wait(timeout=10)
        a.wait_for(lambda: "c" not in _holders(redis_client, base, partitions), timeout=60)
        a.wait_for(lambda: _all_drained(redis_client, base, partitions), timeout=120)
        # Every lease held again, 3 each (the rebalance may end after the drain).
        a.wait_for(lambda: sorted(map(str, _holders(redis_client, base, partitions)))
                   == ["a"] * 3 + ["b"] * 3, timeout=60)  # fmt: skip
    _assert_every_input_once(redis_client, base, partitions, trained_sines, values, names)
    assert _assert_as_one_worker(target, trained_sines, values, partitions) >= 25


def test_one_worker_keeps_every_partition_s_lease_while_it_re_syncs_them_one_by_one(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Three partitions, no state keys, every entry handled: a start and the turn after
    re-read each partition in turn, page by page (pages of 4), for longer than a lease
    lives. The leases of the partitions not being re-read are renewed all along: had they
    lapsed, the worker would have counted them lost and started every re-sync again,
    forever. So is
    its place in the pool (it lapsed, and other workers would have counted one fewer).
    And it answers /healthz all along (its heartbeat once came only with a lease
    taken)."""
    partitions = 3
    values = sine_steps(300, 150, seed=34)  # 300 series, 45,000 entries
    names = _replay(redis_client, keys, values, partitions)
    for k in range(partitions):  # all delivered, none pending
        part = keys.partition(k, partitions)
        redis_client.xgroup_create(part.input, part.group, id="$")
    settings = settings_for(
        redis_url, keys, partitions=partitions, lease_ttl_ms=1000, block_ms=100, max_batch=4
    )
    worker = new_worker(settings, trained_sines)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: any(_holders(redis_client, keys, partitions)))
        started, stale, away = time.monotonic(), [], []
        sample = worker.metrics.registry.get_sample_value

        def re_synced() -> bool:
            ok, body = worker.metrics.health(stale_after_s=1.0)
            stale.extend([] if ok else [body])
            seconds, micros = redis_client.time()
            lapses = redis_client.zscore(keys.pool, worker.token)  # its entry's end, in ms
            if lapses is None or lapses < seconds * 1000 + micros // 1000:
                away.append(time.monotonic() - started)
            return sample("attnlstm_recoveries_total") == partitions

        running.wait_for(re_synced, timeout=120)
        resync_s = time.monotonic() - started
        assert not stale, stale[:3]
        assert not away, f"out of the pool {len(away)} times, first at {away[0]:.1f} s"
        fences = [redis_client.get(keys.partition(k, partitions).fence) for k in range(3)]
        assert fences == [b"1"] * partitions  # each lease taken once, kept all along
        assert resync_s > 1.5, f"the re-syncs took {resync_s:.1f} s: not past the lease"
        _replay(redis_client, keys, sine_steps(300, 151, seed=34)[150:], partitions)
        running.wait_for(lambda: _all_drained(redis_client, keys, partitions))
    outputs = [redis_client.xlen(keys.partition(k, partitions).output) for k in range(3)]
    assert sum(outputs) == len(names)  # only the new entries: one forecast each


def test_a_stop_in_the_middle_of_a_re_sync_ends_it_and_hands_the_lease_back(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """SIGTERM while a start re-reads 20,000 handled entries two at a time: the worker
    stops there, its lease handed back for the next worker to take at once, the last
    checkpoint standing. The re-sync used to run to its end first (7-31 s in the chaos
    suite), past the 10 s Docker gives a stop, which then killed it with its lease held.
    A process, signalled as Docker signals it: the handler runs in its main thread,
    between the re-sync's reads."""
    fill(redis_client, keys.input, sine_steps(200, 100, seed=37))
    drain(settings_for(redis_url, keys), trained_sines)
    redis_client.delete(keys.state)  # the next start re-reads every entry
    handled = redis_client.xlen(keys.output)
    cmd = worker_cmd(model_file, redis_url, keys, "--max-batch", "2", "--block-ms", "100")
    with WorkerProcess(cmd, tmp_path) as w:
        w.wait_for(lambda: redis_client.get(keys.lease) is not None)
        w.stop()
    assert w.returncode == 0, w.stderr[-3000:]
    assert "stopped in the middle of a re-sync" in w.stderr, w.stderr[-3000:]
    assert redis_client.get(keys.lease) is None
    assert redis_client.xlen(keys.output) == handled


def test_a_worker_refuses_streams_written_with_another_number_of_partitions(
    redis_client: redis.Redis, redis_url: str, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    base = Keys.prefixed(stream_prefix)
    _replay(redis_client, base, sine_steps(3, 8), partitions=4)
    assert redis_client.get(base.partitions) == b"4"  # replay marked it
    for count in (1, 12):
        worker = new_worker(settings_for(redis_url, base, partitions=count), trained_sines)
        with pytest.raises(PartitionsError, match=f"written in 4 partitions .* reads {count}") as e:
            worker.run()
        assert (
            "Set --partitions (ATTNLSTM_PARTITIONS) to what the streams were written with, or"
            in str(e.value)
        )
    other = Keys.prefixed(stream_prefix + "one:")
    _replay(redis_client, other, sine_steps(3, 8), partitions=1)  # today's single stream
    worker = new_worker(settings_for(redis_url, other, partitions=4), trained_sines)
    with pytest.raises(PartitionsError, match="written with one partition") as e:
        worker.run()
    assert "or start a new deployment: other stream names" in str(e.value)
    assert redis_client.get(other.partitions) is None  # refused before marking anything
    # A mark of something else's writing: "invalid literal for int() with base 10: b'x'".
    third = Keys.prefixed(stream_prefix + "x:")
    redis_client.set(third.partitions, "x")
    planted = f"{third.partitions} holds b'x', no number of partitions: something else wrote"
    worker = new_worker(settings_for(redis_url, third, partitions=4), trained_sines)
    with pytest.raises(PartitionsError, match=planted):
        worker.run()
    with pytest.raises(PartitionsError, match=planted):
        _replay(redis_client, third, sine_steps(3, 8), partitions=4)


def test_a_pool_on_a_cluster_forecasts_100k_entries_once_each_as_a_fourth_worker_joins(
    redis_cluster: LocalCluster,
    stream_prefix: str,
    trained_sines: AttentionLSTM,
    model_file: Path,
    tmp_path: Path,
) -> None:
    """P = 12 on a 3-master cluster, 100,000 entries over 1,000 series, three worker
    processes, and a fourth started mid-drain: the partitions move to it (3 each), and
    every input is forecast once, equal to the offline model's forecast (which is what
    one worker publishes: tests/test_worker.py)."""
    partitions, values = 12, sine_steps(1000, 100, seed=34)
    client = connect(redis_cluster.url, socket_timeout_s=10, client_name="test")
    base = Keys.prefixed(stream_prefix).clustered()
    names = _replay(client, base, values, partitions)
    flags = ("--partitions", str(partitions), "--lease-ttl-ms", "1500", "--max-batch", "100",
             "--block-ms", "100")  # fmt: skip

    def started(consumer: str) -> WorkerProcess:
        cmd = worker_cmd(model_file, redis_cluster.url, base, *flags, "--consumer", consumer)
        return WorkerProcess(cmd, tmp_path)

    try:
        with started("a") as a, started("b"), started("c"):
            a.wait_for(lambda: sorted(map(str, _holders(client, base, partitions)))
                       == ["a"] * 4 + ["b"] * 4 + ["c"] * 4, timeout=90)  # fmt: skip
            assert not _all_drained(client, base, partitions)  # mid-drain
            with started("d") as d:
                d.wait_for(lambda: _holders(client, base, partitions).count("d") == 3, timeout=60)
                d.wait_for(lambda: _all_drained(client, base, partitions), timeout=180)
                held = sorted(map(str, _holders(client, base, partitions)))
                assert held == ["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"] * 3
        _assert_every_input_once(client, base, partitions, trained_sines, values, names)
    finally:
        client.close()


def test_a_worker_waits_out_a_redis_cluster_that_stops_answering(
    redis_cluster: LocalCluster, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    """Every node of the cluster frozen (SIGSTOP) for a few seconds under a worker that
    serves three partitions: it retries through the outage, and once the nodes answer it
    forecasts what comes. The cluster client's refresh then raises RedisClusterException,
    which is no RedisError: it left the loop, and the worker died."""
    partitions = 3
    client = connect(redis_cluster.url, socket_timeout_s=10, client_name="test")
    base = Keys.prefixed(stream_prefix).clustered()
    settings = settings_for(
        redis_cluster.url, base, partitions=partitions, socket_timeout_s=0.5, block_ms=100
    )
    worker = new_worker(settings, trained_sines)
    errors = worker.metrics.registry
    nodes = [node.process for node in redis_cluster.nodes if node.process is not None]
    try:
        with WorkerThread(worker) as running:
            running.wait_for(lambda: worker.metrics.role == "active")
            for node in nodes:
                node.send_signal(signal.SIGSTOP)
            try:
                running.wait_for(
                    lambda: (errors.get_sample_value("attnlstm_redis_errors_total") or 0) >= 4
                )
            finally:
                for node in nodes:
                    node.send_signal(signal.SIGCONT)
            values = sine_steps(30, 25, seed=35)
            names = _replay(client, base, values, partitions)
            running.wait_for(lambda: _all_drained(client, base, partitions), timeout=120)
        _assert_every_input_once(client, base, partitions, trained_sines, values, names)
    finally:
        client.close()


def _replica_of(cluster: LocalCluster, primary: int) -> int:
    """The port of the replica of the primary at port ``primary``."""
    node = cluster.node_client(primary)
    try:
        me = cast(bytes, node.execute_command("CLUSTER MYID")).decode()  # type: ignore[no-untyped-call]
        nodes = node.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
    finally:
        node.close()
    return next(int(a.rpartition(":")[2]) for a, n in nodes.items() if n["master_id"] == me)


def _promoted(cluster: LocalCluster, port: int) -> bool:
    """The node at ``port`` serves slots, as the URL's node has it."""
    node = cluster.node_client(cluster.ports[0])
    try:
        nodes = node.execute_command("CLUSTER NODES")  # type: ignore[no-untyped-call]
    finally:
        node.close()
    found = nodes[f"127.0.0.1:{port}"]
    return "master" in found["flags"] and bool(found["slots"])


def test_a_worker_follows_a_primary_killed_for_good_to_the_replica_in_its_place(
    tmp_path: Path, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    """A primary that is not the URL's node killed -9 and never started again, under a
    worker serving three partitions: its replica takes its slots, and the worker serves
    every partition from the nodes as they are now, each input forecast once, nothing
    counted lost. It asked for the slot table again only at a MOVED reply; its own
    connections (the function library's check on every primary) went to the dead node
    for as long as it was down, and no partition was served (a review: 93 s, until the
    node came back)."""
    partitions = 3
    with local_cluster(tmp_path, replicas=1) as cluster:
        client = connect(cluster.url, socket_timeout_s=10, client_name="test")
        base = Keys.prefixed(stream_prefix).clustered()
        settings = settings_for(
            cluster.url, base, partitions=partitions, socket_timeout_s=0.5, block_ms=100
        )
        worker = new_worker(settings, trained_sines)
        lost = worker.metrics.registry.get_sample_value
        table = cluster.client()  # (closed with the cluster)
        victim = next(
            node.port
            for k in range(partitions)
            if (node := owner(table, base.partition(k, partitions).input)).port != cluster.ports[0]
        )
        replica = _replica_of(cluster, victim)
        first, second = sine_steps(40, 25, seed=37)[:20], sine_steps(40, 25, seed=37)[20:]
        try:
            with WorkerThread(worker) as running:
                names = _replay(client, base, first, partitions)
                running.wait_for(lambda: _all_drained(client, base, partitions), timeout=120)
                doomed = cluster.node_client(victim)
                try:  # its replica holds everything it holds: nothing Redis forgets
                    doomed.execute_command("WAIT", 1, 10_000)  # type: ignore[no-untyped-call]
                finally:
                    doomed.close()
                process = next(n.process for n in cluster.nodes if n.port == victim)
                assert process is not None
                process.kill()
                wait_for(lambda: _promoted(cluster, replica), timeout=60)
                client.close()
                client = connect(cluster.url, socket_timeout_s=10, client_name="test")
                _replay(client, base, second, partitions)
                running.wait_for(lambda: _all_drained(client, base, partitions), timeout=120)
            values = np.concatenate([first, second])
            _assert_every_input_once(client, base, partitions, trained_sines, values, names)
            assert not any(
                lost("attnlstm_entries_lost_total", {"reason": reason})
                for reason in ("pending", "unread")
            )
        finally:
            client.close()


def test_a_worker_told_it_is_on_a_cluster_waits_for_one_at_start(
    redis_cluster: LocalCluster,
    stream_prefix: str,
    model_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ATTNLSTM_CLUSTER=true and no node answering (all frozen) as the worker starts: it
    waits, with backoff, and once the nodes answer it serves (here: drains an empty
    stream, --burst). The cluster client needs a node as it is made, and the worker
    ended with a traceback."""
    base = Keys.prefixed(stream_prefix).clustered()
    settings = settings_for(
        redis_cluster.url, base, cluster=True, model=model_file, socket_timeout_s=0.5,
        block_ms=100,
    )  # fmt: skip
    nodes = [node.process for node in redis_cluster.nodes if node.process is not None]
    outcome: list[object] = []
    for node in nodes:
        node.send_signal(signal.SIGSTOP)
    try:
        thread = threading.Thread(
            target=lambda: outcome.append(run_service(settings, burst=True, stop=StopRequest())),
            daemon=True,
        )
        thread.start()
        wait_for(lambda: "Redis Cluster" in caplog.text and "retrying in" in caplog.text)
    finally:
        for node in nodes:
            node.send_signal(signal.SIGCONT)
    thread.join(timeout=120)
    assert not thread.is_alive()
    (report,) = outcome
    assert isinstance(report, dict)
    assert report["recoveries"] >= 1  # in step with its partition: it served


def test_on_a_cluster_one_partition_s_data_refuses_a_worker_or_replay_with_more(
    redis_cluster: LocalCluster, stream_prefix: str, trained_sines: AttentionLSTM
) -> None:
    """On a Redis Cluster one partition's stream is tagged (sensors{0}), the name of P >
    1's first one: unmarked, a worker or a replay with P = 4 took it as its partition 0,
    and the windows of every series with it. One partition marks its data there."""
    client = connect(redis_cluster.url, socket_timeout_s=10, client_name="test")
    base = Keys.prefixed(stream_prefix).clustered()
    try:
        _replay(client, base, sine_steps(3, 8), partitions=1)
        assert client.get(base.partitions) == b"1"
        worker = new_worker(settings_for(redis_cluster.url, base, partitions=4), trained_sines)
        with pytest.raises(PartitionsError, match=r"written in 1 partitions .* reads 4"):
            worker.run()
        with pytest.raises(PartitionsError, match=r"written in 1 partitions .* this writes 4"):
            _replay(client, base, sine_steps(3, 8), partitions=4)
        other = Keys.prefixed(stream_prefix + "w:").clustered()  # a worker first, no replay
        drain(settings_for(redis_cluster.url, other, partitions=1), trained_sines)
        assert client.get(other.partitions) == b"1"
    finally:
        client.close()


def test_entries_written_to_the_unpartitioned_stream_mid_run_are_reported_not_fatal(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """P = 2, running, and a producer adds to the unpartitioned stream: each audit and
    re-sync reports it (an error naming the stream, and a gauge), and the pool serves
    on, through a re-sync and a restart. The re-sync refused with PartitionsError, which
    ended every worker, and each restart after."""
    caplog.set_level(logging.ERROR, logger="attnlstm.worker")
    partitions = 2
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500, block_ms=100)
    worker = new_worker(settings, trained_sines)
    sample = worker.metrics.registry.get_sample_value
    with WorkerThread(worker) as running:
        running.wait_for(lambda: len(worker.lanes) == partitions)
        redis_client.xadd(keys.input, {"series": "s1", "value": "1.0"})
        running.wait_for(lambda: sample("attnlstm_unpartitioned_entries") == 1)
        assert f"1 entries in {keys.input}, which no worker reads" in caplog.text
        recoveries = sample("attnlstm_recoveries_total") or 0
        kill_named(redis_client, "test-worker")  # a Redis blip: a re-sync
        running.wait_for(lambda: (sample("attnlstm_recoveries_total") or 0) > recoveries)
        values = sine_steps(6, 25, seed=38)
        names = _replay(redis_client, keys, values, partitions)
        running.wait_for(lambda: _all_drained(redis_client, keys, partitions))
    report = drain(settings, trained_sines)  # a restart: served before, so it starts
    assert report["recoveries"] == partitions
    _assert_every_input_once(redis_client, keys, partitions, trained_sines, values, names)
    assert redis_client.xlen(keys.input) == 1  # left for the operator to move


def test_a_running_pool_marks_its_partitions_again_where_the_mark_is_gone(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The mark deleted under a running pool: the next producer or worker with another P
    took it for its own (its entries went to partitions no worker read, or valid ones
    were dead-lettered), and the pool stopped at its next re-sync. Each audit marks it
    again, so that P stays the pool's, and another is refused."""
    settings = settings_for(redis_url, keys, partitions=2, lease_ttl_ms=1500, block_ms=100)
    worker = new_worker(settings, trained_sines)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: len(worker.lanes) == 2)
        assert redis_client.get(keys.partitions) == b"2"
        assert worker.metrics.registry.get_sample_value("attnlstm_partitions") == 2  # (P)
        redis_client.delete(keys.partitions)
        running.wait_for(lambda: redis_client.get(keys.partitions) == b"2")
        with pytest.raises(PartitionsError, match="written in 2 partitions"):
            _replay(redis_client, keys, sine_steps(3, 8), partitions=4)
        # Marked another P all the same (a race with the audit): an error in the log, and
        # the pool serves on. The audit stopped a P = 1 worker when a replay marked 4.
        redis_client.set(keys.partitions, "4")
        running.wait_for(lambda: "written in 4 partitions" in caplog.text)
        redis_client.set(keys.partitions, "2")  # put right: it served on meanwhile
        values = sine_steps(6, 25, seed=38)
        names = _replay(redis_client, keys, values, 2)
        running.wait_for(lambda: _all_drained(redis_client, keys, 2))
    _assert_every_input_once(redis_client, keys, 2, trained_sines, values, names)


def test_entries_of_a_series_written_to_another_partition_are_dead_lettered(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A producer that routes a series to the wrong partition: its entries go to that
    partition's dead stream, naming the series' own. They were served there: a second
    window for the series, and forecasts where no reader looks for them."""
    partitions, name = 2, "sensor-7"
    home = partition_of(name, partitions)
    wrong = keys.partition(1 - home, partitions)
    redis_client.set(keys.partitions, partitions)
    for v in range(30):
        redis_client.xadd(wrong.input, {"series": name, "value": str(float(v % 5))})
    settings = settings_for(redis_url, keys, partitions=partitions, block_ms=100)
    report = drain(settings, trained_sines)
    assert report["dead"] == 30
    assert redis_client.xlen(wrong.output) == 0
    reasons = {f[b"error"] for _, f in entries(redis_client, wrong.dead)}
    assert reasons == {
        f"partition is not the series': {name} belongs to partition {home} of "
        f"{partitions} (crc32(series) mod P), not {1 - home}".encode()
    }


def test_workers_started_together_take_their_shares_not_every_partition(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Two workers with max_series sized for their share (25 each for 40 series, 10 a
    partition), started together on a backlog: the first takes one partition until the
    pool has announced itself, and no valid entry is refused. It saw a pool of one and
    took all four, and dead-lettered 450 of the 1,200 entries, "series limit reached"."""
    partitions, values = 4, sine_steps(40, 30, seed=39)
    names = _replay(redis_client, keys, values, partitions)
    assert {partition_of(n, partitions) for n in names} == set(range(partitions))

    def started(consumer: str) -> WorkerThread:
        settings = settings_for(
            redis_url, keys, partitions=partitions, lease_ttl_ms=6000, block_ms=100,
            max_batch=64, max_series=25, consumer=consumer,
        )  # fmt: skip
        return WorkerThread(new_worker(settings, trained_sines)).start()

    with started("a") as a:
        a.wait_for(lambda: any(_holders(redis_client, keys, partitions)))
        with started("b"):
            a.wait_for(lambda: _all_drained(redis_client, keys, partitions))
            a.wait_for(lambda: sorted(map(str, _holders(redis_client, keys, partitions)))
                       == ["a", "a", "b", "b"])  # fmt: skip
    dead = sum(redis_client.xlen(keys.partition(k, partitions).dead) for k in range(partitions))
    assert dead == 0
    _assert_every_input_once(redis_client, keys, partitions, trained_sines, values, names)


def test_a_worker_over_its_share_gives_back_the_partitions_it_took_last(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Another member holds partitions 0 and 1, the worker 2 and 3; the member is gone
    a while (the worker takes 0 and 1), and back: the worker gives back 0 and 1, and
    keeps its own. It gave back the highest numbers, 2 and 3: two partitions changed
    hands (and re-synced) for each one an outage moved."""
    partitions = 4
    ensure_library(redis_client)
    other = process_token("other")
    member = Pool(redis_client, keys, token=other, ttl_ms=600_000, partitions=partitions)
    member.share()  # announced, for ten minutes
    for k in (0, 1):
        part = keys.partition(k, partitions)
        redis_client.set(part.lease, other, px=600_000)
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500, block_ms=100)
    worker = new_worker(settings, trained_sines)
    with WorkerThread(worker) as running:
        running.wait_for(lambda: sorted(worker.lanes) == [2, 3])
        fences = [redis_client.get(keys.partition(k, partitions).fence) for k in (2, 3)]
        member.leave()  # gone: its leases lapse
        for k in (0, 1):
            redis_client.delete(keys.partition(k, partitions).lease)
        running.wait_for(lambda: len(worker.lanes) == 4)
        member.share()  # back
        running.wait_for(lambda: len(worker.lanes) == 2)
        assert sorted(worker.lanes) == [2, 3]
        assert [redis_client.get(keys.partition(k, partitions).fence) for k in (2, 3)] == fences
    member.leave()


def test_a_partition_given_back_takes_its_series_off_the_series_gauge(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Each batch alone set the gauge: a worker that gave a partition back and had no
    batch since went on counting its series, and the pool's sum counted them twice."""
    partitions = 2
    ensure_library(redis_client)
    names = _replay(redis_client, keys, sine_steps(12, 25, seed=5), partitions)
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500, block_ms=100)
    worker = new_worker(settings, trained_sines)
    series = partial(worker.metrics.registry.get_sample_value, "attnlstm_series")
    member = Pool(redis_client, keys, token=process_token("other"), ttl_ms=600_000,
                  partitions=partitions)  # fmt: skip
    with WorkerThread(worker) as running:
        running.wait_for(lambda: len(worker.lanes) == 2 and _all_drained(redis_client, keys, 2))
        running.wait_for(lambda: series() == len(names))
        member.share()  # a second worker: the share is one partition each
        running.wait_for(lambda: len(worker.lanes) == 1)
        (kept,) = worker.lanes  # (popped before the gauge is set: waited for, not read)
        running.wait_for(
            lambda: series() == sum(partition_of(name, partitions) == kept for name in names)
        )
    member.leave()


def test_a_turn_asks_for_no_lease_that_another_worker_holds(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Every lease of 64 partitions held by another worker: a turn reads their holders
    in one round trip and asks for none of them; with two free, it takes those two. Each
    was asked for, one round trip and a fresh lane each (221 ms a turn with P = 1024)."""
    partitions = 64
    ensure_library(redis_client)
    for k in range(partitions):
        redis_client.set(keys.partition(k, partitions).lease, "other#00000000", px=600_000)
    worker = new_worker(settings_for(redis_url, keys, partitions=partitions), trained_sines)

    def leases_asked() -> int:
        stats = redis_client.info("commandstats").get("cmdstat_fcall", {"calls": 0})
        return int(stats["calls"])

    before = leases_asked()
    assert worker._take(partitions // 2) == []
    assert leases_asked() == before
    for k in (5, 40):
        redis_client.delete(keys.partition(k, partitions).lease)
    assert sorted(lane.k for lane in worker._take(partitions // 2)) == [5, 40]
    assert leases_asked() == before + 2
