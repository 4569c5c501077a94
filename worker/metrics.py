"""Prometheus metrics and the health endpoint, on one small HTTP server.

Per-entry figures (end-to-end latency) arrive a batch at a time, so their histogram
is counted with numpy and exposed through a custom collector rather than with one
``observe`` call (and one lock) per entry.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from worker.batch import Receipt
from worker.contract import DEAD_KINDS, reason_kind
from worker.online.scoring import STEP_SERIES, Overall

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
SERIES_GAUGES = 100  # series with a rolling-MAE gauge of their own: bounded cardinality
LOST_REASONS = ("pending", "unread")  # attnlstm_entries_lost's labels
FINETUNE_OUTCOMES = ("promoted", "rejected", "failed", "skipped")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class BulkHistogram(Collector):
    """A histogram fed whole arrays at a time."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self._edges = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every edge
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        # le semantics: a value equal to an edge falls in that edge's bucket.
        counts = np.bincount(np.searchsorted(self._edges, values), minlength=self._counts.size)
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        buckets = [
            (repr(float(e)), float(c)) for e, c in zip(self._edges, cumulative, strict=False)
        ]
        buckets.append(("+Inf", float(cumulative[-1])))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], buckets, total)
        yield family

    def describe(self) -> Iterator[HistogramMetricFamily]:
        """Its names, without values: the registry knows them from this, so that
        ``/metrics?name[]=...`` can pick them (without it, nothing picked it)."""
        yield HistogramMetricFamily(self.name, self.documentation)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        # The process's own, as the default registry has them: its start (restarts), CPU
        # time, resident memory and open files (Linux; nothing elsewhere).
        ProcessCollector(registry=r)
        counter, gauge = partial(Counter, registry=r), partial(Gauge, registry=r)
        # What the worker did:
        self.entries_read = counter("attnlstm_entries_read", "Input entries read from the stream")
        self.forecasts = counter("attnlstm_forecasts_published", "Forecast entries published")
        self.dead = counter("attnlstm_dead_lettered", "Entries sent to the dead stream", ["reason"])
        self.lost = counter(
            "attnlstm_entries_lost",
            "Input entries removed from the stream (trimmed or deleted) before the worker "
            "handled them: while pending on it, or unread",
            ["reason"],
        )
        self.rollbacks = counter(
            "attnlstm_redis_rollbacks",
            "Partitions whose group a re-sync found behind what this worker had read, once "
            "each time: Redis lost writes it had acknowledged (a failover to a replica "
            "behind, a restart that lost data), or the group was set back",
        )
        self.groups_recreated = counter(
            "attnlstm_groups_recreated",
            "Consumer groups this worker found gone and created again from the start of "
            "the stream: Redis restarted without its data, or the stream or group was "
            "deleted",
        )
        self.warming = counter(
            "attnlstm_entries_warming",
            "Valid entries kept but not forecast: their series' window is not full yet, or "
            "no model serves yet (a cold start)",
        )
        self.recoveries = counter(
            "attnlstm_recoveries", "Restores of the window state and re-syncs"
        )
        self.redis_errors = counter("attnlstm_redis_errors", "Redis errors the worker waited out")
        gauge(
            "attnlstm_redis_connected",
            "1 while the worker's last Redis call succeeded; 0 from a failed one (or the "
            "start) until Redis answers, as /healthz's redis: only the log and a lag unknown "
            "said so",
        ).set_function(lambda: float(self.connected))
        # How fast:
        self.batch_size = Histogram(
            "attnlstm_batch_size", "Entries per batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "attnlstm_inference_seconds",
            "Model time per model call: one a batch, one more for the forecasts made "
            "again after anomalies are stood in for",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.latency = BulkHistogram(
            "attnlstm_end_to_end_latency_seconds",
            "Forecast publish time minus the input entry's time (its id)",
            LATENCY_BUCKETS_S,
        )
        r.register(self.latency)
        self.checkpoint = Histogram(
            "attnlstm_checkpoint_seconds",
            "Main-loop time to serialise the pieces (chunks) of the window checkpoint that a "
            "batch carries",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.checkpoint_longest_s = 0.0  # the longest of them (the bench reports it)
        self.lag = gauge("attnlstm_group_lag", "Input entries not yet delivered to the group")
        self.lag.set(math.nan)  # not known until Redis answers (at 0, no alert saw a start
        # that never reached Redis)
        self.partitions = gauge(
            "attnlstm_partitions_served", "Partitions of the input this worker serves"
        )
        self.partition_count = gauge(
            "attnlstm_partitions",
            "P: the partitions the input is written in (a pool's served partitions add up to it)",
        )
        self.partition_lag = gauge(
            "attnlstm_partition_lag",
            "Input entries not yet delivered to the group, per partition this worker serves "
            "(with more than one partition)",
            ["partition"],
        )
        self.series = gauge("attnlstm_series", "Series with a window slot")
        self.unpartitioned = gauge(
            "attnlstm_unpartitioned_entries",
            "Entries in the unpartitioned input stream, which no worker reads while the "
            "input is partitioned (a producer that ignores P wrote them)",
        )
        self.series_refused = counter(
            "attnlstm_series_refused",
            "Entries of new series dead-lettered because max_series series hold slots",
        )
        # How well, and with which model:
        self.scored = counter(
            "attnlstm_forecasts_scored",
            "One-step forecasts whose actual value has arrived and been scored",
        )
        self.rolling_mae = gauge("attnlstm_rolling_mae", "Rolling one-step MAE over every series")
        self.rolling_naive_mae = gauge(
            "attnlstm_rolling_naive_mae", "The same for the naive forecast (the last value)"
        )
        self.mae_level = gauge(
            "attnlstm_rolling_mae_level",
            "The rolling MAE's slow average: drift is the rolling MAE far above it",
        )
        self.coverage = gauge(
            "attnlstm_interval_coverage",
            "Rolling share of values inside their one-step forecast's interval (the target "
            "is attnlstm_interval_coverage_target)",
        )
        self.coverage_target = gauge(
            "attnlstm_interval_coverage_target",
            "The coverage setting: the share of values the intervals are for (0: none)",
        )
        self.step_mae = gauge(
            "attnlstm_step_rolling_mae",
            f"Rolling MAE at each step ahead, over the first {STEP_SERIES} series of each "
            "partition",
            ["step"],
        )
        self.step_coverage = gauge(
            "attnlstm_step_interval_coverage",
            "Rolling share of values inside their interval at each step ahead, the same series",
            ["step"],
        )
        self.anomalies = counter(
            "attnlstm_anomalies", "Values far outside their interval, published to `anomalies`"
        )
        self.series_mae = gauge(
            "attnlstm_series_rolling_mae",
            f"Rolling one-step MAE of each of the first {SERIES_GAUGES} series of the "
            "partitions served (by partition, then slot)",
            ["series"],
        )
        self._series_shown: set[str] = set()  # the series with a gauge of their own
        self.finetunes = counter(
            "attnlstm_finetunes",
            "Fine-tunes finished, by outcome (promoted, rejected, failed, skipped)",
            ["outcome"],
        )
        self.finetune_interval = gauge(
            "attnlstm_finetune_interval_seconds",
            "The fine-tunes' schedule, finetune_interval_s (0: fine-tuning off)",
        )
        self.finetune_ended = gauge(
            "attnlstm_finetune_last_end_timestamp_seconds",
            "When this worker's last fine-tune ended, whatever its outcome (Unix time; its "
            "start, until one has): fine-tuning that stalls shows only in the log otherwise",
        )
        self.finetune_ended.set_to_current_time()
        self.finetune_waiting = gauge(
            "attnlstm_finetune_waiting_for_input",
            "1 while this worker's next fine-tune, due, waits for a value to be scored (none "
            "was since the last one began, or since the start with no series long enough): "
            "no stall, however long no fine-tune ends",
        )
        self.model = gauge(
            "attnlstm_model", "1 for the model version this worker serves", ["version"]
        )
        # Each label a counter can have, at 0 from the start: a counter that appears only
        # at its first event is no increase() for an alert to see.
        for kind in DEAD_KINDS:
            self.dead.labels(kind)
        for reason in LOST_REASONS:
            self.lost.labels(reason)
        for outcome in FINETUNE_OUTCOMES:
            self.finetunes.labels(outcome)
        self._partitions_shown: set[str] = set()  # the partitions with a lag of their own
        self.partitioned = False  # whether the input is (each partition's lag shown)
        self._scores: Overall | None = None  # the last, shown while serving
        self._unscored()
        self.heartbeat = time.monotonic()  # the main loop's last turn
        self.connected = False  # whether the last Redis call succeeded
        self.role = "starting"  # starting, active, or standby (another worker holds the lease)
        # Until when the leases of the partitions served hold, unless renewed (monotonic);
        # how many those are, and whether they seemed to lapse (expire()).
        self._held_until, self._held, self._lapsed = -math.inf, 0, False
        # The role and the gauges of what it serves, which a scrape's expire() (the HTTP
        # server's threads) and the main loop both change.
        self._owning = threading.RLock()
        self.version: str | None = None  # the model served
        # Why no model will ever serve here, until an operator acts (None: one does, or
        # one will: a cold start).
        self.no_model: str | None = None

    def checkpointed(self, seconds: float) -> None:
        self.checkpoint.observe(seconds)
        self.checkpoint_longest_s = max(self.checkpoint_longest_s, seconds)

    def published(self, receipt: Receipt, sent_ms: float) -> None:
        """A batch's transaction is applied; it went out at ``sent_ms`` (epoch ms)."""
        self.entries_read.inc(receipt.read)
        self.warming.inc(receipt.warming)
        self.series_refused.inc(receipt.refused)
        self.scored.inc(receipt.scored)
        self.forecasts.inc(receipt.entered_ms.size)
        self.anomalies.inc(receipt.anomalies)
        for reason in receipt.dead_reasons:
            self.dead.labels(reason_kind(reason)).inc()
        # An entry id a producer chose ahead of the clock would give a negative latency,
        # taking the sum down: none is counted below 0.
        self.latency.observe_many(np.maximum(sent_ms - receipt.entered_ms, 0.0) / 1000)

    def scores_now(self, scores: Overall) -> None:
        """The averages after forecasts met their actual value, shown unless a standby
        (a scrape's expire() may have made it one since they were scored). How many
        were scored is counted with the batch's receipt, once its call applies."""
        with self._owning:
            self._scores = scores
            if self.role != "standby":
                self._show_scores()

    def _show_scores(self) -> None:
        """The scoring gauges from the last scores; shown again when a worker serves
        again (its leases renewed after a lapse, a re-sync), where they read NaN until
        the next forecast met its value, in a quiet hour none."""
        scores = self._scores
        if scores is None:
            return
        self.rolling_mae.set(scores.mae)
        self.rolling_naive_mae.set(scores.naive_mae)
        self.mae_level.set(scores.level)
        if not math.isnan(scores.coverage):
            self.coverage.set(scores.coverage)
        for step, (mae, inside) in enumerate(
            zip(scores.step_mae, scores.step_coverage, strict=True), start=1
        ):
            if not math.isnan(mae):
                self.step_mae.labels(str(step)).set(mae)
            if not math.isnan(inside):
                self.step_coverage.labels(str(step)).set(inside)

    def series_maes(self, partitions: list[tuple[list[str | None], np.ndarray]]) -> None:
        """The rolling MAE of the first :data:`SERIES_GAUGES` series with one, partition
        by partition, slot by slot (``names`` and ``maes`` by slot; None: a free slot,
        NaN: none yet): at most that many labels, whatever the partitions (100 a
        partition grew to 409,600 at P = 4,096). A series no longer among them (its slot
        freed when it went idle, or its partition given back) loses its gauge: slots are
        reused, and the labels would grow with every name ever seen. Not on a standby:
        what it served is another worker's to report."""
        with self._owning:
            if self.role != "standby":
                self._series_maes(partitions)

    def _series_maes(self, partitions: list[tuple[list[str | None], np.ndarray]]) -> None:
        shown: set[str] = set()
        for names, maes in partitions:
            for at in np.flatnonzero(np.isfinite(maes[: len(names)])):
                if len(shown) == SERIES_GAUGES:
                    break
                if (name := names[at]) is not None:
                    self.series_mae.labels(name).set(maes[at])
                    shown.add(name)
        for gone in self._series_shown - shown:
            self.series_mae.remove(gone)
        self._series_shown = shown

    def served(self, *, series: int | None = None, lags: dict[int, float] | None = None) -> None:
        """What this worker serves now: its series with a slot, and each partition's
        lag (NaN: Redis cannot count it, or not audited yet), their sum the group's lag.
        Not on a standby (a scrape's expire() may have made it one since these were
        counted): they are another worker's to report. Each partition's is set in
        place, not cleared and filled again: a scrape between the two found partitions
        missing (27 scrapes in 24,231, two partitions, a Redis round trip between)."""
        with self._owning:
            if self.role == "standby":
                return
            if series is not None:
                self.series.set(series)
            if lags is not None:
                self._partition_lags(lags if self.partitioned else {})
                self.lag.set(sum(lags.values()))

    def _partition_lags(self, lags: dict[int, float]) -> None:
        shown = {str(k) for k in lags}
        for k, lag in lags.items():
            self.partition_lag.labels(str(k)).set(lag)
        for gone in self._partitions_shown - shown:
            self.partition_lag.remove(gone)
        self._partitions_shown = shown

    def serving(self, partitions: int, *, until: float) -> None:
        """Active, serving ``partitions`` whose leases hold until ``until``
        (time.monotonic()) at least, unless renewed (or later: renewed since)."""
        with self._owning:
            if partitions and self.role != "active":
                self._show_scores()
            self.role, self._held, self._lapsed = "active", partitions, False
            self.partitions.set(partitions)
            self._held_until = max(self._held_until, until)

    def renewed(self, until: float) -> None:
        """The leases renewed: held until ``until`` at least; active again if they
        seemed to lapse."""
        with self._owning:
            self._held_until = until
            if self._lapsed:
                self.role, self._lapsed = "active", False
                self.partitions.set(self._held)
                self._show_scores()

    def cut_off(self) -> None:
        """The last Redis call failed: the lag is not known until Redis answers again, on
        a standby too (it went on reporting 0, and a worker that no longer reached Redis,
        whose partitions others served, was seen by no alert)."""
        with self._owning:
            self.connected = False
            self.lag.set(math.nan)
            for k in self._partitions_shown:
                self.partition_lag.labels(k).set(math.nan)

    def expire(self) -> None:
        """A standby once its leases may have lapsed unrenewed (a worker cut off from
        Redis, or stuck): another worker may serve its partitions now. Each scrape and
        health check asks first; a worker cut off went on reporting them, and a pool's
        partitions served added up to more than P."""
        with self._owning:
            if self.role == "active" and time.monotonic() > self._held_until:
                self._standby()
                self.lag.set(math.nan)  # not 0: a lag alert cleared while a backlog built
                self._lapsed = True

    def standby(self) -> None:
        """Serving no partition: the gauges of what it served are cleared, for the
        worker that serves it now reports them (kept, a pool's sum of lags counted them
        twice, and a lag alert went on firing from a worker that served nothing)."""
        with self._owning:
            self._standby()
            self._lapsed = False

    def _standby(self) -> None:
        self.role = "standby"
        self.partitions.set(0)
        self.lag.set(0)
        self.series.set(0)
        self._partition_lags({})
        self._series_maes([])
        self._unscored()

    def _unscored(self) -> None:
        """The scoring gauges read NaN (no figure) where nothing is scored here: before
        the first forecast meets its value, and on a standby. At 0 they said every
        forecast was exact and none inside its interval, and a standby's coverage alert
        fired for as long as it waited."""
        for averaged in (self.rolling_mae, self.rolling_naive_mae, self.mae_level, self.coverage):
            averaged.set(math.nan)
        self.step_mae.clear()
        self.step_coverage.clear()

    def totals(self, seconds: float) -> dict[str, float]:
        """This worker's counts since it started, over ``seconds``: its exit report."""
        sums: dict[str, float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
        read = int(sums["attnlstm_entries_read_total"])
        return {
            "read": read,
            "forecasts": int(sums["attnlstm_forecasts_published_total"]),
            "dead": int(sums.get("attnlstm_dead_lettered_total", 0)),
            "anomalies": int(sums.get("attnlstm_anomalies_total", 0)),
            "lost": int(sums.get("attnlstm_entries_lost_total", 0)),
            "warming": int(sums["attnlstm_entries_warming_total"]),
            "batches": int(sums["attnlstm_batch_size_count"]),
            "recoveries": int(sums["attnlstm_recoveries_total"]),
            "seconds": round(seconds, 3),
            "entries_per_s": round(read / seconds, 1) if seconds > 0 else 0.0,
        }

    def model_version(self, version: str) -> None:
        self.model.clear()
        self.model.labels(version).set(1)
        self.version = version

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def health(self, stale_after_s: float) -> tuple[bool, dict[str, object]]:
        self.expire()
        age = time.monotonic() - self.heartbeat
        ok = self.connected and age <= stale_after_s and self.no_model is None
        body = {
            "ok": ok,
            "role": self.role,
            "redis": self.connected,
            "loop_age_s": round(age, 3),
            "model": self.version,
        }
        if self.no_model is not None:
            body["no_model"] = self.no_model
        return ok, body


def serve(
    metrics: Metrics,
    *,
    port: int,
    stale_after_s: float,
    host: str = "127.0.0.1",
    request_timeout_s: float = 5.0,
    max_threads: int = 8,
) -> ThreadingHTTPServer:
    """``/metrics`` and ``/healthz`` on host:port, in a daemon thread. A connection has
    ``request_timeout_s`` in all (its request and the answer), and at most
    ``max_threads`` are served at once (past them, a new connection takes the slot of the
    oldest one still sending its request, or is hung up on), so slow or many clients
    cannot pile up threads, nor hold the slots."""

    class Handler(BaseHTTPRequestHandler):
        timeout = request_timeout_s  # the socket's, for each read; the server's, in all

        def finish(self) -> None:
            with contextlib.suppress(OSError):  # a connection cut at its deadline
                super().finish()

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:  # what some health checkers send: 501 before
            self._answer(with_body=False)

        def _answer(self, *, with_body: bool) -> None:
            cast(_BoundedServer, self.server).answering(self.request)
            url = urlsplit(self.path)  # a query was a 404; /metrics?name[]=... filters
            if url.path == "/metrics":
                metrics.expire()
                names = parse_qs(url.query).get("name[]")
                registry = metrics.registry.restricted_registry(names) if names else None
                text = generate_latest(registry or metrics.registry)
                self._send(200, CONTENT_TYPE_LATEST, text, with_body)
            elif url.path == "/healthz":
                ok, body = metrics.health(stale_after_s)
                answer = json.dumps(body).encode()
                self._send(200 if ok else 503, "application/json", answer, with_body)
            else:
                self._send(404, "text/plain", b"try /metrics or /healthz\n", with_body)

        def _send(self, status: int, content_type: str, body: bytes, with_body: bool) -> None:
            # A client that gave up (a health check's timeout while the worker was
            # stopped) is no error: it put a traceback in the worker's log.
            with contextlib.suppress(OSError):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
            pass

    server = _BoundedServer(
        (host, port), Handler, max_threads=max_threads, timeout_s=request_timeout_s
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


class _BoundedServer(ThreadingHTTPServer):
    """A thread per request, up to a bound. Each connection is cut ``timeout_s`` after
    it was accepted: the socket's timeout bounds each read, not the request, and a client
    sending a byte every few seconds kept its thread for as long as it liked (eight such
    took every slot, /healthz's too). With every slot taken, a new connection takes the
    slot of the oldest one still sending its request (one that is being answered keeps
    its own), or is closed when there is none: clients that reconnect as soon as they
    are cut, and never finish a request, no longer keep /healthz unanswered."""

    daemon_threads = True
    request_queue_size = 128  # connections waiting to be accepted (and hung up on)

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_threads: int,
        timeout_s: float,
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_threads)
        self._timeout_s = timeout_s
        self._deadlines: dict[socket.socket, float] = {}  # in the order accepted
        self._reading: set[socket.socket] = set()  # whose request has not come whole
        self._guard = threading.Lock()
        self._closing = threading.Event()  # before the bind, whose failure closes it
        # The host's own family: ThreadingHTTPServer's is IPv4 alone, and "::" or "::1"
        # failed with "Address family for hostname not supported".
        self.address_family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM)[0][0]
        super().__init__(address, handler)
        threading.Thread(target=self._cut_overdue, name="metrics-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False) and not self._evict_a_reader():
            self.shutdown_request(request)
            return
        with self._guard:
            self._deadlines[request] = time.monotonic() + self._timeout_s
            self._reading.add(request)
        super().process_request(request, client_address)

    def _evict_a_reader(self) -> bool:
        """Cut the oldest connection still sending its request, and take its slot once
        its thread has let go of it (at once: its read fails)."""
        with self._guard:
            oldest = next((r for r in self._deadlines if r in self._reading), None)
        if oldest is None:
            return False
        with contextlib.suppress(OSError):
            oldest.shutdown(socket.SHUT_RDWR)
        return self._slots.acquire(timeout=self._timeout_s)

    def answering(self, request: socket.socket) -> None:
        """``request`` came whole: its connection keeps its slot until answered."""
        with self._guard:
            self._reading.discard(request)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._guard:
                self._deadlines.pop(request, None)
                self._reading.discard(request)
            self._slots.release()

    def _cut_overdue(self) -> None:
        while not self._closing.wait(min(self._timeout_s / 4, 0.25)):
            now = time.monotonic()
            with self._guard:
                overdue = [r for r, due in self._deadlines.items() if due <= now]
            for request in overdue:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
