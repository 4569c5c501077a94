"""Fine-tuning, the model store, rollback and cold start, with workers on a real server."""

from __future__ import annotations

import functools
import gc
import json
import logging
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest
import redis

from attnlstm.checkpoint import Checkpoint, dumps, loads, version_of
from attnlstm.intervals import LEVELS
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import SineSpec, make_sines, sine_steps
from attnlstm.train import new_model
from tests.helpers import (
    WorkerThread,
    entries,
    events,
    fill,
    finetune_processes,
    free_port,
    gone,
    new_worker,
    other_model,
    settings_for,
    wait_for,
    worker_env,
)
from worker.app import run_service
from worker.cli import main
from worker.embedded import EmbeddedServer
from worker.engine import Engine, check_fits
from worker.keys import Keys
from worker.lease import Lease, ensure_library
from worker.loop import Worker
from worker.metrics import Metrics
from worker.online import store as store_module
from worker.online.finetune import FinetuneConfig, Job
from worker.online.scoring import Overall
from worker.online.store import ModelStore
from worker.online.trainer import Trainer, run_jobs
from worker.online.tuner import COLD_START_MODEL, DRIFT_RETRY_S, JOB_TIMEOUT_S, Tuner
from worker.signals import StopRequest
from worker.state import WindowState
from worker.streams import Entry, connect, range_entries, round_trip
from worker.tools.readback import read_views


@pytest.fixture(autouse=True)
def _worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnlstm")


@pytest.fixture(autouse=True)
def _functions(redis_client: redis.Redis) -> None:
    """The function library loaded, as a worker loads it at start: the store points
    every worker at a version, and drops old ones, on the server."""
    ensure_library(redis_client)


def _fits(model: AttentionLSTM) -> Callable[[Checkpoint], None]:
    """What a worker serving ``model``'s shape can serve (``Tuner``'s ``fits``)."""
    c = model.config
    return functools.partial(check_fits, context=c.context, window=c.window, horizon=c.horizon)


def _tuner(
    client: redis.Redis,
    url: str,
    keys: Keys,
    model: AttentionLSTM,
    clock: FakeClock,
    *,
    consumer: str = "w",
    metrics: Metrics | None = None,
    from_store: bool = False,
    **overrides: Any,
) -> Tuner:
    """A tuner as a worker serving ``model``'s shape makes one, on a clock the test moves
    (the function library is loaded for every test: ``_functions``)."""
    settings = settings_for(url, keys, consumer=consumer, **overrides)
    store = ModelStore(client, keys, keep=settings.keep_models, source=consumer)
    return Tuner(
        client,
        settings=settings,
        store=store,
        metrics=metrics or Metrics(),
        fits=_fits(model),
        clock=clock,
        from_store=from_store,
    )


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sines(n_series: int, length: int) -> Callable[[], tuple[list[str], list[np.ndarray]]]:
    """The histories of ``n_series`` noisy sines of ``length`` values (``Tuner.tick``'s)."""
    values = list(make_sines(SineSpec(n_series=n_series, n_points=length), seed=3).values)
    names = [f"s{k}" for k in range(n_series)]
    return lambda: (names, values)


def forecast_versions(client: redis.Redis, keys: Keys) -> dict[bytes, str]:
    """The model version of each forecast, by its input entry id."""
    return {f[b"src"]: f[b"model"].decode() for _, f in entries(client, keys.output)}


def unseen(client: redis.Redis, tuner: Tuner) -> list[Entry]:
    """The models events the tuner has not seen: what the worker's next read brings."""
    return range_entries(round_trip(client, [tuner.events_query()])[0])


