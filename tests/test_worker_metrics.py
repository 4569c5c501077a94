"""The worker's metrics: the bulk histogram counts like prometheus_client's own, health
follows Redis and the heartbeat, and the HTTP server answers /metrics and /healthz."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from attnlstm.model import AttentionLSTM
from attnlstm.partition import partition_of
from attnlstm.synthetic import sine_steps
from tests.helpers import WorkerThread, drained, fill, new_worker, settings_for, wait_for
from worker.batch import Receipt
from worker.embedded import EmbeddedServer
from worker.keys import Keys
from worker.metrics import LATENCY_BUCKETS_S, BulkHistogram, Metrics, serve
from worker.online.scoring import Overall
from worker.pipeline import Pipeline

NAME = "test_latency_seconds"


def _both(values: list[np.ndarray]) -> tuple[CollectorRegistry, CollectorRegistry]:
    """The same values in a BulkHistogram (by array) and a Histogram (one by one)."""
    bulk_registry, ref_registry = CollectorRegistry(), CollectorRegistry()
    bulk = BulkHistogram(NAME, "doc", LATENCY_BUCKETS_S)
    bulk_registry.register(bulk)
    ref = Histogram(NAME, "doc", buckets=LATENCY_BUCKETS_S, registry=ref_registry)
    for batch in values:
        bulk.observe_many(batch)
        for value in batch.ravel():
            ref.observe(float(value))
    return bulk_registry, ref_registry


def _buckets(registry: CollectorRegistry) -> dict[str, float | None]:
    les = [*(str(e) for e in LATENCY_BUCKETS_S), "+Inf"]
    return {le: registry.get_sample_value(f"{NAME}_bucket", {"le": le}) for le in les}


def _assert_same(bulk: CollectorRegistry, ref: CollectorRegistry) -> None:
    assert _buckets(bulk) == _buckets(ref)
    assert None not in _buckets(bulk).values()
    assert bulk.get_sample_value(f"{NAME}_count") == ref.get_sample_value(f"{NAME}_count")
    assert bulk.get_sample_value(f"{NAME}_sum") == pytest.approx(
        ref.get_sample_value(f"{NAME}_sum"), rel=1e-12
    )


def test_bulk_histogram_counts_like_prometheus_histogram() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.lognormal(mean=-4, sigma=2, size=n) for n in (1, 0, 50, 300)]
    bulk, ref = _both(batches)
    _assert_same(bulk, ref)
    assert bulk.get_sample_value(f"{NAME}_count") == 351


def test_values_on_a_bucket_edge_fall_in_that_bucket() -> None:
    edges = np.array(LATENCY_BUCKETS_S)
    bulk, ref = _both([edges, np.array([0.0, -0.5, 10.0, 10.000001, 1e9])])
    _assert_same(bulk, ref)
    assert bulk.get_sample_value(f"{NAME}_bucket", {"le": "0.001"}) == 3  # 0, -0.5, 0.001
    assert bulk.get_sample_value(f"{NAME}_bucket", {"le": "10.0"}) == 13 + 3
    assert bulk.get_sample_value(f"{NAME}_bucket", {"le": "+Inf"}) == 13 + 5


def test_empty_bulk_histogram_is_all_zero() -> None:
    bulk, ref = _both([np.array([])])
    _assert_same(bulk, ref)
    assert bulk.get_sample_value(f"{NAME}_bucket", {"le": "+Inf"}) == 0


def test_health_needs_redis_and_a_fresh_heartbeat() -> None:
    metrics = Metrics()
    ok, body = metrics.health(stale_after_s=10)
    assert not ok  # not connected yet
    assert body["redis"] is False
    metrics.connected = True
    ok, body = metrics.health(stale_after_s=10)
    assert ok
    assert body["ok"] is True
    metrics.heartbeat = time.monotonic() - 30
    ok, body = metrics.health(stale_after_s=10)
    assert not ok
    assert isinstance(body["loop_age_s"], float)
    assert body["loop_age_s"] >= 30
    metrics.beat()
    assert metrics.health(stale_after_s=10)[0]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Metrics, str]]:
    """One server for the module (shutting one down takes half a second)."""
    metrics = Metrics()
    server: ThreadingHTTPServer = serve(metrics, port=0, stale_after_s=10)
    try:
        port = server.server_address[1]
        assert port != 0  # port 0 asked the OS for a free one
        yield metrics, f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_metrics_endpoint(served: tuple[Metrics, str]) -> None:
    metrics, base = served
    metrics.entries_read.inc(7)
    metrics.latency.observe_many(np.array([0.003, 0.004]))
    status, content_type, body = _get(base + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    text = body.decode()
    assert "attnlstm_entries_read_total 7.0" in text
    assert 'attnlstm_end_to_end_latency_seconds_bucket{le="0.005"} 2.0' in text
    # The process's own, for restarts and memory: the worker's registry had none.
    for name in ("process_start_time_seconds", "process_resident_memory_bytes"):
        assert re.search(rf"^{name} [0-9.e+]+$", text, re.M), name


def test_healthz_and_a_gauge_follow_the_connection(served: tuple[Metrics, str]) -> None:
    """The gauge too: only the log, /healthz and a lag unknown said Redis was out of reach
    (a review)."""
    metrics, base = served
    connected = "attnlstm_redis_connected"
    metrics.connected = False
    status, content_type, body = _get(base + "/healthz")
    assert (status, content_type) == (503, "application/json")
    assert json.loads(body)["redis"] is False
    assert metrics.registry.get_sample_value(connected) == 0
    metrics.connected = True
    metrics.beat()
    status, _, body = _get(base + "/healthz")
    assert status == 200
    assert json.loads(body)["ok"] is True
    assert metrics.registry.get_sample_value(connected) == 1
    metrics.cut_off()  # a Redis call failed
    assert metrics.registry.get_sample_value(connected) == 0


def test_head_and_a_query_get_what_get_does(served: tuple[Metrics, str]) -> None:
    """Some health checkers send HEAD (it was 501), or add a query (a 404); Prometheus's
    own handler takes `name[]` to pick metrics."""
    metrics, base = served
    metrics.connected = True
    metrics.beat()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"HEAD /healthz HTTP/1.0\r\n\r\n")  # the server closes after it
        answer = b"".join(iter(lambda: conn.recv(4096), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    length = re.search(rb"Content-Length: (\d+)", head)
    assert length is not None
    assert int(length[1]) > 0  # what a GET's body takes
    assert body == b""
    status, _, body = _get(base + "/healthz?probe=1")
    assert (status, json.loads(body)["ok"]) == (200, True)
    metrics.entries_read.inc(3)
    for name in ("attnlstm_entries_read_total", "attnlstm_end_to_end_latency_seconds_bucket"):
        status, _, body = _get(f"{base}/metrics?name[]={name}")
        text = body.decode().splitlines()
        types = {line.split()[2] for line in text if line.startswith("# TYPE")}
        assert (status, types) == (200, {name.removesuffix("_bucket")})


def test_unknown_path_is_404(served: tuple[Metrics, str]) -> None:
    status, _, body = _get(served[1] + "/nope")
    assert status == 404
    assert b"/metrics" in body


def test_the_endpoint_listens_on_loopback_unless_told_otherwise() -> None:
    server = serve(Metrics(), port=0, stale_after_s=10)
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()


def test_the_endpoint_serves_an_ipv6_address() -> None:
    """`metrics_host` "::1" (or "::", every address of both families) failed: "Address
    family for hostname not supported", and the worker exited."""
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError as e:
        pytest.skip(f"no IPv6 here: {e}")
    server = serve(Metrics(), host="::1", port=0, stale_after_s=10)
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as answer:
            assert b"attnlstm_entries_read_total" in answer.read()
    finally:
        server.shutdown()
        server.server_close()


