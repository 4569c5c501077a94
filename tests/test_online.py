"""Fine-tuning, the model store, rollback and cold start, with workers on a real server."""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import redis

from attnlstm.checkpoint import Checkpoint, dumps, loads, version_of
from attnlstm.model import AttentionLSTM
from attnlstm.synthetic import SineSpec, make_sines, sine_steps
from tests.helpers import (
    WorkerThread,
    entries,
    events,
    fill,
    finetune_processes,
    new_worker,
    other_model,
    settings_for,
    wait_for,
)
from worker.cli import main
from worker.engine import check_fits
from worker.keys import Keys
from worker.lease import ensure_library
from worker.metrics import Metrics
from worker.online.scoring import Overall
from worker.online.store import ModelStore
from worker.online.tuner import JOB_TIMEOUT_S, Tuner
from worker.state import WindowState
from worker.tools.readback import read_views


@pytest.fixture(autouse=True)
def _worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnlstm")


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
    **overrides: Any,
) -> Tuner:
    """A tuner as a worker serving ``model``'s shape makes one, on a clock the test moves;
    the function library loaded, as the worker does at start."""
    ensure_library(client)
    settings = settings_for(url, keys, consumer=consumer, **overrides)
    store = ModelStore(client, keys, keep=5, source=consumer)
    return Tuner(
        client,
        settings=settings,
        store=store,
        metrics=metrics or Metrics(),
        fits=_fits(model),
        clock=clock,
    )


class FakeClock:
    """A clock that moves only when the test moves it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def forecast_versions(client: redis.Redis, keys: Keys) -> dict[bytes, str]:
    """The model version of each forecast, by its input entry id."""
    return {f[b"src"]: f[b"model"].decode() for _, f in entries(client, keys.output)}


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


def test_one_worker_fine_tunes_at_a_time(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
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
    second.close()  # the fine-tune in flight is dropped, and the lock with it
    assert redis_client.get(keys.finetune_lock) is None


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
        tuner.tick(state.histories, scores)
        assert tuner.running

    def outcome() -> str:
        wait_for(lambda: tuner.tick(state.histories, scores) or not tuner.running, what="its end")
        assert redis_client.get(keys.finetune_lock) is None  # released, whatever happened
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
        tuner.tick(state.histories, scores)
        assert not tuner.running
        assert events(redis_client, keys.models)[-1]["reason"].startswith("still running")
        assert redis_client.get(keys.finetune_lock) is None
    finally:
        tuner.close()
    failed = metrics.registry.get_sample_value("attnlstm_finetunes_total", {"outcome": "failed"})
    assert failed == 2


def test_a_candidate_is_not_promoted_over_a_version_that_replaced_its_parent(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A fine-tune from a model that forecasts 0.5 too high, which its candidate beats by
    far; while it trains, an operator promotes another version by hand (or another
    worker's promotion lands, or a frozen worker wakes with its result): the candidate is
    stored and rejected, and the version promoted meanwhile keeps serving."""
    clock = FakeClock()
    tuner = _tuner(
        redis_client, redis_url, keys, trained_sines, clock,
        finetune_interval_s=10, finetune_steps=100,
    )  # fmt: skip
    store = tuner.store
    parent = tuner.start(loads(dumps(other_model(trained_sines, 0.5))[0]))
    assert parent is not None
    state = WindowState(window=20, length=200, max_series=10)
    values = make_sines(SineSpec(n_series=1, n_points=200), seed=3).values[0]
    state.push(np.repeat(state.slots_for(["s0"]), 200), values, gather=False)
    scores = Overall(halflife_s=30)
    clock.now += 10
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
    assert rejected["reason"].startswith(f"{version} serves by now"), rejected["reason"]
    assert store.serving() == version
    assert tuner.version == parent.version  # it switches at the promotion's event, as all do
    assert redis_client.get(keys.finetune_lock) is None


def test_a_model_of_another_shape_is_not_adopted(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A model promoted by hand that reads another number of values than the worker keeps:
    refused, and the fine-tunes go on from the model that serves, not from it."""
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
