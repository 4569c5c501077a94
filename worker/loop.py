"""The worker's main loop: read a batch, forecast it, publish it together with its acks.

Invariant: the window state reflects the input stream, in id order, up to
``state.last_id``, and every entry up to that id has been handled (forecast or
dead-lettered, and acked). Whenever the worker is unsure of that (at start, after any
Redis error, when the group holds entries nobody is working on) it gets back in step
(:mod:`worker.recovery`): it restores the state checkpoint from Redis and re-reads the
stream from the checkpoint's id, replaying acked entries into the windows without
publishing them again, and handling the entries still pending. Publishing and acking in
one MULTI/EXEC makes "handled" and "acked" the same thing, so a crash at any point loses
nothing and repeats nothing.

Redis and the model work at the same time (:mod:`worker.pipeline`): while a batch is
forecast, the read for the next one is already out, and a batch's transaction reply is
read during the next batch. A stop handles the batch read ahead; a re-sync first reads
every reply still due.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

import numpy as np
import redis

from attnlstm.checkpoint import Checkpoint
from attnlstm.device import resolve_device
from worker.batch import batch_call, triage
from worker.contract import entry_ms
from worker.engine import Engine, check_fits
from worker.metrics import Metrics
from worker.online.scoring import Scorer
from worker.online.store import ModelStore
from worker.online.tuner import COLD_START_MODEL, Tuner
from worker.pipeline import Pipeline
from worker.recovery import Recovery
from worker.settings import Settings
from worker.state import CHUNK, NO_SLOT, WindowState
from worker.streams import Entry, OutOfStepError, id_key

log = logging.getLogger("attnlstm.worker")

AUDIT_INTERVAL_S = 2.0  # pending-entry audit, lag and per-series gauges
BURST_BLOCK_MS = 200  # in --burst mode, an empty read this long means drained


class Worker:
    def __init__(
        self,
        client: redis.Redis,
        *,
        engine: Engine | None,
        settings: Settings,
        metrics: Metrics | None = None,
        burst: bool = False,
        finetune_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``engine`` None: no model yet; the worker keeps values and trains a first one
        (a cold start) once it has enough. ``burst``: stop once the stream is drained.
        ``finetune_clock`` times the fine-tune schedule (tests move it by hand)."""
        self.settings, self.keys = settings, settings.keys
        self.metrics = metrics or Metrics()
        self.burst = burst
        self._block_ms = min(settings.block_ms, BURST_BLOCK_MS) if burst else settings.block_ms
        self.engine = engine
        config = engine.checkpoint.config if engine is not None else COLD_START_MODEL
        self.window, self.horizon = config.window, config.horizon
        self.state = self._empty_state()
        self.scorer = Scorer(halflife_s=settings.mae_halflife_s)
        store = ModelStore(
            client,
            self.keys,
            keep=settings.keep_models,
            source=settings.consumer,
            key=settings.model_key(),
        )
        self.tuner = Tuner(
            client, settings=settings, store=store, metrics=self.metrics, clock=finetune_clock
        )
        self.recovery = Recovery(client, settings=settings, metrics=self.metrics)
        self.pipeline = Pipeline(
            client,
            settings=settings,
            events_query=self.tuner.events_query,
            on_applied=self.metrics.published,
        )
        self._series_ids: dict[bytes, str] = {}  # series ids already validated
        self._in_step = False  # the windows match the group (see the module docstring)
        self._stopping = False
        self._next_audit = 0.0
        self._started = time.monotonic()

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the batch in flight and exit (a signal handler)."""
        # The flag first: a second signal can land while the first one is logging.
        first, self._stopping = not self._stopping, True
        if first:
            log.info("stopping: finishing the batch in flight")

    def run(self) -> dict[str, float]:
        """Batches until stopped, or in burst mode until the stream is drained; then
        the counts of this run."""
        delay = 0.0
        while not self._stopping:
            try:
                if not self._in_step:
                    self._in_step = self._get_in_step()
                elif self._handle_next_batch() and self.burst:
                    log.info("stream drained (--burst)")
                    break
                self.metrics.connected = True
                delay = 0.0
            except OutOfStepError as e:
                log.warning("%s; re-syncing", e)
                self._in_step = False
            except redis.exceptions.NoPermissionError as e:
                # An ACL that lacks a right: retrying cannot help, and a worker that
                # retries forever looks hung. Exit with what to fix.
                self._in_step = False
                self._close(save=False)
                raise ValueError(
                    f"Redis refused this worker's user a command ({e}); give the user the "
                    "rights deploy/users.acl.template grants the worker user"
                ) from None
            except redis.RedisError as e:
                self._in_step = False
                self.metrics.connected = False
                self.metrics.redis_errors.inc()
                delay = min(max(2 * delay, 0.2), 5.0)
                log.warning("Redis: %s; retrying in %.1f s", _describe(e), delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
        self._close(save=self._in_step and self._finish())
        return self.metrics.totals(time.monotonic() - self._started)

    def _handle_next_batch(self) -> bool:
        """Read one batch, forecast it, publish it. True when the stream had nothing new."""
        self._housekeeping()
        read = self.pipeline.next_batch(self.state.last_id, block_ms=self._block_ms)
        self.metrics.beat()
        self._serve(self.tuner.sync(read.events))
        if read.entries:
            if not self._stopping and time.monotonic() < self._next_audit:
                # Redis answers the next read while this batch is forecast. Not when the
                # audit is due: it must find nothing pending.
                self.pipeline.read_ahead(read.entries[-1][0])
            self.metrics.batch_read(len(read.entries))
            self.recovery.delivered(len(read.entries))
            self._handle(read.entries, pending=None)
        self._serve(self.tuner.tick(self.state, self.scorer))
        return not read.entries

    def _housekeeping(self) -> None:
        """The lease, and the audit of what is pending, each on its timer."""
        self.recovery.renew_lease()
        now = time.monotonic()
        if now < self._next_audit or self.pipeline.holds_next:
            return
        self.pipeline.drain()  # the audit must not find the last batch's entries pending
        self._next_audit = now + AUDIT_INTERVAL_S
        self.metrics.series_maes(self.state.names(), self.scorer.series_mae)
        self.scorer.forget(self.state.sweep(self.state.newest_ms()))
        self.recovery.audit()

    def _handle(self, entries: list[Entry], *, pending: dict[bytes, int] | None) -> None:
        """Validate, update the windows, forecast; publish with the acks, in one call.

        ``pending`` is None for a live read (every entry is new to us). While re-syncing
        it maps the entries still pending to their handling attempts so far; the others were
        acked before and are only replayed into the windows.
        """
        if len(self._series_ids) > 2 * self.settings.max_series:  # bounded, like the windows
            self._series_ids.clear()
        batch = triage(
            entries,
            pending=pending,
            series_ids=self._series_ids,
            last_id=self.state.last_id,
            max_attempts=self.settings.max_attempts,
        )
        slots = self.state.slots_for(batch.names)
        self.metrics.series.set(self.state.series_count)
        publish = np.asarray(batch.publish, dtype=bool)
        refused = np.flatnonzero((slots == NO_SLOT) & publish)
        self.metrics.series_refused.inc(refused.size)
        batch.reject(refused, f"series limit reached (max_series={self.state.max_series})")
        # After a restore, entries the saved windows already hold are only acked.
        kept = (slots != NO_SLOT) & ~self.state.holds(slots, batch.ids)
        values = np.asarray(batch.values, dtype=np.float64)[kept]
        ms = np.fromiter(map(entry_ms, batch.ids), np.int64, len(batch.ids))[kept]
        wanted = publish[kept]  # of the kept entries, those to forecast once full
        gather = self.engine is not None and bool(wanted.any())
        full, windows = self.state.push(slots[kept], values, ms=ms, gather=gather)
        forecast = full & wanted if gather else np.zeros_like(wanted)
        yhat, attn = self._forecast(windows[wanted[full]] if gather else windows[:0])
        one_step = np.full(forecast.size, np.nan)
        one_step[forecast] = yhat[:, 0]
        scored = self.scorer.update(slots[kept], values, one_step, time.monotonic())
        self.metrics.scored_forecasts(scored, self.scorer)
        self.metrics.warming.inc(int((~forecast & wanted).sum()))
        if id_key(entries[-1][0]) > id_key(self.state.last_id):
            self.state.last_id = entries[-1][0]
        version = self.engine.version.encode() if self.engine is not None else b""
        rows = np.flatnonzero(kept)[forecast]  # batch positions forecast
        # Pieces of the window checkpoint, when due (worker.state): one, or more with a
        # large batch, so that the checkpoint's work follows the batch's own.
        now, state = time.monotonic(), dict[bytes, bytes]()
        for _ in range(1 + len(entries) // (2 * CHUNK)):
            if (due := self.state.due_chunk(now, self.settings.checkpoint_interval_s)) is None:
                break
            state |= self.state.save_chunk(due, now)
        if state:
            self.metrics.checkpointed(time.monotonic() - now)
        fence, maxlen = self.recovery.fence, self.settings.output_maxlen
        call, receipt = batch_call(
            batch,
            rows,
            yhat,
            attn,
            fence,
            maxlen=maxlen,
            version=version,
            state=state or None,
            handled=self.state.last_id,
        )
        self.pipeline.publish(call, receipt)

    def _forecast(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.engine is None or windows.shape[0] == 0:
            return np.empty((0, self.horizon)), np.empty((0, self.window))
        started = time.perf_counter()
        yhat, attn = self.engine.forecast(windows)
        self.metrics.inference.observe(time.perf_counter() - started)
        return yhat, attn

    def _serve(self, checkpoint: Checkpoint | None) -> None:
        """Forecast with ``checkpoint`` from the next batch on (None: no change)."""
        if checkpoint is None:
            return
        try:
            check_fits(checkpoint, window=self.window, horizon=self.horizon)
        except ValueError as e:
            log.error("%s: not served", e)
            return
        if self.engine is None:
            device = resolve_device(self.settings.device)
            self.engine = Engine(checkpoint, device=device, max_batch=self.settings.max_batch)
            log.info("forecasting with model %s on %s", checkpoint.version, device)
        else:
            self.engine.swap(checkpoint)
        self.metrics.model_version(checkpoint.version)

    def _get_in_step(self) -> bool:
        """Take the lease, restore the windows, re-sync with the group (see
        :mod:`worker.recovery`). False while another worker holds the lease."""
        self.pipeline.reset()
        self.tuner.store.check_key()
        if not self.recovery.take_lease():
            self._sleep(min(self.settings.lease_ttl_ms / 4000, 1.0))
            return False
        self.recovery.ensure_group()
        try:
            self._serve(self.tuner.start(self.engine.checkpoint if self.engine else None))
        except ValueError:  # no model, and none to come: the lease is not ours to keep
            self.recovery.lease.release()
            raise
        self.state = self.recovery.restore(self._empty_state())
        self.recovery.resync(self.state, self._handle_at_once)
        self.state.reread_done()
        self.metrics.role = "active"
        self.metrics.recoveries.inc()
        return True

    def _handle_at_once(self, entries: list[Entry], pending: dict[bytes, int]) -> None:
        self._handle(entries, pending=pending)
        self.pipeline.drain()

    def _empty_state(self) -> WindowState:
        length = max(self.settings.history_len, self.window)
        return WindowState(
            window=self.window,
            length=length,
            max_series=self.settings.max_series,
            idle_ms=int(self.settings.series_idle_s * 1000),
        )

    def _finish(self) -> bool:
        """At a stop, in step: handle the entries read ahead, and read the last reply
        (the state saved is true only once its last batch is applied). True when the
        windows are still in step with the group."""
        try:
            if self.pipeline.holds_next:
                self._handle_next_batch()
            self.pipeline.drain()
            self.recovery.account_unread()
        except (OutOfStepError, redis.RedisError) as e:
            log.warning("%s; what is left is handled at the next start", e)
            return False
        return True

    def _close(self, *, save: bool) -> None:
        self.pipeline.close()
        self.tuner.close()
        if save:
            self.recovery.save(self.state)
        else:
            log.info("stopped (not in step with Redis; the last checkpoint stands)")

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def _describe(e: redis.RedisError) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if isinstance(e, redis.ConnectionError) else text