def test_the_store_keeps_the_last_versions_and_never_drops_the_serving_one(
    redis_client: redis.Redis, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    store = ModelStore(redis_client, keys, keep=3, source="test")
    versions = []
    for k in range(5):
        blob, version = dumps(other_model(trained_sines, 0.01 * k))
        store.put(blob, version)
        versions.append(version)
        if k == 0:
            store.set_serving(version, "promoted")
    assert store.versions() == [versions[4], versions[3], versions[2], versions[0]]
    assert store.get(versions[0]).version == versions[0]  # serving: kept
    assert redis_client.get(keys.model(versions[1])) is None  # dropped
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted"]


def test_rollback_takes_effect_on_the_next_batch(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = version_of(trained_sines)
    earlier_blob, earlier = dumps(other_model(trained_sines, 0.05))
    ModelStore(redis_client, keys, keep=5, source="test").put(earlier_blob, earlier)
    values = sine_steps(5, 60, seed=6)
    settings = settings_for(redis_url, keys, block_ms=100)
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        before = fill(redis_client, keys.input, values[:30])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        assert main(["models", "rollback", earlier, *flags]) == 0
        back = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert back == {"serving": earlier, "previous": first}
        after = fill(redis_client, keys.input, values[30:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 41)
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in before if i in versions} == {first}
    assert {versions[i] for i in after} == {earlier}  # every batch after the rollback
    assert main(["models", "list", *flags]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["serving"] == earlier
    assert [e["event"] for e in report["events"]] == ["promoted", "rolled_back"]  # oldest first


def _narrow_then_fitting(
    client: redis.Redis, redis_url: str, keys: Keys, model: AttentionLSTM
) -> tuple[Worker, str]:
    """A worker serving ``model`` with a spread 10,000x too narrow (every value falls
    outside: the multipliers grow), and the version of a twin with the default spread,
    stored to switch to."""
    narrow = np.tile(np.array(LEVELS)[:, None] * 1e-4, (1, model.config.horizon))
    meta = {"spread": {"levels": list(LEVELS), "q": narrow.tolist()}}
    served = Checkpoint(model=model, version=version_of(model), meta=meta)
    blob, fitting = dumps(other_model(model, 1e-4))
    ModelStore(client, keys, keep=5, source="test").put(blob, fitting)
    settings = settings_for(redis_url, keys, block_ms=100)
    engine = Engine(served, device="cpu", max_batch=settings.max_batch)
    own = connect(redis_url, socket_timeout_s=settings.socket_timeout_s, client_name="test-worker")
    return Worker(own, engine=engine, settings=settings), fitting


def _multipliers(worker: Worker) -> np.ndarray:
    """The log-multipliers of the first five series' slots."""
    return np.concatenate([lane.scorer.adaptive.log_m[:5] for lane in worker.lanes.values()])


def test_a_switch_starts_each_series_multiplier_from_the_new_model_s_spread(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Each series' interval multiplier learns how the served model's spread fits it; a
    model switched to comes with a spread of its own. Kept, a multiplier learned against
    a spread 33x too narrow made a promoted model's intervals 33x too wide until
    unlearned (a review: 15 s of every value inside, no anomaly found, after each
    promotion)."""
    worker, fitting = _narrow_then_fitting(redis_client, redis_url, keys, trained_sines)
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    with WorkerThread(worker) as running:
        fill(redis_client, keys.input, sine_steps(5, 60, seed=7))
        running.wait_for(lambda: redis_client.xlen(keys.output) == 5 * 41)
        assert _multipliers(worker).min() > 1  # nearly every value outside: e and wider
        assert main(["models", "rollback", fitting, *flags]) == 0
        running.wait_for(lambda: worker.engine is not None and worker.engine.version == fitting)
        assert (_multipliers(worker) == 0).all()


def test_a_restart_on_another_model_starts_each_multiplier_again(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """The multipliers are saved with the windows, and with them the model they were
    learned against: a worker restarted on the same model goes on with them, one on
    another (a rollback while it was down) starts them at 1 again. It restored them
    whatever it served: 36x too wide after such a restart (a review)."""
    worker, fitting = _narrow_then_fitting(redis_client, redis_url, keys, trained_sines)
    with WorkerThread(worker) as running:
        fill(redis_client, keys.input, sine_steps(5, 60, seed=7))
        running.wait_for(lambda: redis_client.xlen(keys.output) == 5 * 41)
    learned = _multipliers(worker)
    assert learned.min() > 1

    def restarted() -> Worker:  # on the store's model, its windows and scoring restored
        again = new_worker(settings_for(redis_url, keys, block_ms=100), None)
        with WorkerThread(again) as running:
            running.wait_for(
                lambda: bool(again.lanes) and all(lane.synced for lane in again.lanes.values())
            )
        return again

    assert (_multipliers(restarted()) == learned).all()  # the same model: went on
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    assert main(["models", "rollback", fitting, *flags]) == 0
    other = restarted()
    assert other.engine is not None
    assert other.engine.version == fitting
    assert (_multipliers(other) == 0).all()


def test_a_tampered_stored_model_is_refused_and_the_serving_one_stays(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = version_of(trained_sines)
    blob, version = dumps(other_model(trained_sines, 0.05))
    tampered = bytearray(blob)
    tampered[-7] ^= 0x01  # one bit of one weight
    values = sine_steps(5, 60, seed=7)
    settings = settings_for(redis_url, keys, block_ms=100)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        fill(redis_client, keys.input, values[:30])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 11)
        redis_client.set(keys.model(version), bytes(tampered))
        ModelStore(redis_client, keys, keep=5, source="another-worker").set_serving(
            version, "promoted"
        )
        after = fill(redis_client, keys.input, values[30:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 5 * 41)
    versions = forecast_versions(redis_client, keys)
    assert {versions[i] for i in after} == {first}
    refused = [e for e in events(redis_client, keys.models) if e["event"] == "refused"]
    assert len(refused) == 1
    assert refused[0]["version"] == version
    assert "content hash mismatch" in refused[0]["reason"]
    assert f"refused model {version}" in caplog.text


def test_from_no_model_at_all_forecasts_begin_on_their_own_and_beat_naive(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(redis_url, keys, finetune_interval_s=60)
    values = sine_steps(20, 200, seed=8)
    with WorkerThread(new_worker(settings, None)) as running:  # no model: a cold start
        fill(redis_client, keys.input, values[:150])  # 3,000 values, no forecasts
        running.wait_for(lambda: redis_client.exists(keys.serving), timeout=120)
        fill(redis_client, keys.input, values[150:])
        running.wait_for(lambda: redis_client.xlen(keys.output) >= 20 * 50)
    assert "no model yet: keeping values" in caplog.text
    kinds = [(e["event"], e["version"]) for e in events(redis_client, keys.models)]
    assert [k for k, _ in kinds] == ["trained", "promoted"]
    assert kinds[0][1] == kinds[1][1]
    assert set(forecast_versions(redis_client, keys).values()) == {kinds[1][1]}
    views = read_views(redis_client, keys)
    model_mae, naive_mae = np.mean([v.mae() for v in views.values()], axis=0)
    assert model_mae < naive_mae / 3


DRIFT_AT, STEPS, CHUNK = 200, 600, 50  # a fine-tune after each chunk of steps past the drift


def _mae_by_step(client: redis.Redis, keys: Keys, lo: int, hi: int) -> float:
    """The one-step MAE of the forecasts for steps lo..hi-1 of every series."""
    views = read_views(client, keys).values()
    errors = [
        np.abs(v.forecast - v.actual)[v.scored & (v.position >= lo) & (v.position < hi)]
        for v in views
    ]
    return float(np.concatenate(errors).mean())


@pytest.mark.parametrize("finetune", [True, False])
def test_after_a_drift_fine_tuning_brings_the_error_back_and_without_it_it_stays(
    finetune: bool,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """20 noisy sines; at step 200 every frequency changes by 1.5-2.5x. The fine-tune
    clock is the test's: a fine-tune on the last 100 values is due after each 50 steps
    past the drift, once the worker has forecast them (drift detection is off, so
    nothing else starts one)."""
    spec = SineSpec(n_series=20, n_points=STEPS, noise=0.05, drift_at=DRIFT_AT)
    values = make_sines(spec, seed=0).values.T
    interval = 10.0 if finetune else 0.0
    settings = settings_for(
        redis_url, keys, finetune_interval_s=interval, history_len=100, drift_ratio=0, block_ms=100
    )
    clock = FakeClock()
    worker = new_worker(settings, trained_sines, finetune_clock=clock)
    window = trained_sines.config.window
    with WorkerThread(worker) as running:
        for start in [0, *range(DRIFT_AT, STEPS, CHUNK)]:
            end = DRIFT_AT if start == 0 else start + CHUNK
            fill(redis_client, keys.input, values[start:end])
            # Each wait ends before the loop moves on: the lambdas see this turn's values.
            forecasts = 20 * (end - window + 1)
            running.wait_for(lambda: redis_client.xlen(keys.output) == forecasts)  # noqa: B023
            if finetune and start >= DRIFT_AT:
                finished = worker.tuner.cycles
                clock.now += interval
                running.wait_for(lambda: worker.tuner.cycles > finished, timeout=120)  # noqa: B023
    before = _mae_by_step(redis_client, keys, DRIFT_AT - 50, DRIFT_AT)
    worst = _mae_by_step(redis_client, keys, DRIFT_AT, DRIFT_AT + CHUNK)
    last = _mae_by_step(redis_client, keys, STEPS - CHUNK, STEPS)
    promoted = [e for e in events(redis_client, keys.models) if e["event"] == "promoted"]
    assert worst > 1.5 * before  # the drift hurts
    if finetune:
        assert len(promoted) >= 2  # the model file, then fine-tuned ones
        assert last <= 1.5 * before, (before, worst, last)
    else:
        assert len(promoted) == 1  # the model file only
        assert last > 1.5 * before, (before, worst, last)


def test_no_fine_tune_starts_while_no_value_came_since_the_last(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same values give the same candidate: an idle worker promoted four versions
    from one history, each pushing out a stored version a rollback goes back to, then
    trained one and rejected it at every turn, for ever (a review)."""
    settings = settings_for(redis_url, keys, finetune_interval_s=10, drift_ratio=0, block_ms=100)
    clock = FakeClock()
    worker = new_worker(settings, trained_sines, finetune_clock=clock)
    values = sine_steps(5, 200, seed=9)
    with caplog.at_level(logging.INFO, logger="attnlstm.worker"), WorkerThread(worker) as running:
        fill(redis_client, keys.input, values[:150])
        running.wait_for(lambda: redis_client.xlen(keys.output) == 5 * 131)
        clock.now += 10
        running.wait_for(lambda: worker.tuner.cycles == 1, timeout=120)
        clock.now += 10  # due again, and nothing new
        said = "fine-tune put off: no value has been scored since the last one"
        running.wait_for(lambda: said in caplog.text)
        assert worker.tuner.cycles == 1
        assert not worker.tuner.running
        # Not a stall, for the alert (which fired on a stream idle for 45 minutes).
        waiting = "attnlstm_finetune_waiting_for_input"
        assert worker.metrics.registry.get_sample_value(waiting) == 1
        fill(redis_client, keys.input, values[150:])  # the next starts with them: due
        running.wait_for(lambda: worker.tuner.cycles == 2, timeout=120)
        assert worker.metrics.registry.get_sample_value(waiting) == 0
    assert caplog.text.count(said) == 1


def test_one_worker_fine_tunes_at_a_time(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While another worker holds the fine-tune lock, a due fine-tune is skipped; once
    the lock is free, the next due one starts."""
    clock = FakeClock()
    first, second = (
        _tuner(redis_client, redis_url, keys, trained_sines, clock, consumer=name,
               finetune_interval_s=10)
        for name in ("first", "second")
    )  # fmt: skip
    assert first.start(loads(dumps(trained_sines)[0])) is not None
    assert second.start(None) is not None  # the store's serving version
    state = WindowState(window=20, length=200, max_series=10)
    slots = np.repeat(state.slots_for(["s0"]), 200)  # one series, 200 values: enough
    state.push(slots, np.sin(np.arange(200.0)), gather=False)
    assert first.lock.acquire()[0] == first.lock.token  # first is fine-tuning
    clock.now += 10  # a fine-tune is due
    assert second.tick(state.histories, Overall(halflife_s=30)) is None
    assert not second.running  # due, but not its turn
    first.lock.release()
    clock.now += 10  # due again
    assert second.tick(state.histories, Overall(halflife_s=30)) is None
    assert second.running  # its turn: started
    assert redis_client.get(keys.finetune_lock) == second.lock.token.encode()
    # Its lock lives a minute (a worker killed here held it for ten, and fine-tuning with
    # it), renewed while the fine-tune runs: every 20 s, a lapse 1 s off is put back.
    assert 0 < redis_client.pttl(keys.finetune_lock) <= 60_000
    redis_client.pexpire(keys.finetune_lock, 1_000)
    clock.now += 19
    second.keep_lock()
    assert redis_client.pttl(keys.finetune_lock) <= 1_000  # not yet due
    clock.now += 1
    second.keep_lock()
    assert 59_000 < redis_client.pttl(keys.finetune_lock) <= 60_000
    # Lapsed, and taken by another: the fine-tune goes on, and the log says so, once.
    redis_client.set(keys.finetune_lock, first.lock.token)
    with caplog.at_level(logging.WARNING, logger="attnlstm.worker"):
        for _ in range(2):
            clock.now += 20
            second.keep_lock()
    lapsed = [r.getMessage() for r in caplog.records if "lock lapsed" in r.getMessage()]
    assert len(lapsed) == 1, lapsed
    assert redis_client.get(keys.finetune_lock) == first.lock.token.encode()
    assert second.running
    redis_client.delete(keys.finetune_lock)
    second.close()  # the fine-tune in flight is dropped, and the lock with it
    assert redis_client.get(keys.finetune_lock) is None


def test_a_fine_tune_put_off_for_series_too_short_says_so(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Series that never hold the values a fine-tune needs (sensors replaced every few
    minutes): every fine-tune was put off, and nothing said so (a soak ran 8.6 min, a
    fine-tune due every 15 s, with none). Then a series long enough: it starts."""
    clock = FakeClock()
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, clock, finetune_interval_s=10)
    assert tuner.start(loads(dumps(trained_sines)[0])) is not None
    state = WindowState(window=20, length=200, max_series=10)
    slots = np.repeat(state.slots_for(["s0", "s1"]), 30)
    state.push(slots, np.sin(np.arange(60.0)), gather=False)  # 30 values each
    clock.now += 10  # a fine-tune is due
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert not tuner.running
    put_off = "fine-tune put off: none of the 2 series served holds the "
    assert caplog.text.count(put_off) == 1
    clock.now += 5  # not tried again (nor said again) before the next on the schedule
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert caplog.text.count(put_off) == 1
    slots = np.repeat(state.slots_for(["s2"]), 200)
    state.push(slots, np.sin(np.arange(200.0)), gather=False)
    clock.now += 5
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert tuner.running
    tuner.close()


def test_a_worker_fenced_out_drops_its_fine_tune_and_the_lock(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mid-fine-tune, another takes the worker's partition (it froze past its lease): as
    a standby it stops its fine-tuning process and releases the lock, for the worker
    that serves now. It used to keep both for up to ten minutes (the lock's TTL: no
    other worker fine-tuned), and to promote, once it served again, a candidate trained
    on values of long before."""
    clock = FakeClock()
    settings = settings_for(
        redis_url, keys, finetune_interval_s=10, finetune_steps=10**9, lease_ttl_ms=3000,
        drift_ratio=0, block_ms=100,
    )  # fmt: skip
    worker = new_worker(settings, trained_sines, finetune_clock=clock)
    fill(redis_client, keys.input, sine_steps(20, 200, seed=8))
    with WorkerThread(worker) as running:
        running.wait_for(lambda: redis_client.xlen(keys.output) == 20 * 181)
        clock.now += 10  # a fine-tune is due: it would run for hours
        running.wait_for(lambda: worker.tuner.running and finetune_processes())
        lock = worker.tuner.lock.token.encode()
        assert redis_client.get(keys.finetune_lock) == lock
        redis_client.set(keys.lease, "thief#0", px=120_000)  # the partition taken over
        running.wait_for(lambda: redis_client.get(keys.finetune_lock) is None)
        assert not worker.tuner.running
        wait_for(lambda: not finetune_processes(), what="the fine-tuning process's end")
        assert worker.lanes == {}  # a standby
    assert "fine-tune dropped: this worker serves no partition now" in caplog.text
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted"]


def test_a_worker_stopped_mid_fine_tune_while_redis_is_gone_stops_cleanly(
    trained_sines: AttentionLSTM,
) -> None:
    """The lock's release, as the worker stops, cannot reach Redis: the worker stops as
    it does with no fine-tune in flight (the lock lapses on its own). The release's
    ConnectionError used to end the run with "cannot reach Redis", exit 1 and no report."""
    clock = FakeClock()
    with EmbeddedServer(port=free_port()) as server:
        client = redis.Redis.from_url(server.tcp_url)
        settings = settings_for(
            server.tcp_url, Keys(), finetune_interval_s=10, finetune_steps=10**9,
            drift_ratio=0, block_ms=100,
        )  # fmt: skip
        worker = new_worker(settings, trained_sines, finetune_clock=clock)
        fill(client, Keys().input, sine_steps(20, 200, seed=8))
        running = WorkerThread(worker).start()
        running.wait_for(lambda: client.xlen(Keys().output) == 20 * 181)
        clock.now += 10
        running.wait_for(lambda: worker.tuner.running and finetune_processes())
        client.close()
    running.wait_for(lambda: not worker.metrics.connected)  # the server is gone
    running.stop()  # raises what the worker raised
    assert running.report is not None
    wait_for(lambda: not finetune_processes(), what="the fine-tuning process's end")


@pytest.mark.parametrize("planted", ["lock", "fence"])
def test_a_fine_tune_lock_of_another_making_puts_fine_tuning_off_not_the_worker_down(
    planted: str,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Text in the fine-tune lock's fence (or a list for the lock): the refusal went up
    to the main loop, which stopped the serving worker at its first fine-tune, naming
    the input lease's fence to delete."""
    if planted == "lock":
        redis_client.rpush(keys.finetune_lock, "x")
    else:
        redis_client.set(keys.finetune_fence, "abc")
    clock = FakeClock()
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, clock, finetune_interval_s=10)
    assert tuner.start(loads(dumps(trained_sines)[0])) is not None
    state = WindowState(window=20, length=200, max_series=10)
    slots = np.repeat(state.slots_for(["s0"]), 200)
    state.push(slots, np.sin(np.arange(200.0)), gather=False)
    clock.now += 10  # a fine-tune is due
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert not tuner.running
    refused = (
        f"Redis refused the fine-tune lock ({keys.finetune_lock}, fence {keys.finetune_fence})"
    )
    assert refused in caplog.text
    clock.now += 5  # put off to the next on the schedule, not tried at every batch
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    clock.now += 5  # tried again, refused again: logged once until the refusal changes
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert caplog.text.count(refused) == 1
    redis_client.delete(keys.finetune_lock, keys.finetune_fence)  # what the log says to do
    clock.now += 10
    assert tuner.tick(state.histories, Overall(halflife_s=30)) is None
    assert tuner.running
    # Planted while it runs: its release, as the fine-tune is dropped, is refused too.
    redis_client.delete(keys.finetune_lock)
    redis_client.rpush(keys.finetune_lock, "x")
    tuner.close()
    assert caplog.text.count(refused) == 2


def test_a_drained_worker_reports_what_it_scored(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Every one-step forecast whose actual value arrived is scored online."""
    fill(redis_client, keys.input, sine_steps(4, 30, seed=9))
    worker = new_worker(settings_for(redis_url, keys), trained_sines, burst=True)
    worker.run()
    scored = worker.metrics.registry.get_sample_value("attnlstm_forecasts_scored_total")
    assert scored == 4 * (30 - 20)  # each series' last forecast has no actual yet
    assert worker.scores.mae < worker.scores.naive_mae


def _finetune_process() -> multiprocessing.process.BaseProcess:
    (process,) = finetune_processes()
    return process


def test_a_dead_or_hung_fine_tuning_process_never_takes_the_worker_down(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Killed while idle (the OOM killer, an operator), killed mid-job, hung: each time
    the fine-tune fails with an event and a metric, the lock is released, and the next
    fine-tune gets a new process."""
    clock, metrics = FakeClock(), Metrics()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock, metrics=metrics,
        finetune_interval_s=10, finetune_steps=20,
    )  # fmt: skip
    tuner.start(loads(dumps(trained_sines)[0]))
    state = WindowState(window=20, length=200, max_series=10)
    values = make_sines(SineSpec(n_series=1, n_points=200), seed=3).values[0]
    state.push(np.repeat(state.slots_for(["s0"]), 200), values, gather=False)
    scores = Overall(halflife_s=30)

    def next_finetune() -> None:
        clock.now += 10
        scores.scored += 1  # a value came since the last (none: none starts)
        tuner.tick(state.histories, scores)
        assert tuner.running

    def ended() -> float | None:
        return metrics.registry.get_sample_value("attnlstm_finetune_last_end_timestamp_seconds")

    def outcome() -> str:
        before = ended()
        wait_for(lambda: tuner.tick(state.histories, scores) or not tuner.running, what="its end")
        assert redis_client.get(keys.finetune_lock) is None  # released, whatever happened
        assert (ended() or 0) > (before or 0)  # its end shows, for the stalled alert
        return events(redis_client, keys.models)[-1]["event"]

    try:
        next_finetune()
        assert outcome() in {"promoted", "rejected"}
        idle = _finetune_process()
        idle.kill()  # SIGKILL, while it waits for a job
        wait_for(lambda: not idle.is_alive(), what="the kill")
        next_finetune()  # used to raise BrokenPipeError: the worker exited 1
        assert _finetune_process().pid != idle.pid
        assert outcome() in {"promoted", "rejected"}

        next_finetune()
        _finetune_process().kill()  # mid-job
        assert outcome() == "failed"
        assert "the fine-tuning process died" in events(redis_client, keys.models)[-1]["reason"]

        next_finetune()
        clock.now += JOB_TIMEOUT_S + 1  # hung: still running past the timeout
        before = ended()
        tuner.tick(state.histories, scores)
        assert not tuner.running
        assert (ended() or 0) > (before or 0)
        assert events(redis_client, keys.models)[-1]["reason"].startswith("still running")
        assert redis_client.get(keys.finetune_lock) is None
    finally:
        tuner.close()
    failed = metrics.registry.get_sample_value("attnlstm_finetunes_total", {"outcome": "failed"})
    assert failed == 2


def _due_from_a_biased_parent(
    client: redis.Redis, url: str, keys: Keys, model: AttentionLSTM
) -> tuple[Tuner, Checkpoint, WindowState]:
    """A tuner serving ``model`` biased 0.5 high, with a fine-tune due on the 200 values
    of a sine, which its candidate forecasts far better: the tuner, what it serves, and
    the windows to tick it with."""
    clock = FakeClock()
    tuner = _tuner(client, url, keys, model, clock, finetune_interval_s=10, finetune_steps=100)
    parent = tuner.start(loads(dumps(other_model(model, 0.5))[0]))
    assert parent is not None
    state = WindowState(window=20, length=200, max_series=10)
    values = make_sines(SineSpec(n_series=1, n_points=200), seed=3).values[0]
    state.push(np.repeat(state.slots_for(["s0"]), 200), values, gather=False)
    clock.now += 10
    return tuner, parent, state


def test_a_candidate_is_not_promoted_over_a_version_that_replaced_its_parent(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A fine-tune from a model that forecasts 0.5 too high, which its candidate beats by
    far; while it trains, an operator promotes another version by hand (or another
    worker's promotion lands, or a frozen worker wakes with its result): the candidate is
    rejected, and not stored, and the version promoted meanwhile keeps serving."""
    tuner, parent, state = _due_from_a_biased_parent(redis_client, redis_url, keys, trained_sines)
    store = tuner.store
    scores = Overall(halflife_s=30)
    try:
        assert tuner.tick(state.histories, scores) is None
        assert tuner.running
        by_hand, version = dumps(trained_sines)
        store.put(by_hand, version)
        store.set_serving(version, "promoted", reason="promoted by hand")
        wait_for(lambda: tuner.tick(state.histories, scores) or not tuner.running, what="its end")
    finally:
        tuner.close()
    trained, rejected = events(redis_client, keys.models)[-2:]
    assert (trained["event"], trained["parent"]) == ("trained", parent.version)
    assert (rejected["event"], rejected["version"]) == ("rejected", trained["version"])
    assert rejected["reason"] == (
        f"{version} serves by now, not {parent.version}, which it was fine-tuned from"
    )
    assert store.serving() == version
    assert trained["version"] not in store.versions()
    assert tuner.version == parent.version  # it switches at the promotion's event, as all do
    assert redis_client.get(keys.finetune_lock) is None


def test_a_candidate_over_the_stores_cap_is_rejected_not_stored(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A candidate that beats its parent by far, over the store's cap (lowered to 1,000
    bytes once the parent is stored): rejected with the reason, where the store's
    refusal used to end the worker."""
    tuner, parent, state = _due_from_a_biased_parent(redis_client, redis_url, keys, trained_sines)
    scores = Overall(halflife_s=30)
    monkeypatch.setattr(store_module, "MODEL_BYTES_MAX", 1_000)
    try:
        assert tuner.tick(state.histories, scores) is None
        wait_for(lambda: tuner.tick(state.histories, scores) or not tuner.running, what="its end")
    finally:
        tuner.close()
    trained, rejected = events(redis_client, keys.models)[-2:]
    assert (rejected["event"], rejected["version"]) == ("rejected", trained["version"])
    assert rejected["reason"].startswith(f"candidate {trained['version']} takes ")
    assert "over the model store's cap of 1,000" in rejected["reason"]
    assert tuner.store.serving() == parent.version == tuner.version
    assert tuner.store.versions() == [parent.version]


def test_a_model_of_another_shape_is_not_adopted(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A model promoted by hand that reads another number of values than the worker keeps:
    refused, and this worker serves what it served."""
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, FakeClock())
    store = tuner.store
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    wider = AttentionLSTM(replace(trained_sines.config, window=30))
    blob, version = dumps(wider)
    store.put(blob, version)
    store.set_serving(version, "promoted", reason="promoted by hand")
    assert tuner.sync(store.events(after=b"-")) is None
    assert tuner.version == served.version
    refused = events(redis_client, keys.models)[-1]  # it had none: `models list` said it served
    assert (refused["event"], refused["version"]) == ("refused", version)
    assert "(window 30)" in refused["reason"]


def test_a_worker_up_before_its_producers_waits_for_input_and_short_series_do_not(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """No series yet, nothing scored since the start: a wait for input, which the stalled
    alert leaves out (it fired 45 minutes after a deploy up before its producers: a
    review). Values scored, and still no series long enough: a stall, for the alert."""
    clock, metrics = FakeClock(), Metrics()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock, metrics=metrics,
        finetune_interval_s=10,
    )  # fmt: skip
    tuner.start(loads(dumps(trained_sines)[0]))
    state = WindowState(window=20, length=200, max_series=10)  # no series at all
    scores = Overall(halflife_s=30)
    waiting = "attnlstm_finetune_waiting_for_input"
    try:
        clock.now += 10
        tuner.tick(state.histories, scores)
        assert not tuner.running
        assert metrics.registry.get_sample_value(waiting) == 1
        clock.now += 5  # not due: as it was
        tuner.tick(state.histories, scores)
        assert metrics.registry.get_sample_value(waiting) == 1
        scores.scored += 1  # input came, and no series holds enough of it
        clock.now += 5
        tuner.tick(state.histories, scores)
        assert not tuner.running
        assert metrics.registry.get_sample_value(waiting) == 0
    finally:
        tuner.close()


def test_no_fine_tunes_while_the_store_serves_a_version_this_worker_refused(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A candidate is promoted only over the version that serves, and the store serves
    one this worker refused: a fine-tune here could never be promoted. None starts until
    the store serves this worker's version again; one used to start on every interval,
    trained for nothing, and was rejected as overtaken."""
    clock, metrics = FakeClock(), Metrics()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock, metrics=metrics,
        finetune_interval_s=10, finetune_steps=5,
    )  # fmt: skip
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    store = tuner.store
    blob, wider = dumps(AttentionLSTM(replace(trained_sines.config, window=30)))
    store.put(blob, wider)
    store.set_serving(wider, "promoted", reason="promoted by hand")
    assert tuner.sync(tuner.store.events(after=b"-")) is None
    assert f"no fine-tunes while the store serves {wider}" in caplog.text
    histories, scores = sines(20, 200), Overall(halflife_s=30)
    # A wait for input begun while the stream was idle: left at 1, it hid this stall
    # from the alert (which leaves out the workers that wait for input).
    metrics.finetune_waiting.set(1)
    try:
        for _ in range(3):
            clock.now += 10
            tuner.tick(histories, scores)
            assert not tuner.running
        assert metrics.registry.get_sample_value("attnlstm_finetune_waiting_for_input") == 0
        store.set_serving(served.version, "rolled_back", previous=wider)
        assert tuner.sync(store.events(after=b"-")) is None  # it serves that one already
        tuner.tick(histories, scores)
        assert tuner.running
    finally:
        tuner.close()


def test_an_event_naming_a_version_the_store_does_not_serve_is_not_followed(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One `promoted` event naming a version the serving pointer does not (read late, its
    version pruned since; or written by hand): the worker refused it, logged that the
    store served it, and fine-tuned no more until its next re-sync. It follows the
    pointer: nothing to switch to, nothing refused, and the fine-tunes go on."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock,
        finetune_interval_s=10, finetune_steps=5,
    )  # fmt: skip
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    redis_client.xadd(keys.models, {"event": "promoted", "version": "0123456789abcdef"})
    assert tuner.sync(unseen(redis_client, tuner)) is None
    assert tuner.version == served.version
    assert "names model 0123456789abcdef, but the store serves " + served.version in caplog.text
    assert "refused" not in [e["event"] for e in events(redis_client, keys.models)]
    try:
        clock.now += 10
        tuner.tick(sines(20, 200), Overall(halflife_s=30))
        assert tuner.running
    finally:
        tuner.close()


def test_a_malformed_switch_event_is_skipped(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone who can write to the models stream can write a ``promoted`` event that
    names no version: logged and skipped (it used to raise KeyError out of the worker)."""
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, FakeClock())
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    redis_client.xadd(keys.models, {"event": "promoted", "by": "someone"})
    assert tuner.sync(tuner.store.events(after=b"-")) is None
    assert tuner.version == served.version
    assert "(promoted) names no version: skipped" in caplog.text


def test_a_rejected_first_model_is_trained_again_on_the_schedule(
    redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """A cold start whose candidate its gate rejects (here: it must beat the naive
    forecast by 99%) waits ``finetune_interval_s`` for the next one; it used to train
    one after another, a second apart, for as long as the worker ran."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, AttentionLSTM(COLD_START_MODEL), clock,
        finetune_interval_s=300, finetune_steps=5, promote_margin=0.99,
    )  # fmt: skip
    assert tuner.start(None) is None
    histories, scores = sines(20, 200), Overall(halflife_s=30)  # 4,000 values: enough
    try:
        tuner.tick(histories, scores)
        assert tuner.running
        wait_for(lambda: tuner.tick(histories, scores) or not tuner.running, what="its end")
        assert [e["event"] for e in events(redis_client, keys.models)] == ["trained", "rejected"]
        for _ in range(5):
            clock.now += 59
            tuner.tick(histories, scores)
            assert not tuner.running, clock.now
        clock.now += 5  # 300 s after the first ended
        tuner.tick(histories, scores)
        assert tuner.running
    finally:
        tuner.close()


def test_a_worker_with_no_model_trains_none_against_a_stored_one_it_cannot_serve(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """The store serves a damaged model: this worker cannot serve it, and a first model
    trained here would never be promoted (only while none serves). It trains none, and
    says why, in its log and its /healthz (which had answered 200 while it forecast
    nothing); it used to train one after another, each rejected as overtaken by a
    version that had served before it began. (A model of another shape it takes:
    test_a_worker_with_no_model_takes_the_shape_of_the_one_the_store_serves.)"""
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    blob, wider = dumps(AttentionLSTM(COLD_START_MODEL))
    tampered = bytearray(blob)
    tampered[-7] ^= 0x01  # one bit of one weight
    store.put(bytes(tampered), wider)
    store.set_serving(wider, "promoted")
    clock = FakeClock()
    cold = AttentionLSTM(COLD_START_MODEL)
    tuner = _tuner(redis_client, redis_url, keys, cold, clock, finetune_interval_s=10)
    assert tuner.start(None) is None
    assert f"the store serves model {wider}, which this worker cannot serve" in caplog.text
    tuner.metrics.connected = True
    ok, body = tuner.metrics.health(stale_after_s=60)  # what /healthz answers: 503
    assert (ok, body["model"]) == (False, None)
    assert body["no_model"] == f"the store serves model {wider}, which this worker cannot serve"
    histories, scores = sines(20, 200), Overall(halflife_s=30)
    try:
        for _ in range(5):
            tuner.tick(histories, scores)
            assert not tuner.running
            clock.now += 10
    finally:
        tuner.close()
    # Its refusal at start, and nothing trained.
    assert [e["event"] for e in events(redis_client, keys.models)] == ["promoted", "refused"]


def test_a_worker_with_no_model_leaves_the_input_unread_until_a_model_serves(
    redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """With no model, and the store serving one it refused (no cold start, then), the
    worker acked every entry as warming: a review's upgrade lost 2,000 forecasts so, with
    full windows. It leaves them unread, and forecasts each once a model serves."""
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    blob, damaged = dumps(new_model(COLD_START_MODEL, seed=1))
    store.put(blob[:-7] + bytes([blob[-7] ^ 0x01]) + blob[-6:], damaged)  # one bit off
    good, version = dumps(new_model(COLD_START_MODEL, seed=2))
    store.put(good, version)
    store.set_serving(damaged, "promoted")
    fill(redis_client, keys.input, sine_steps(2, 40, seed=1))
    worker = new_worker(settings_for(redis_url, keys, finetune_interval_s=3600), None)
    with WorkerThread(worker) as running:
        wait_for(lambda: worker.tuner.metrics.no_model is not None, what="the refusal")
        for _ in range(3):  # the loop turns, and reads nothing
            turned = worker.metrics.heartbeat
            wait_for(lambda: worker.metrics.heartbeat > turned, what="a turn")  # noqa: B023
        (group,) = redis_client.xinfo_groups(keys.input)
        assert (group["last-delivered-id"], group["pending"]) == (b"0-0", 0)
        # The pointer set by hand, with no event: looked at on the next turn.
        redis_client.set(keys.serving, version)
        wait_for(lambda: redis_client.xlen(keys.output) == 2 * (40 - 19), what="the forecasts")
    assert running.report is not None
    assert (running.report["forecasts"], running.report["warming"]) == (42, 2 * 19)
    assert {f[b"model"] for _, f in entries(redis_client, keys.output)} == {version.encode()}
    assert worker.tuner.metrics.no_model is None
    # One of another shape, promoted while a worker waits so: it stops to be made again
    # with that shape (worker.app), the input still unread.
    keys = Keys.prefixed(f"{keys.input}-reshaped:")
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    store.put(blob[:-7] + bytes([blob[-7] ^ 0x01]) + blob[-6:], damaged)
    store.set_serving(damaged, "promoted")
    fill(redis_client, keys.input, sine_steps(2, 40, seed=1))
    worker = new_worker(settings_for(redis_url, keys, finetune_interval_s=3600), None)
    with WorkerThread(worker):
        wait_for(lambda: worker.tuner.metrics.no_model is not None, what="the refusal")
        narrow, version = dumps(new_model(ModelConfig(window=8, hidden_size=4, attention_size=4)))
        store.put(narrow, version)
        store.set_serving(version, "promoted")
        wait_for(lambda: worker.reshaped is not None, what="the reshape")
    assert cast(Checkpoint, worker.reshaped).version == version
    assert redis_client.xinfo_groups(keys.input)[0]["last-delivered-id"] == b"0-0"


def test_a_first_models_training_is_collected_as_a_refused_model_comes(
    redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """A cold start's training under way as the store comes to serve a model this worker
    refuses: waiting, the worker collected nothing, and held the fleet's fine-tune lock
    for as long as it waited. Its candidate is rejected (a first model is promoted only
    while none serves), the lock given back, and no other training begun."""
    fill(redis_client, keys.input, sine_steps(10, 210, seed=1))
    settings = settings_for(redis_url, keys, finetune_interval_s=3600, finetune_steps=50)
    worker = new_worker(settings, None)
    with WorkerThread(worker):
        wait_for(lambda: worker.tuner.running, timeout=120, what="the cold start")
        blob, damaged = dumps(new_model(COLD_START_MODEL, seed=1))
        store = ModelStore(redis_client, keys, keep=5, source="another-worker")
        store.put(blob[:-7] + bytes([blob[-7] ^ 0x01]) + blob[-6:], damaged)
        store.set_serving(damaged, "promoted")
        fill(redis_client, keys.input, sine_steps(10, 1, seed=2))  # a batch brings the event
        wait_for(lambda: worker.tuner.metrics.no_model is not None, what="the refusal")
        wait_for(lambda: not worker.tuner.running, timeout=120, what="the training collected")
        wait_for(lambda: not redis_client.exists(keys.finetune_lock), what="the lock given back")
        assert not worker.tuner.running  # and none begun since
    assert [e["event"] for e in events(redis_client, keys.models)][-2:] == ["trained", "rejected"]


def test_with_fine_tuning_off_the_error_names_the_stored_model_it_refused(
    redis_client: redis.Redis, redis_url: str, keys: Keys
) -> None:
    """It said "no model: none in the store" a line after refusing the one it serves."""
    blob, version = dumps(AttentionLSTM(COLD_START_MODEL))
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    store.put(blob[:-7] + bytes([blob[-7] ^ 0x01]) + blob[-6:], version)  # one bit off
    store.set_serving(version, "promoted")
    cold = AttentionLSTM(COLD_START_MODEL)
    tuner = _tuner(redis_client, redis_url, keys, cold, FakeClock(), finetune_interval_s=0)
    with pytest.raises(ValueError, match=f"^no model: the store serves model {version}, refused"):
        tuner.start(None)


def test_a_worker_with_no_model_takes_the_shape_of_the_one_the_store_serves(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """The docker-compose default (no ATTNLSTM_MODEL) after a model of another window was
    promoted: the worker, started with the cold start's shape, refused it for good,
    acked every input as warming (none forecast, ever) and answered /healthz 503 (a
    review). It now takes the stored model's shape, as a worker given its file would:
    a value past the first window of each series is forecast by it."""
    wider = AttentionLSTM(replace(COLD_START_MODEL, window=COLD_START_MODEL.window + 10))
    blob, version = dumps(wider)
    store = ModelStore(redis_client, keys, keep=5, source="operator")
    store.put(blob, version)
    store.set_serving(version, "promoted")
    series, points = 4, 60
    ids = fill(redis_client, keys.input, sine_steps(series, points, seed=13))
    settings = settings_for(redis_url, keys, block_ms=100, finetune_interval_s=0)
    totals = run_service(settings, burst=True, stop=StopRequest())
    context = wider.config.context
    assert totals["forecasts"] == series * (points - context + 1)
    assert set(forecast_versions(redis_client, keys).values()) == {version}
    assert len(forecast_versions(redis_client, keys)) == series * (points - context + 1)
    assert redis_client.xpending(keys.input, keys.group)["pending"] == 0
    assert "the worker takes its shape" in caplog.text
    assert not [e for e in events(redis_client, keys.models) if e["event"] == "refused"]
    assert len(ids) == series * points


def test_a_worker_made_again_with_the_stores_shape_takes_another_again(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """Made again with the store's model (no file of its own), where the store serves a
    third shape by its start: it takes that one too. It refused it, fine-tuned no more,
    and warned of a `--model` never given (a review)."""
    made_with = AttentionLSTM(replace(COLD_START_MODEL, window=COLD_START_MODEL.window + 10))
    third = AttentionLSTM(replace(COLD_START_MODEL, window=COLD_START_MODEL.window + 20))
    blob, version = dumps(third)
    store = ModelStore(redis_client, keys, keep=5, source="operator")
    store.put(blob, version)
    store.set_serving(version, "promoted")
    tuner = _tuner(  # as worker.app makes it
        redis_client,
        redis_url,
        keys,
        made_with,
        FakeClock(),
        from_store=True,
        finetune_interval_s=0,
    )
    assert tuner.start(loads(dumps(made_with)[0])) is None
    assert tuner.reshape is not None
    assert tuner.reshape.version == version
    assert "--model" not in caplog.text
    assert not [e for e in events(redis_client, keys.models) if e["event"] == "refused"]


def test_a_cold_worker_takes_the_shape_of_a_model_promoted_while_it_runs(
    redis_client: redis.Redis, redis_url: str, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker keeping values for a cold start, when a model of another shape is
    promoted: it stops as a restart would (the batch it read left pending), and a worker
    of the model's shape serves on. Every input read once: kept (warming) before,
    forecast by the promoted model after, none twice, none pending."""
    settings = settings_for(redis_url, keys, block_ms=100, finetune_interval_s=3600)
    stop, outcome = StopRequest(), []
    service = threading.Thread(
        target=lambda: outcome.append(run_service(settings, burst=False, stop=stop))
    )
    series = 4
    values = sine_steps(series, 60, seed=14)
    first = fill(redis_client, keys.input, values[:40])
    service.start()
    try:
        wait_for(lambda: _group_read(redis_client, keys) == len(first), what="the values kept")
        wider = AttentionLSTM(replace(COLD_START_MODEL, window=COLD_START_MODEL.window + 10))
        blob, version = dumps(wider)
        store = ModelStore(redis_client, keys, keep=5, source="operator")
        store.put(blob, version)
        store.set_serving(version, "promoted")
        after = fill(redis_client, keys.input, values[40:])
        wait_for(lambda: redis_client.xlen(keys.output) >= len(after), what="the forecasts")
    finally:
        stop.ask()
        service.join(timeout=60)
    (totals,) = outcome
    versions = forecast_versions(redis_client, keys)
    assert set(versions) == set(after)  # each input after the promotion, once
    assert set(versions.values()) == {version}
    assert redis_client.xlen(keys.output) == len(after)
    assert (totals["warming"], totals["forecasts"]) == (len(first), len(after))
    assert redis_client.xpending(keys.input, keys.group)["pending"] == 0
    # The batch left pending at the stop is no input lost (it was counted so, a review):
    assert (totals["lost"], redis_client.xlen(keys.dead)) == (0, 0)
    assert "the worker takes its shape" in caplog.text


def _group_read(client: redis.Redis, keys: Keys) -> int:
    """Entries the group has read and acked (its entries-read, less those pending)."""
    groups = client.xinfo_groups(keys.input)
    if not groups:
        return 0
    return int(groups[0]["entries-read"] or 0) - int(groups[0]["pending"])


def test_the_first_fine_tune_does_not_wait_for_its_process_to_start(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A new fine-tuning process imports torch for seconds before it reads a job; the
    job (2,000 series of 1,000 values: 16 MB, more than a pipe holds) waits for it, and
    the tick that starts the fine-tune returns at once. It used to block the serving
    path until the process read the job (5.6 s for 10,000 series of 200 values)."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock,
        finetune_interval_s=10, finetune_steps=5,
    )  # fmt: skip
    tuner.start(loads(dumps(trained_sines)[0]))
    histories, scores = sines(2_000, 1_000), Overall(halflife_s=30)
    clock.now += 10
    try:
        tuner.tick(histories, scores)
        assert tuner.running
        # The process says it has started once it has imported torch: it had not yet
        # when the tick returned, so the tick did not wait for it, nor hand it the job.
        assert not _has_torch(_finetune_process())
        wait_for(lambda: tuner.tick(histories, scores) or not tuner.running, timeout=120)
    finally:
        tuner.close()
    assert events(redis_client, keys.models)[-1]["event"] in {"promoted", "rejected"}


def _has_torch(process: multiprocessing.process.BaseProcess) -> bool:
    """The process has loaded torch (its library is mapped)."""
    with open(f"/proc/{process.pid}/maps") as maps:
        return "libtorch" in maps.read()


def test_a_rejected_candidate_takes_no_stored_versions_place(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Two versions kept (keep_models 2): the serving one, and the one before it, which
    a rollback goes back to. A rejected candidate is not stored; it used to be, and to
    push the earlier version out (at the defaults, five rejected fine-tunes did)."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock,
        finetune_interval_s=10, finetune_steps=5, promote_margin=0.99, keep_models=2,
    )  # fmt: skip
    store = tuner.store
    for model in (other_model(trained_sines, 0.05), trained_sines):
        blob, version = dumps(model)
        store.put(blob, version)
        store.set_serving(version, "promoted")
    kept = store.versions()
    assert tuner.start(None) is not None  # the store's serving version
    histories, scores = sines(5, 200), Overall(halflife_s=30)
    clock.now += 10
    try:
        tuner.tick(histories, scores)
        wait_for(lambda: tuner.tick(histories, scores) or not tuner.running, what="its end")
    finally:
        tuner.close()
    trained, rejected = events(redis_client, keys.models)[-2:]
    assert (trained["event"], rejected["event"]) == ("trained", "rejected")
    assert store.versions() == kept
    assert store.get(kept[1]).version == kept[1]  # the rollback's target is still there


def test_a_fine_tuning_process_that_cannot_start_fails_the_fine_tune_not_the_worker(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Out of file descriptors (EMFILE), the process cannot be started: the fine-tune
    fails with an event and a metric, the lock is released, and the next one is due on
    the schedule. The OSError used to escape the worker's loop, the lock held for its
    10 min TTL."""
    clock, metrics = FakeClock(), Metrics()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock, metrics=metrics,
        finetune_interval_s=10, finetune_steps=5,
    )  # fmt: skip
    tuner.start(loads(dumps(trained_sines)[0]))
    histories, scores = sines(5, 200), Overall(halflife_s=30)
    clock.now += 10
    redis_client.ping()  # its connection is open: Redis is still reached
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new descriptor
    try:
        tuner.tick(histories, scores)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        assert not tuner.running
        assert redis_client.get(keys.finetune_lock) is None
        failed = events(redis_client, keys.models)[-1]
        assert failed["event"] == "failed"
        assert failed["reason"].startswith("could not start the fine-tuning process: ")
        assert "Too many open files" in failed["reason"]
        clock.now += 9
        tuner.tick(histories, scores)
        assert not tuner.running  # not due yet
        clock.now += 1
        tuner.tick(histories, scores)
        assert tuner.running
    finally:
        tuner.close()
    outcomes = {"outcome": "failed"}
    assert metrics.registry.get_sample_value("attnlstm_finetunes_total", outcomes) == 1


def _drifting() -> Overall:
    """Scores whose rolling MAE has just jumped 50 times over its level."""
    scores = Overall(halflife_s=30)
    usual, naive = np.full(4, 0.1), np.full(4, 1.0)
    scores.add(usual, naive, None, 0.0)
    scores.add(usual, naive, None, 30.0)  # one half-life of scores
    scores.add(np.full(4, 5.0), naive, None, 31.0)
    assert scores.drifting(1.5)
    return scores


@pytest.mark.parametrize("held", [True, False], ids=["lock held elsewhere", "short history"])
def test_a_drift_that_cannot_start_a_fine_tune_tries_again_later_not_every_batch(
    held: bool,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """Drifting while another worker fine-tunes, or with too little history yet: it is
    tried again DRIFT_RETRY_S later; it used to be at every batch. Each try copies every
    history (0.15 s for 10,000 series), except where another worker holds the lock: it
    copied them to find that out."""
    clock = FakeClock()
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, clock, finetune_interval_s=300)
    tuner.start(loads(dumps(trained_sines)[0]))
    scores = _drifting()
    history = np.sin(np.arange(200.0 if held else 30.0))
    looks: list[float] = []

    def histories() -> tuple[list[str], list[np.ndarray]]:
        looks.append(clock.now)
        return ["s0"], [history]

    if held:
        other = Lease(
            redis_client,
            key=keys.finetune_lock,
            fence_key=keys.finetune_fence,
            owner="other",
            ttl_ms=60_000,
        )
        assert other.acquire()[0] == other.token
    asked = _lock_reads(tuner)
    for batch in range(20):  # 50 ms apart
        clock.now = batch * 0.05
        tuner.tick(histories, scores)
    assert (looks, asked) == ([] if held else [0.0], [0.0])
    clock.now = DRIFT_RETRY_S
    tuner.tick(histories, scores)
    assert (looks, asked) == ([] if held else [0.0, DRIFT_RETRY_S], [0.0, DRIFT_RETRY_S])
    assert not tuner.running
    assert scores.drifting(1.5)  # still: nothing has settled it


def _lock_reads(tuner: Tuner) -> list[float]:
    """When ``tuner`` reads who holds the fine-tune lock, from now on, by its clock."""
    reads: list[float] = []
    holder = tuner.lock.holder

    def counted() -> str | None:
        reads.append(tuner._clock())
        return holder()

    tuner.lock.holder = counted  # type: ignore[method-assign]
    return reads


def _jobs() -> int:
    """Fine-tune jobs alive in this process."""
    gc.collect()
    return sum(type(o) is Job for o in gc.get_objects())


def test_between_jobs_the_fine_tuning_process_holds_none_of_the_last(
    trained_sines: AttentionLSTM,
) -> None:
    """The job's histories (every series served: 80 MB for 10,000 series of 1,000
    values) are let go once its outcome is sent; the idle process used to keep them
    until the next job. Its loop runs in a thread here, on a real pipe, so that what it
    holds can be counted."""
    ours, theirs = multiprocessing.Pipe()
    loop = threading.Thread(target=run_jobs, args=(theirs,), name="fine-tune jobs", daemon=True)
    loop.start()
    before = _jobs()
    histories = list(make_sines(SineSpec(n_series=5, n_points=200), seed=3).values)
    config = FinetuneConfig(steps=1)
    ours.send(Job(histories=histories, config=config, serving=dumps(trained_sines)[0]))
    ok, outcome = ours.recv()
    assert ok, outcome
    try:
        wait_for(lambda: _jobs() == before, timeout=10, what="the job to be let go")
    finally:
        ours.close()  # the loop ends
        loop.join(timeout=10)
    assert not loop.is_alive()


def _lose_the_store(client: redis.Redis, keys: Keys) -> None:
    """Every models key gone, as in a Redis restart without persistence."""
    for key in client.scan_iter(match=f"{keys.models}*"):
        client.delete(key)


@pytest.mark.parametrize("own", [True, False], ids=["with a model", "with none"])
def test_a_refusal_is_looked_at_afresh_when_the_worker_re_syncs(
    own: bool, redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """The store serves a model this worker cannot serve (with a model: another shape;
    with none, which would take another shape, a damaged one), then loses its models
    keys; the worker re-syncs (``start`` again, as after a reconnect). The refusal used
    to stay: with a model, no fine-tune ever again; with none, no cold start and
    /healthz 503 for good, against a store that served nothing."""
    model = trained_sines if own else AttentionLSTM(COLD_START_MODEL)
    wider = AttentionLSTM(replace(model.config, window=model.config.window + 10))
    store = ModelStore(redis_client, keys, keep=5, source="another-worker")
    blob, version = dumps(wider if own else model)
    if not own:
        blob = blob[:-7] + bytes([blob[-7] ^ 0x01]) + blob[-6:]  # one bit of one weight
    store.put(blob, version)
    store.set_serving(version, "promoted")
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, model, clock, finetune_interval_s=10, finetune_steps=5
    )
    file_model = loads(dumps(model)[0]) if own else None
    tuner.start(file_model)  # the store's refused: its file served here alone, or none
    assert (tuner.metrics.no_model is None) == own
    _lose_the_store(redis_client, keys)
    tuner.start(file_model)
    assert tuner.metrics.no_model is None
    assert store.serving() == (version_of(model) if own else None)  # its file, promoted
    reasons = [e["reason"] for e in events(redis_client, keys.models) if e["event"] == "promoted"]
    assert reasons == (["served here; the store had none"] if own else [])
    histories, scores = sines(20, 200), Overall(halflife_s=30)
    clock.now += 10
    try:
        tuner.tick(histories, scores)
        assert tuner.running
    finally:
        tuner.close()


@pytest.mark.parametrize("when", ["at start", "after a fine-tune"])
def test_an_event_written_just_after_the_workers_own_promotion_is_read(
    when: str,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A promotion by hand (at start: of another file) or a rollback (after a fine-tune:
    to its parent) lands right after the worker's own promotion. The worker used to read
    the newest event id after it, and so skip that event for good: it served its own
    version while the store served another."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock,
        finetune_interval_s=10, finetune_steps=50,
    )  # fmt: skip
    operator = ModelStore(redis_client, keys, keep=5, source="cli")
    promote = tuner.store.promote
    by_hand, by_hand_version = dumps(other_model(trained_sines, 0.05))
    parent = other_model(trained_sines, 0.5)  # forecasts 0.5 too high: its candidate wins

    def then_the_operator(data: bytes, version: str, *args: Any, **fields: Any) -> bool:
        promoted = promote(data, version, *args, **fields)
        assert promoted
        if when == "at start":
            operator.put(by_hand, by_hand_version)
            operator.set_serving(by_hand_version, "promoted", reason="promoted by hand")
        else:
            operator.set_serving(version_of(parent), "rolled_back", previous=version)
        return promoted

    if when == "at start":
        monkeypatch.setattr(tuner.store, "promote", then_the_operator)
        assert tuner.start(loads(dumps(trained_sines)[0])) is not None
    else:
        assert tuner.start(loads(dumps(parent)[0])) is not None
        monkeypatch.setattr(tuner.store, "promote", then_the_operator)
        histories, scores = sines(5, 200), Overall(halflife_s=30)
        clock.now += 10
        try:
            tuner.tick(histories, scores)
            wait_for(lambda: tuner.tick(histories, scores) or not tuner.running, timeout=120)
        finally:
            tuner.close()
        assert events(redis_client, keys.models)[-2]["event"] == "promoted"
    switched = tuner.sync(unseen(redis_client, tuner))
    assert switched is not None
    assert tuner.version == switched.version == operator.serving()


@pytest.mark.parametrize("version", [b"\xff\xfe", b"../../etc"], ids=["not UTF-8", "not hex"])
def test_a_switch_event_that_names_something_else_than_a_version_is_skipped(
    version: bytes,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One event written by anyone who can write to the stream used to stop every
    worker (not UTF-8: UnicodeDecodeError out of the loop), and `models list` with it."""
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, FakeClock())
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    redis_client.xadd(keys.models, {"event": "promoted", "version": version})
    assert tuner.sync(unseen(redis_client, tuner)) is None
    assert tuner.version == served.version
    assert f"(promoted) names {version!r}, not a model version: skipped" in caplog.text
    assert [e[b"event"] for _, e in entries(redis_client, keys.models)] == [b"promoted"] * 2
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    assert main(["models", "list", *flags]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["events"][-1]["version"] == version.decode(errors="replace")


def test_a_serving_pointer_that_is_not_utf8_is_refused_at_start(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Bytes written over the serving pointer by anyone with the workers' rights used to
    raise UnicodeDecodeError out of every worker's start and re-sync, and out of
    `models list`; so did such bytes in the versions list. They name no stored version:
    the worker refuses them and serves its file."""
    redis_client.set(keys.serving, b"\xff\xfe")
    redis_client.lpush(keys.versions, b"\xff\xfe")
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, FakeClock())
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    assert tuner.version == served.version
    refused = events(redis_client, keys.models)[-1]
    assert (refused["event"], refused["version"]) == ("refused", "\\xff\\xfe")
    assert "not in the store" in refused["reason"]
    flags = ["--redis-url", redis_url, "--models-stream", keys.models, "--json"]
    assert main(["models", "list", *flags]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (report["serving"], report["versions"][-1]) == ("\\xff\\xfe", "\\xff\\xfe")


def test_a_switch_to_a_key_of_another_type_is_refused(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """The version's key holds a stream: its GET fails with WRONGTYPE, which used to
    leave the worker's loop as a fatal error, with advice about its streams' names."""
    tuner = _tuner(redis_client, redis_url, keys, trained_sines, FakeClock())
    served = tuner.start(loads(dumps(trained_sines)[0]))
    assert served is not None
    version = "0123456789abcdef"
    redis_client.xadd(keys.model(version), {"not": "a model"})
    redis_client.set(keys.serving, version)
    redis_client.xadd(keys.models, {"event": "rolled_back", "version": version})
    assert tuner.sync(unseen(redis_client, tuner)) is None
    assert tuner.version == served.version
    refused = events(redis_client, keys.models)[-1]
    assert (refused["event"], refused["version"]) == ("refused", version)
    assert "WRONGTYPE" in refused["reason"]


def _state(process: multiprocessing.process.BaseProcess) -> str:
    """The process's state, as /proc says it (R running, S sleeping, T stopped, ...)."""
    with open(f"/proc/{process.pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_stopping_a_frozen_fine_tuning_process_does_not_hang() -> None:
    """A stopped process (SIGSTOP, a cgroup freezer, a debugger) leaves SIGTERM pending:
    stop() used to wait for it for as long as it stayed stopped, and the serving thread
    with it. It is killed."""
    trainer = Trainer(1)
    child = _finetune_process()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGSTOP)
    # Stopped once it has acted on the signal: a SIGTERM before that still ends it.
    wait_for(lambda: _state(child) == "T", what="the process to stop")
    stopping = threading.Thread(target=trainer.stop, name="stop", daemon=True)
    try:
        stopping.start()
        stopping.join(timeout=60)
        assert not stopping.is_alive(), "stop() still waits for the stopped process"
    finally:
        if child.is_alive():  # stop() still waits: its SIGTERM ends it once it goes on
            os.kill(child.pid, signal.SIGCONT)
            stopping.join(timeout=60)
    assert child.exitcode == -signal.SIGKILL


def test_handing_a_job_to_a_stopped_fine_tuning_process_does_not_block() -> None:
    """The job was written through the pipe on the serving thread: 0.1-0.7 s for the
    histories of 10,000 series, and for good where the process had stopped reading (a
    SIGSTOP, a cgroup freezer); the job's timeout, checked on that thread, never came."""
    trainer = Trainer(1)
    try:
        wait_for(trainer.started, what="the fine-tuning process to start")
        child = _finetune_process()
        assert child.pid is not None
        os.kill(child.pid, signal.SIGSTOP)
        wait_for(lambda: _state(child) == "T", what="the process to stop")
        histories = [np.zeros(1_360) for _ in range(2_000)]  # 22 MB: past any pipe's buffer
        job = Job(histories=histories, config=FinetuneConfig(), serving=None)
        submitting = threading.Thread(target=trainer.submit, args=(job,), daemon=True)
        submitting.start()
        submitting.join(timeout=30)
        assert not submitting.is_alive(), "submit() waits for the stopped process"
    finally:
        trainer.stop()  # killed: stopped, it leaves SIGTERM pending


def test_the_fine_tuning_process_goes_with_a_worker_killed_9() -> None:
    """Nothing tied it to the worker: killed -9, the worker left it running its job
    beside the next worker (here a job of a million steps), at full tilt if it had hung."""
    script = (
        "import time\n"
        "import numpy as np\n"
        "from worker.online.finetune import FinetuneConfig, Job\n"
        "from worker.online.trainer import Trainer\n"
        "trainer = Trainer(1)\n"
        "while not trainer.started():\n"
        "    time.sleep(0.05)\n"
        "histories = [np.sin(np.arange(400) / (5 + k % 50)) for k in range(2_000)]\n"
        "from worker.online.tuner import COLD_START_MODEL\n"
        "config = FinetuneConfig(steps=1_000_000)\n"
        "trainer.submit(Job(histories, config, model_config=COLD_START_MODEL.to_dict()))\n"
        "print(trainer._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=worker_env()
    )
    assert worker.stdout is not None
    child = int(worker.stdout.readline())
    worker.kill()
    worker.wait()
    wait_for(lambda: gone(child), timeout=30, what="the fine-tuning process to end")
