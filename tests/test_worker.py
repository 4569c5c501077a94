"""The worker end to end, in this process, against a real server: the stream contract
and its guarantees."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import urllib.request
from collections.abc import Iterator
from typing import cast

import numpy as np
import pytest
import redis
import torch

import worker.loop as worker_loop
from attnlstm.checkpoint import version_of
from attnlstm.model import AttentionLSTM, ModelConfig
from attnlstm.synthetic import sine_steps
from attnlstm.train import new_model
from tests.helpers import (
    WorkerThread,
    assert_forecasts,
    by_src,
    drain,
    entries,
    expected,
    fill,
    forecasts_by_src,
    new_worker,
    settings_for,
    stood_in,
)
from worker.keys import Keys
from worker.metrics import Metrics, serve


@pytest.fixture(autouse=True)
def _worker_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="attnlstm")


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
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    values = sine_steps(200, 100, seed=1)
    ids = fill(redis_client, keys.input, values)
    report = drain(settings_for(redis_url, keys, device=device), trained_sines)

    want = expected(trained_sines, values, ids, device)  # the same model on the same device
    got = forecasts_by_src(redis_client, keys.output)
    assert set(got) == set(want)  # exactly the inputs whose window is full, once each
    assert len(got) == 200 * (100 - trained_sines.config.window + 1)
    version = version_of(trained_sines)
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
        lo, hi = json.loads(fields[b"lo"]), json.loads(fields[b"hi"])  # 90% by default
        assert len(lo) == len(hi) == len(yhat)
        assert (np.array(lo) < yhat).all()
        assert (yhat < np.array(hi)).all()
    assert report["read"] == len(ids)
    assert report["forecasts"] == len(want)
    assert report["warming"] == 200 * (trained_sines.config.window - 1)
    assert report["dead"] == 0
    assert redis_client.xlen(keys.input) == len(ids)  # input never trimmed
    assert redis_client.xpending(keys.input, "forecasters")["pending"] == 0


def test_batches_hold_at_most_batch_values_values_and_forecast_as_before(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A model that reads many values per forecast is served in smaller batches (the
    day-ahead model's 817 in batches of 640): here 32 windows' worth of values."""
    values = sine_steps(50, 60, seed=2)
    ids = fill(redis_client, keys.input, values)
    context = trained_sines.config.context
    report = drain(settings_for(redis_url, keys, batch_values=32 * context), trained_sines)

    assert report["batches"] >= len(ids) / 32  # at most 32 entries a batch, not 1,024
    assert f"batches of at most 32 entries: {context} values each" in caplog.text
    assert_forecasts(redis_client, keys.output, expected(trained_sines, values, ids))
    assert redis_client.xpending(keys.input, "forecasters")["pending"] == 0