def test_half_sent_requests_time_out_and_cannot_pile_up_threads() -> None:
    """300 connections that never finish their request: before, 302 threads."""
    metrics = Metrics()
    metrics.connected = True
    server = serve(metrics, port=0, stale_after_s=60, request_timeout_s=0.5, max_threads=4)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    before = threading.active_count()
    stalled = []
    try:
        for _ in range(300):
            conn = socket.create_connection(("127.0.0.1", server.server_address[1]))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
            stalled.append(conn)
        assert threading.active_count() <= before + 4
        # Each stalled request is dropped after its timeout, and the endpoint answers.
        deadline = time.monotonic() + 20
        while _status(base + "/healthz") != 200:
            assert time.monotonic() < deadline, "the endpoint never answered again"
            time.sleep(0.05)
    finally:
        for conn in stalled:
            conn.close()
        server.shutdown()
        server.server_close()


def test_a_client_trickling_its_request_is_cut_at_the_deadline() -> None:
    """Clients that send a byte of their request now and then, each within the socket's
    timeout: before, they held their threads for as long as they went on, and with every
    slot taken /healthz went unanswered (Docker's health check with it)."""
    metrics = Metrics()
    metrics.connected = True
    server = serve(metrics, port=0, stale_after_s=60, request_timeout_s=0.5, max_threads=2)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    trickling = [socket.create_connection(("127.0.0.1", server.server_address[1])) for _ in "ab"]
    done = threading.Event()

    def trickle() -> None:
        for conn in trickling:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nX-a: ")
        while not done.wait(0.1):  # a byte each 0.1 s, well within the 0.5 s per read
            for conn in trickling:
                with contextlib.suppress(OSError):
                    conn.sendall(b"a")

    dripper = threading.Thread(target=trickle, daemon=True)
    dripper.start()
    try:
        wait_for(lambda: _status(base + "/healthz") == 200, timeout=20, what="an answer")
    finally:
        done.set()
        dripper.join()
        for conn in trickling:
            conn.close()
        server.shutdown()
        server.server_close()