def test_a_spike_is_an_anomaly_event_in_the_batch_that_forecasts_it(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    values = sine_steps(20, 120, seed=4)
    spikes = [(60, 3), (61, 7), (100, 3)]  # (step, series); 61 and 100: one each, 60's quiet
    for t, j in spikes:
        values[t, j] += 10 * values[:, j].std()
    ids = fill(redis_client, keys.input, values)
    report = drain(settings_for(redis_url, keys), trained_sines)

    events = {fields[b"src"]: fields for _, fields in entries(redis_client, keys.anomalies)}
    want = {ids[t * 20 + j] for t, j in spikes}
    assert set(events) == want  # each spike, and nothing in the windows after it
    assert report["anomalies"] == len(want)
    got = forecasts_by_src(redis_client, keys.output)
    for src, event in events.items():
        index = ids.index(src)
        assert event[b"series"] == f"s{index % 20}".encode()
        assert float(event[b"value"]) == values[index // 20, index % 20]
        assert float(event[b"score"]) >= 5  # the default threshold, in half-widths
        lo, hi = float(event[b"lo"]), float(event[b"hi"])
        assert not lo <= float(event[b"value"]) <= hi
        before = got[ids[index - 20]]  # the series' forecast just before: its interval
        assert lo == pytest.approx(json.loads(before[b"lo"])[0], rel=1e-6)
        assert float(event[b"yhat"]) == pytest.approx(json.loads(before[b"yhat"])[0], rel=1e-12)


@pytest.mark.parametrize(
    ("stand_in", "found"),
    [
        (True, [(60, 0), (60, 1), (64, 1), (66, 0), (70, 0), (100, 0)]),
        # 66 is the 6th after 60; 70 the 10th after 60 (and 4th after 66); 64 the 4th after 60
        (False, [(60, 0), (60, 1), (66, 0), (100, 0)]),
    ],
)
def test_a_spike_after_a_spike_is_found_where_its_forecast_does_not_read_the_first(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    stand_in: bool,
    found: list[tuple[int, int]],
) -> None:
    # A model of a 4-step window and a lag of 8 (its forecast the last value: head and
    # linear map zero) reads the 4 values before a forecast and the 4 before those 8 back.
    # Stood in for, a spike is read by no forecast, and every spike after it is found.
    # Kept in the windows, the 1st-4th and 9th-12th values after it are not judged, the
    # 5th-8th are (until 2026-12-03 none of the 12 was).
    model = new_model(ModelConfig(window=4, lags=(8,), hidden_size=4, attention_size=4))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    values = 10 + np.sin(2 * np.pi * np.arange(120) / 40)[:, None].repeat(2, axis=1)
    spikes = [(60, 0), (66, 0), (70, 0), (100, 0), (60, 1), (64, 1)]
    for t, j in spikes:
        values[t, j] += 50.0
    ids = fill(redis_client, keys.input, values)
    drain(settings_for(redis_url, keys, stand_in_anomalies=stand_in), model)
    events = [ids.index(fields[b"src"]) for _, fields in entries(redis_client, keys.anomalies)]
    assert sorted(divmod(k, 2) for k in events) == found


@pytest.mark.parametrize("max_batch", [1024, 20, 7])
def test_forecasts_after_a_spike_read_its_forecast_in_its_place_however_the_stream_is_batched(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    max_batch: int,
) -> None:
    """Each spike's window holds the forecast it broke, and every forecast is the offline
    model's on those windows: the same whether a batch holds 51 values of a series (1,024
    entries over 20 series, where a spike's later forecasts are made again), one (20), or
    less than one of each series (7). Two spikes in a row: the second stays (the series
    may have moved), and is followed."""
    values = sine_steps(20, 120, seed=4)
    spikes = [(50, 2), (60, 3), (61, 3), (61, 7), (70, 7), (100, 3)]
    for t, j in spikes:
        values[t, j] += 10 * values[:, j].std()
    ids = fill(redis_client, keys.input, values)
    drain(settings_for(redis_url, keys, max_batch=max_batch), trained_sines)

    events = {fields[b"src"]: fields for _, fields in entries(redis_client, keys.anomalies)}
    assert sorted(divmod(ids.index(src), 20) for src in events) == sorted(spikes)
    windowed = stood_in(redis_client, keys, values, ids)
    changed = np.argwhere(windowed != values).tolist()
    assert changed == [[50, 2], [60, 3], [61, 7], [70, 7], [100, 3]]
    for t, j in changed:  # each in its window as the forecast it broke, near the sine
        assert abs(windowed[t, j] - values[t - 1, j]) < values[:, j].std()
    assert_forecasts(redis_client, keys.output, expected(trained_sines, windowed, ids))


def test_after_a_level_shift_the_windows_take_the_new_level(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """A series that jumps and stays: its first value is stood in for, the rest enter its
    window as they come, and its forecasts follow the new level."""
    values = sine_steps(4, 200, seed=9)
    values[100:, 1] += 20 * values[:, 1].std()
    ids = fill(redis_client, keys.input, values)
    drain(settings_for(redis_url, keys), trained_sines)
    windowed = stood_in(redis_client, keys, values, ids)
    assert np.argwhere(windowed != values).tolist() == [[100, 1]]
    got = assert_forecasts(redis_client, keys.output, expected(trained_sines, windowed, ids))
    last = json.loads(got[ids[-3]][b"yhat"])[0]  # series 1's last forecast
    assert abs(last - values[-1, 1]) < values[:100, 1].std()


def test_with_coverage_zero_there_are_no_intervals_and_no_anomalies(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    values = sine_steps(5, 40, seed=5)
    values[30, 2] += 100.0
    fill(redis_client, keys.input, values)
    drain(settings_for(redis_url, keys, coverage=0), trained_sines)
    got = forecasts_by_src(redis_client, keys.output)
    assert got
    assert all(
        set(fields) == {b"series", b"src", b"ts", b"yhat", b"attn", b"model"}
        for fields in got.values()
    )
    assert redis_client.xlen(keys.anomalies) == 0


def test_the_exit_report_counts_this_run(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """What ``attnlstm worker --burst --json`` prints, from the worker's own counters."""
    fill(redis_client, keys.input, sine_steps(3, 25, seed=10))
    redis_client.xadd(keys.input, {"series": "s0", "value": "oops"})
    report = drain(settings_for(redis_url, keys), trained_sines)
    assert (report["read"], report["forecasts"], report["warming"]) == (76, 18, 57)
    assert report["dead"] == 1
    assert report["batches"] >= 1
    assert report["recoveries"] == 1


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
    ({"series": b"s0", "value": b"1e300"}, "out of range"),  # finite, but overflows std
    ({"series": b"s0", "value": b"\xff"}, "not a decimal number"),
    ({"series": b"s0", "value": b"1.0", "ts": b"yesterday"}, "ts is not"),
    ({"series": b"s0", "value": b"1.0", "ts": b"-5"}, "ts is not"),
]


def test_malformed_entries_go_to_the_dead_stream_and_the_worker_keeps_going(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    window = trained_sines.config.window
    settings = settings_for(redis_url, keys, block_ms=100)
    with WorkerThread(new_worker(settings, trained_sines)) as running:
        values = sine_steps(3, window + 10, seed=2)
        bad_ids: dict[bytes, str] = {}
        for t in range(values.shape[0]):  # bad entries mixed among good ones, as they come
            for j in range(3):
                redis_client.xadd(
                    keys.input, {"series": f"s{j}", "value": repr(float(values[t, j]))}
                )
            if t < len(BAD_ENTRIES):
                fields, reason = BAD_ENTRIES[t]
                bad_ids[cast(bytes, redis_client.xadd(keys.input, fields))] = reason  # type: ignore[arg-type]
        good = 3 * (values.shape[0] - window + 1)
        running.wait_for(lambda: redis_client.xlen(keys.output) >= good)
        running.wait_for(lambda: redis_client.xlen(keys.dead) >= len(bad_ids))
        dead = by_src(redis_client, keys.dead)
        assert set(dead) == set(bad_ids)
        inputs = dict(entries(redis_client, keys.input))
        for src, reason in bad_ids.items():
            assert reason in dead[src][b"error"].decode(), (reason, dead[src])
            original = inputs[src]
            assert {k: dead[src][k] for k in original} == original  # the fields, unchanged
        assert redis_client.xlen(keys.output) == good
        running.wait_for(lambda: redis_client.xpending(keys.input, "forecasters")["pending"] == 0)
    assert running.report is not None
    assert running.report["dead"] == len(BAD_ENTRIES)
    assert "saved windows of 3 series" in caplog.text


@pytest.fixture
def metrics_server() -> Iterator[tuple[Metrics, int]]:
    metrics = Metrics()
    server = serve(metrics, port=0, stale_after_s=10)
    try:
        yield metrics, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_and_health_endpoints(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    metrics_server: tuple[Metrics, int],
) -> None:
    metrics, port = metrics_server
    fill(redis_client, keys.input, sine_steps(5, 30))
    redis_client.xadd(keys.input, {"series": "s0", "value": "oops"})
    settings = settings_for(redis_url, keys, block_ms=100)
    with WorkerThread(new_worker(settings, trained_sines, metrics=metrics)) as running:
        running.wait_for(lambda: redis_client.xlen(keys.dead) == 1)
        running.wait_for(lambda: _get(port, "/healthz")[0] == 200)
        _, body = _get(port, "/healthz")
        assert json.loads(body) | {"loop_age_s": 0} == {
            "ok": True,
            "role": "active",
            "redis": True,
            "loop_age_s": 0,
            "model": version_of(trained_sines),
        }
        # Counted once each batch's transaction is applied: wait for the last one.
        running.wait_for(lambda: _samples(port)["attnlstm_forecasts_published_total"] == 55)
        samples = _samples(port)
        assert samples["attnlstm_entries_read_total"] == 151
        assert samples['attnlstm_dead_lettered_total{reason="value"}'] == 1
        assert samples["attnlstm_end_to_end_latency_seconds_count"] == 55
        assert samples["attnlstm_batch_size_count"] >= 1
        assert samples["attnlstm_series"] == 5
        # The lag gauge is refreshed on a timer: it drops to 0 once that has run.
        running.wait_for(lambda: _samples(port)["attnlstm_group_lag"] == 0)


def test_a_second_worker_waits_for_the_lease_and_takes_over(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers on one stream would each see half of every series' values."""
    standby_metrics = Metrics()
    first = new_worker(settings_for(redis_url, keys, consumer="a"), trained_sines)
    second = new_worker(
        settings_for(redis_url, keys, consumer="b"), trained_sines, metrics=standby_metrics
    )
    with WorkerThread(first) as active:
        a_token, b_token = first.token, second.token
        active.wait_for(lambda: redis_client.get(keys.lease) == a_token.encode())
        standby = WorkerThread(second).start()
        standby.wait_for(lambda: standby_metrics.role == "standby")
        assert standby_metrics.health(stale_after_s=10)[0]  # healthy, waiting
    with standby:
        fill(redis_client, keys.input, sine_steps(2, 25))
        standby.wait_for(lambda: redis_client.xlen(keys.output) == 2 * 6)
        assert redis_client.get(keys.lease) == b_token.encode()
        assert standby_metrics.role == "active"
    assert f"waiting: {a_token} holds the lease" in caplog.text
    assert redis_client.get(keys.lease) is None  # released at exit


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def _samples(port: int) -> dict[str, float]:
    out = {}
    for line in _get(port, "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_slots_of_series_gone_quiet_go_to_new_series_when_only_new_ones_send(
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """Every slot held by a series that went quiet, and an hour later only new series
    send: the sweep frees the old slots by the stream's clock, and the new series take
    them. Before, the sweep went by the newest value held, which only the slots' own
    series move: the old series were never idle, and every new one was refused for good."""
    monkeypatch.setattr(worker_loop, "AUDIT_INTERVAL_S", 0.0)  # a sweep between batches
    t0 = 1_700_000_000_000
    old = [(f"{t0 + t}-{i}", f"old{i}") for t in range(2) for i in range(3)]
    new = [(f"{t0 + 3_600_000 + t}-{i}", f"new{i}") for t in range(10) for i in range(3)]
    for entry_id, series in old + new:
        redis_client.xadd(keys.input, {"series": series, "value": "1.5"}, id=entry_id)
    settings = settings_for(redis_url, keys, max_series=3, series_idle_s=1.0, max_batch=3)
    report = drain(settings, trained_sines)
    refused = [
        src for src, f in by_src(redis_client, keys.dead).items() if b"series limit" in f[b"error"]
    ]
    new_ids = [entry_id.encode() for entry_id, _ in new]
    assert set(refused) <= set(new_ids[:3])  # at most the first batch, read before a sweep
    # Nothing else dead-lettered, whatever the reason says: the rest went into windows.
    assert redis_client.xlen(keys.dead) == len(refused)
    assert report["warming"] == len(old + new) - len(refused)


def test_a_backlog_of_series_that_take_turns_is_read_without_refusals(
    monkeypatch: pytest.MonkeyPatch,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """Eight groups of three series take turns, 5 s of entry time apart: never more than
    three live at once, with max_series 3 and series_idle_s 1. Read as a backlog, with no
    audit between batches, a batch that would not fit frees the slots idle by its first
    entry's time first. Before, every group after the first was refused (21 series, 42
    values dead-lettered) where the same entries paced lost none (a review)."""
    monkeypatch.setattr(worker_loop, "AUDIT_INTERVAL_S", 3600.0)  # no audit while it reads
    t0 = 1_700_000_000_000
    for group in range(8):
        for t in range(2):
            for i in range(3):
                entry_id = f"{t0 + 5_000 * group + t}-{i}"
                redis_client.xadd(
                    keys.input, {"series": f"g{group}-{i}", "value": "1.5"}, id=entry_id
                )
    settings = settings_for(redis_url, keys, max_series=3, series_idle_s=1.0, max_batch=3)
    report = drain(settings, trained_sines)
    assert redis_client.xlen(keys.dead) == 0, by_src(redis_client, keys.dead)
    assert report["warming"] == 48


def test_a_worker_that_keeps_falling_out_of_step_spaces_its_re_syncs_out(
    caplog: pytest.LogCaptureFixture,
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
) -> None:
    """Another reader in the worker's group takes an entry now and then, so the worker's
    reads keep finding entries it never got: each time out of step, it re-syncs (and
    re-reads every window). Out of step again within RESYNC_CALM_S, it waits first, twice
    as long each time, up to a quarter of the lease. Before, it re-synced 15 times a
    second for as long as the other reader read, with a warning each time."""
    redis_client.xadd(keys.input, {"series": "s0", "value": "1.0"})
    n = 0

    def intruded_often() -> bool:
        nonlocal n
        n += 1
        # One transaction: the intruder takes the first of two entries before the worker,
        # blocked on its read, is served the second. Apart, the worker mostly was served
        # first, and the test waited for a theft 20-30 s at a time (a time-out, one run
        # in three).
        theft = redis_client.pipeline(transaction=True)
        for k in (n, n + 1):
            theft.xadd(keys.input, {"series": f"s{k % 5}", "value": "1.0"})
        theft.xreadgroup(keys.group, "intruder", {keys.input: ">"}, count=1)
        with contextlib.suppress(redis.ResponseError):  # no group yet
            theft.execute()
        return len(_resync_waits(caplog)) >= 5

    settings = settings_for(redis_url, keys, lease_ttl_ms=4000, block_ms=50)
    with WorkerThread(new_worker(settings, trained_sines)) as worker:
        worker.wait_for(intruded_often)
    waits = _resync_waits(caplog)
    assert [wait for _, wait in waits[:5]] == [0.25, 0.5, 1.0, 1.0, 1.0]  # a lease of 4 s
    # And it waits as it says: the next fall out of step comes no sooner (the log alone
    # would read the same with the wait left out).
    for (said_at, wait), (next_at, _) in itertools.pairwise(waits[:5]):
        assert next_at - said_at >= 0.9 * wait


def _resync_waits(caplog: pytest.LogCaptureFixture) -> list[tuple[float, float]]:
    """When the worker logged each wait before a re-sync that came soon after another,
    and the wait."""
    return [
        (record.created, float(m))
        for record in caplog.records
        if record.name.startswith("attnlstm")
        for m in re.findall(r"; re-syncing in ([\d.]+) s$", record.getMessage())
    ]