def test_clients_that_reconnect_as_soon_as_they_are_cut_leave_healthz_answered() -> None:
    """Eight clients that each hold a connection with a request never finished, and open
    another the moment theirs is cut (by the deadline, or by the server): before, every
    slot was taken again as soon as one came free, and a health check found none."""
    metrics = Metrics()
    metrics.connected = True
    server = serve(metrics, port=0, stale_after_s=60, request_timeout_s=2.0, max_threads=8)
    address = ("127.0.0.1", server.server_address[1])
    done, held = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError), socket.create_connection(address) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nX-a: ")
                held.release()
                conn.recv(1)  # until the server cuts it

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(8)]
    for holder in holders:
        holder.start()
    try:
        for _ in range(16):  # every slot taken, and taken again
            assert held.acquire(timeout=10)
        answers = [_status(f"http://{address[0]}:{address[1]}/healthz") for _ in range(20)]
        assert answers == [200] * 20
    finally:
        done.set()
        server.shutdown()
        server.server_close()
        for holder in holders:
            holder.join(timeout=10)


def test_a_client_that_gives_up_before_its_answer_leaves_no_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A health check's timeout (docker's, 5 s) while the worker was stopped: the answer
    went to a closed connection, and a BrokenPipeError's traceback to the worker's log."""
    metrics, closed = Metrics(), threading.Event()
    health, answered = metrics.health, threading.Event()

    def slow(stale_after_s: float) -> tuple[bool, dict[str, Any]]:
        closed.wait(timeout=30)  # the client gone by the time the answer is written
        try:
            return health(stale_after_s)
        finally:
            answered.set()

    metrics.health = slow  # type: ignore[method-assign]
    server = serve(metrics, port=0, stale_after_s=60)
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as conn:
            conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            # Reset, not a polite close: the server's writes fail at once.
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        closed.set()
        assert answered.wait(timeout=30)
        assert _get(f"http://127.0.0.1:{server.server_address[1]}/metrics")[0] == 200
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capsys.readouterr().err


def test_a_worker_cut_off_from_redis_reports_its_lag_unknown(
    trained_sines: AttentionLSTM,
) -> None:
    """A worker that has not reached Redis yet, or a standby that lost it while others
    serve its partitions, reported a lag of 0: no alert saw a worker that could serve
    nothing (a review). Its lag is NaN until Redis answers, and 0 again as a standby."""
    sample = Metrics().registry.get_sample_value
    assert math.isnan(sample("attnlstm_group_lag") or 0.0)  # not known before Redis answers
    keys = Keys()
    with EmbeddedServer() as server:
        settings = settings_for(
            server.url, keys, block_ms=100, lease_ttl_ms=1500, socket_timeout_s=1.0
        )
        first, second = (
            new_worker(settings.model_copy(update={"consumer": c}), trained_sines) for c in "ab"
        )
        lag = second.metrics.registry.get_sample_value
        assert server.pid is not None
        with WorkerThread(first) as running:
            running.wait_for(lambda: first.metrics.role == "active")
            with WorkerThread(second):
                running.wait_for(
                    lambda: second.metrics.role == "standby" and lag("attnlstm_group_lag") == 0
                )
                os.kill(server.pid, signal.SIGSTOP)  # Redis frozen: every call times out
                try:
                    running.wait_for(lambda: math.isnan(lag("attnlstm_group_lag") or 0.0))
                    assert not second.metrics.connected
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                running.wait_for(lambda: lag("attnlstm_group_lag") == 0)


def _status(url: str) -> int:
    try:
        return _get(url)[0]
    except OSError:  # hung up on: every thread busy
        return 0


def test_a_series_gauge_goes_with_its_slot() -> None:
    """Series come and go and their slots are reused: only those in the first slots
    now keep a gauge, across partitions, or the labels would grow with every name ever
    seen (a worker of short-lived series names over months)."""
    metrics = Metrics()
    nan = float("nan")

    def shown() -> dict[str, float]:
        family = next(
            f for f in metrics.registry.collect() if f.name == "attnlstm_series_rolling_mae"
        )
        return {s.labels["series"]: s.value for s in family.samples}

    metrics.series_maes([(["a", "b", None], np.array([1.0, 2.0, nan])), (["c"], np.array([3.0]))])
    assert shown() == {"a": 1.0, "b": 2.0, "c": 3.0}
    for day in range(50):  # a's slot goes to a new name each day; b has no MAE yet again
        metrics.series_maes([([f"d{day}", "b"], np.array([4.0, nan])), (["c"], np.array([5.0]))])
    assert shown() == {"d49": 4.0, "c": 5.0}


def test_the_series_gauges_are_at_most_100_whatever_the_partitions() -> None:
    """100 a partition: 409,600 labels from a worker serving 4,096 partitions."""
    metrics = Metrics()
    parts = [([f"p{k}s{j}" for j in range(60)], np.ones(60)) for k in range(3)]
    metrics.series_maes([(list(names), maes) for names, maes in parts])
    family = next(f for f in metrics.registry.collect() if f.name == "attnlstm_series_rolling_mae")
    shown = {s.labels["series"] for s in family.samples}
    assert shown == {f"p0s{j}" for j in range(60)} | {f"p1s{j}" for j in range(40)}


def test_every_label_of_a_counter_is_there_at_0_from_the_start() -> None:
    """They appeared at their first event, a jump from nothing that increase() and
    rate() do not see: the first loss of input went by any alert on it."""
    text = generate_latest(Metrics().registry).decode()
    for sample in (
        'attnlstm_dead_lettered_total{reason="value"} 0.0',
        'attnlstm_dead_lettered_total{reason="partition"} 0.0',
        'attnlstm_entries_lost_total{reason="pending"} 0.0',
        'attnlstm_entries_lost_total{reason="unread"} 0.0',
        'attnlstm_finetunes_total{outcome="promoted"} 0.0',
        'attnlstm_finetunes_total{outcome="skipped"} 0.0',
    ):
        assert sample in text.splitlines(), sample


def test_a_partition_s_lag_is_set_in_place_and_removed_when_not_served() -> None:
    """Set in place: the child a scrape reads is the same one before and after (cleared
    and filled again, a scrape between the two found the partition missing)."""
    metrics = Metrics()
    metrics.partitioned = True
    metrics.serving(2, until=time.monotonic() + 60)

    def lags() -> dict[str, float]:
        family = next(f for f in metrics.registry.collect() if f.name == "attnlstm_partition_lag")
        return {s.labels["partition"]: s.value for s in family.samples}

    metrics.served(lags={0: 1.0, 1: 2.0})
    child = metrics.partition_lag.labels("1")
    metrics.served(lags={1: 3.0}, series=4)
    assert metrics.partition_lag.labels("1") is child
    assert lags() == {"1": 3.0}
    assert metrics.registry.get_sample_value("attnlstm_group_lag") == 3.0
    metrics.standby()
    metrics.served(lags={1: 5.0}, series=4)  # counted before it was a standby: not shown
    assert lags() == {}
    assert metrics.registry.get_sample_value("attnlstm_group_lag") == 0
    assert metrics.registry.get_sample_value("attnlstm_series") == 0


def test_the_scores_come_back_when_a_lapsed_worker_serves_again() -> None:
    """A lapse made them NaN, and they stayed NaN until the next forecast met its value:
    in a quiet hour, for the hour."""
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    scores = Overall(halflife_s=30)
    scores.add(np.array([0.5, 1.5]), np.array([2.0, 2.0]), np.array([False, True]), 100.0)
    metrics.serving(1, until=time.monotonic() - 1)  # its lease's time already up
    metrics.scores_now(scores)
    assert sample("attnlstm_rolling_mae") == pytest.approx(scores.mae)
    metrics.expire()  # lapsed: a standby, no figures
    assert math.isnan(sample("attnlstm_rolling_mae") or 0.0)
    metrics.scores_now(scores)  # scored before the lapse was seen: not shown
    assert math.isnan(sample("attnlstm_rolling_mae") or 0.0)
    metrics.renewed(time.monotonic() + 60)  # its leases renewed: the last figures again
    assert sample("attnlstm_rolling_mae") == pytest.approx(scores.mae)
    assert sample("attnlstm_interval_coverage") == pytest.approx(scores.coverage)
    metrics.standby()
    metrics.serving(2, until=time.monotonic() + 60)  # partitions taken again
    assert sample("attnlstm_rolling_mae") == pytest.approx(scores.mae)


def test_a_worker_that_loses_its_lease_reports_none_of_what_it_served(
    redis_client: redis.Redis, redis_url: str, keys: Keys, trained_sines: AttentionLSTM
) -> None:
    """Its lease taken (a worker frozen past it, and the lease then another's): a
    standby, whose series and lag gauges are another worker's to report now. They used
    to stay at their last values for good: a pool's sum of lags counted them twice, and
    a lag alert went on firing from a worker that served nothing. So with its scores:
    they read NaN (no figure), as before its first; at 0, a coverage alert fired."""
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    scores = ("attnlstm_rolling_mae", "attnlstm_rolling_mae_level", "attnlstm_interval_coverage")
    assert all(math.isnan(sample(gauge) or 0.0) for gauge in scores)
    settings = settings_for(redis_url, keys, block_ms=100, lease_ttl_ms=1000)
    fill(redis_client, keys.input, sine_steps(5, 40, seed=9))
    with WorkerThread(new_worker(settings, trained_sines, metrics=metrics)) as running:
        running.wait_for(lambda: sample("attnlstm_series") == 5)
        running.wait_for(lambda: sample("attnlstm_forecasts_scored_total") == 5 * 20)
        assert 0 < (sample("attnlstm_interval_coverage") or 0.0) <= 1
        assert sample("attnlstm_step_rolling_mae", {"step": "1"}) is not None
        redis_client.set(keys.lease, "another#1")  # taken: never handed back in this test
        redis_client.incr(keys.fence)
        running.wait_for(lambda: metrics.role == "standby")
        for gauge in ("attnlstm_series", "attnlstm_group_lag", "attnlstm_partitions_served"):
            assert sample(gauge) == 0, gauge
        assert all(math.isnan(sample(gauge) or 0.0) for gauge in scores)
        assert sample("attnlstm_step_rolling_mae", {"step": "1"}) is None
        assert not [
            s
            for f in metrics.registry.collect()
            if f.name == "attnlstm_series_rolling_mae"
            for s in f.samples
        ]


def test_a_lag_redis_cannot_count_reads_nan_not_the_last_count(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An entry deleted before the group read it leaves Redis no lag to give until the
    group has read to the end: the gauge kept its last count (0, say) while a backlog
    built. The worker is let through one batch at a time meanwhile."""
    settings = settings_for(redis_url, keys, block_ms=100, max_batch=10)
    worker = new_worker(settings, trained_sines)
    assert worker.engine is not None
    forecast, permits = worker.engine.forecast, threading.Semaphore(0)

    def paced(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        permits.acquire(timeout=60)
        return forecast(windows)

    monkeypatch.setattr(worker.engine, "forecast", paced)
    sample = worker.metrics.registry.get_sample_value

    def unknown_lag() -> bool:
        permits.release()  # a batch more
        return math.isnan(sample("attnlstm_group_lag") or 0.0)

    ids = fill(redis_client, keys.input, sine_steps(5, 1000, seed=9))
    redis_client.xdel(keys.input, ids[-10])
    with WorkerThread(worker) as running:
        try:
            running.wait_for(unknown_lag)
            assert not drained(redis_client, keys)
        finally:
            permits.release(10**6)
        running.wait_for(lambda: drained(redis_client, keys))
        running.wait_for(lambda: sample("attnlstm_group_lag") == 0)


def test_an_entry_id_ahead_of_the_clock_counts_as_no_latency_not_a_negative_one() -> None:
    """A producer may choose its entry ids, ahead of the clock: its forecasts' latency
    counts as 0 s; it was negative, and took the histogram's sum down."""
    metrics = Metrics()
    now_ms = time.time() * 1000
    metrics.published(Receipt(np.array([now_ms + 60_000.0, now_ms - 500.0]), []), now_ms)
    name = "attnlstm_end_to_end_latency_seconds"
    assert metrics.registry.get_sample_value(f"{name}_count") == 2
    assert metrics.registry.get_sample_value(f"{name}_sum") == pytest.approx(0.5)


def test_a_worker_stuck_past_its_lease_reports_none_of_what_it_served(
    redis_client: redis.Redis,
    redis_url: str,
    keys: Keys,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers on two partitions; one stuck in a model call past its lease, which
    the other takes: the stuck one reports a standby, no partition served and no lag.
    It went on reporting its partition, role active, and the pool's partitions served
    added up to 3 of 2 (so too with its link to Redis cut: renewals unanswered)."""
    partitions = 2
    settings = settings_for(redis_url, keys, partitions=partitions, lease_ttl_ms=1500, block_ms=100)
    stuck, other = (
        new_worker(settings.model_copy(update={"consumer": c}), trained_sines) for c in "ab"
    )
    assert stuck.engine is not None
    forecast, gate = stuck.engine.forecast, threading.Event()

    def held_up(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(timeout=60)
        return forecast(windows)

    monkeypatch.setattr(stuck.engine, "forecast", held_up)
    sample = stuck.metrics.registry.get_sample_value

    def lags() -> list[str]:
        return [
            s.labels["partition"]
            for f in stuck.metrics.registry.collect()
            if f.name == "attnlstm_partition_lag"
            for s in f.samples
        ]

    with WorkerThread(stuck) as running, WorkerThread(other):
        try:
            running.wait_for(lambda: len(stuck.lanes) == len(other.lanes) == 1)
            (mine,) = stuck.lanes
            running.wait_for(lambda: lags() == [str(mine)])  # an audit's
            for j, row in enumerate(sine_steps(8, 25, seed=40).T):  # full windows
                part = keys.partition(partition_of(f"s{j}", partitions), partitions)
                for value in row:
                    redis_client.xadd(part.input, {"series": f"s{j}", "value": repr(float(value))})
            running.wait_for(lambda: len(other.lanes) == partitions)  # the lease lapsed
            _, body = stuck.metrics.health(stale_after_s=60)
            assert body["role"] == "standby"
            assert sample("attnlstm_partitions_served") == 0
            assert lags() == []
            # Its lag unknown, not 0: with no other worker, a lag alert cleared while a
            # backlog built.
            assert math.isnan(sample("attnlstm_group_lag") or 0.0)
        finally:
            gate.set()


def test_entries_handled_again_after_a_publish_that_did_not_apply_count_once(
    redis_client: redis.Redis,
    redis_url: str,
    stream_prefix: str,
    trained_sines: AttentionLSTM,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted as they were handled, the entries of a batch whose call never applied
    (its connection dropped) were counted again when the re-sync handled them: 55 read
    of 45, 28 warming of 19, 10 series refused where 5 were dead-lettered. The forecasts
    scored are counted with the receipt too."""
    counted = ("entries_read", "entries_warming", "series_refused", "forecasts_published",
               "forecasts_scored")  # fmt: skip
    values = sine_steps(5, 30, seed=3)

    def drain(keys: Keys, metrics: Metrics) -> dict[str, float]:
        fill(redis_client, keys.input, values)
        settings = settings_for(redis_url, keys, max_batch=10, max_series=2, block_ms=100)
        new_worker(settings, trained_sines, burst=True, metrics=metrics).run()
        sample = metrics.registry.get_sample_value
        dead = sample("attnlstm_dead_lettered_total", {"reason": "series_limit"})
        return {name: sample(f"attnlstm_{name}_total") or 0.0 for name in counted} | {
            "dead_series_limit": dead or 0.0
        }

    healthy = drain(Keys.prefixed(stream_prefix + "a:"), Metrics())
    publish, calls = Pipeline.publish, []

    def dropping(pipeline: Pipeline, batch: list[tuple[Any, Receipt]]) -> None:
        calls.append(len(batch))
        if len(calls) in (2, 5):  # two batches never sent: a connection dropped
            raise redis.ConnectionError("dropped by the test")
        publish(pipeline, batch)

    monkeypatch.setattr(Pipeline, "publish", dropping)
    dropped = drain(Keys.prefixed(stream_prefix + "b:"), Metrics())
    assert len(calls) > 5
    assert healthy["entries_read"] == values.size
    assert healthy["series_refused"] == healthy["dead_series_limit"] == 3 * 30
    assert healthy["forecasts_scored"] > 0
    assert dropped == healthy
