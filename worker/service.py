"""The worker's main loop: read a batch, forecast it, publish it together with its acks.

Invariant: the window state reflects the input stream, in id order, up to
``state.last_id``, and every entry up to that id has been handled (forecast or
dead-lettered, and acked). Whenever the worker is unsure of that (at start, after any
Redis error, when the group holds entries nobody is working on) it restores the state
checkpoint from Redis and re-syncs: it re-reads the stream from the checkpoint's id,
replaying acked entries into the windows without publishing them again, and handles
the entries still pending. Publishing and acking in one MULTI/EXEC makes "handled"
and "acked" the same thing, so a crash at any point loses nothing and repeats nothing.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import cast

import numpy as np
import redis

from attnlstm.checkpoint import Checkpoint
from attnlstm.device import resolve_device
from attnlstm.model import ModelConfig
from worker.batcher import BatchWindow
from worker.contract import (
    Fields,
    dead_fields,
    entry_ms,
    forecast_fields,
    fraction_rows,
    json_rows,
    parse,
    reason_kind,
)
from worker.engine import Engine
from worker.metrics import SERIES_GAUGES, Metrics
from worker.models import ModelStore
from worker.scoring import Scorer
from worker.settings import Settings
from worker.state import NO_SLOT, StateError, WindowState
from worker.streams import (
    Command,
    Entry,
    Lease,
    ensure_group,
    entries_of,
    group_info,
    id_key,
    pending_deliveries,
    stream_range,
    transaction,
)
from worker.tuner import Tuner

log = logging.getLogger("attnlstm.worker")

AUDIT_INTERVAL_S = 2.0  # pending-entry audit and lag gauge
BURST_BLOCK_MS = 200  # in --burst mode, an empty read this long means drained


@dataclass
class Totals:
    read: int = 0
    forecasts: int = 0
    dead: int = 0
    warming: int = 0
    batches: int = 0
    recoveries: int = 0
    started: float = field(default_factory=time.monotonic)

    def report(self) -> dict[str, float]:
        out: dict[str, float] = {k: v for k, v in asdict(self).items() if k != "started"}
        seconds = time.monotonic() - self.started
        out["seconds"] = round(seconds, 3)
        out["entries_per_s"] = round(self.read / seconds, 1) if seconds > 0 else 0.0
        return out


@dataclass
class _Batch:
    """One read's entries, sorted out: what to ack, dead-letter, and forecast."""

    acks: list[bytes] = field(default_factory=list)
    dead: list[tuple[bytes, Fields, str]] = field(default_factory=list)
    ids: list[bytes] = field(default_factory=list)
    fields: list[Fields] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    publish: list[bool] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        client: redis.Redis,
        *,
        engine: Engine | None,
        settings: Settings,
        metrics: Metrics | None = None,
        burst: bool = False,
    ) -> None:
        """``engine`` None: no model yet; the worker keeps values and trains a first one
        (a cold start) once it has enough."""
        self.client = client
        self.engine = engine
        config = engine.checkpoint.config if engine is not None else ModelConfig()
        self.window, self.horizon = config.window, config.horizon
        self.settings = settings
        self.keys = settings.keys
        self.metrics = metrics or Metrics()
        self.burst = burst
        self.totals = Totals()
        self.state = self._empty_state()
        self.scorer = Scorer(halflife_s=settings.mae_halflife_s)
        store = ModelStore(client, self.keys, keep=settings.keep_models, source=settings.consumer)
        self.tuner = Tuner(client, settings=settings, store=store, metrics=self.metrics)
        self.lease = Lease(
            client, key=self.keys.lease, owner=settings.consumer, ttl_ms=settings.lease_ttl_ms
        )
        self._known: dict[bytes, str] = {}  # series ids already validated
        self._ready = False  # state restored and in step with the group
        self._stopping = False
        self._had_group = False
        self._waiting_for: str | None = None
        self._next_checkpoint = 0.0
        self._next_lease = 0.0
        self._next_audit = 0.0

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the batch in flight and exit (a signal handler)."""
        # The flag first: a second signal can land while the first one is logging.
        first, self._stopping = not self._stopping, True
        if first:
            log.info("stopping: finishing the batch in flight")

    def run(self) -> dict[str, float]:
        delay = 0.0
        while not self._stopping:
            try:
                if not self._ready:
                    self._start()
                    continue
                drained = self._turn()
                self.metrics.connected = True
                delay = 0.0
                if drained and self.burst:
                    log.info("stream drained (--burst)")
                    break
            except redis.RedisError as e:
                self._ready = False
                self.metrics.connected = False
                self.metrics.redis_errors.inc()
                delay = min(max(2 * delay, 0.2), 5.0)
                log.warning("Redis: %s; retrying in %.1f s", _describe(e), delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
        self._close()
        return self.totals.report()

    # -- start and recovery -------------------------------------------------------

    def _start(self) -> None:
        holder = self.lease.acquire()
        self.metrics.connected = True
        self.metrics.beat()  # a standby is healthy: alive, and Redis answers
        if holder != self.settings.consumer:
            self.metrics.role = "standby"
            if holder != self._waiting_for:
                log.info(
                    "waiting: %s holds the lease on %s (one worker per stream and group)",
                    holder,
                    self.keys.input,
                )
                self._waiting_for = holder
            self._sleep(min(self.settings.lease_ttl_ms / 4000, 1.0))
            return
        self._waiting_for = None
        self._next_lease = time.monotonic() + self.settings.lease_ttl_ms / 3000
        if ensure_group(self.client, self.keys):
            if self._had_group:
                log.error(
                    "consumer group %r on %r had vanished (Redis restarted without "
                    "persistence, or the stream was deleted): created it again from the "
                    "start of the stream",
                    self.keys.group,
                    self.keys.input,
                )
            else:
                log.info("created consumer group %r on %r", self.keys.group, self.keys.input)
        self._had_group = True
        self._switch(self.tuner.start(self.engine.checkpoint if self.engine else None))
        if self.engine is None and not self.tuner.enabled:
            self.lease.release()
            raise ValueError(
                f"no model: none in the store ({self.keys.models}), none given; pass --model "
                "PATH (train one with: attnlstm train), or set a finetune interval for a cold start"
            )
        if self.engine is None:
            log.info(
                "no model yet: keeping values, a first model is trained once there are "
                "enough (cold start)"
            )
        self._restore()
        self._resync()
        self._ready = True
        self.metrics.role = "active"
        self.totals.recoveries += 1
        self.metrics.recoveries.inc()

    def _empty_state(self) -> WindowState:
        s = self.settings
        length = max(s.history_len, self.window)
        return WindowState(window=self.window, length=length, max_series=s.max_series)

    def _restore(self) -> None:
        blob = cast(bytes | None, self.client.get(self.keys.state))
        if blob is None:
            self.state = self._empty_state()
            return
        try:
            self.state = WindowState.from_bytes(
                blob,
                window=self.window,
                length=max(self.settings.history_len, self.window),
                max_series=self.settings.max_series,
            )
        except StateError as e:
            log.error("%s; rebuilding the windows from the stream instead", e)
            self.state = self._empty_state()
            return
        log.info(
            "restored windows of %d series at entry %s",
            self.state.series_count,
            self.state.last_id.decode(),
        )

    def _resync(self) -> None:
        """Bring the windows up to the group's last delivered entry, handling what is
        pending on the way and replaying what was acked."""
        delivered = group_info(self.client, self.keys)["last-delivered-id"]
        pending = self._claim_pending()
        met: set[bytes] = set()
        replayed = 0
        after = self.state.last_id
        while page := stream_range(
            self.client, self.keys.input, after=after, upto=delivered, count=self.settings.max_batch
        ):
            met.update(entry_id for entry_id, _ in page if entry_id in pending)
            self._handle(page, pending=pending)
            replayed += len(page)
            after = page[-1][0]
        if unmet := [entry_id for entry_id in pending if entry_id not in met]:
            # Deleted from the stream, or at or before the restored state's entry (handled
            # before the crash): nothing left to do but the ack.
            self.client.xack(self.keys.input, self.keys.group, *unmet)
        if replayed or pending:
            log.info(
                "re-synced to %s: %d entries re-read, %d were pending",
                self.state.last_id.decode(),
                replayed,
                len(pending),
            )

    def _claim_pending(self) -> dict[bytes, int]:
        """Take over every pending entry of the group (we hold the lease, so their
        consumers are gone) and return how often each has been delivered."""
        cursor = b"0-0"
        while True:
            reply = self.client.xautoclaim(
                self.keys.input,
                self.keys.group,
                self.settings.consumer,
                min_idle_time=0,
                start_id=cursor,
                count=1000,
            )
            cursor = reply[0]
            if cursor in (b"0-0", "0-0"):
                break
        return pending_deliveries(self.client, self.keys, self.settings.consumer)

    # -- the loop -----------------------------------------------------------------

    def _turn(self) -> bool:
        """One batch. True when the stream had nothing new."""
        if not self._housekeeping():
            return False
        entries = self._read_batch()
        self.metrics.beat()
        if entries is None:
            self._ready = False
            return False
        if not entries:
            self._switch(self.tuner.tick(self.state, self.scorer))
            return True
        self._switch(self.tuner.sync())  # a promotion or rollback counts from this batch
        self.totals.read += len(entries)
        self.totals.batches += 1
        self.metrics.entries_read.inc(len(entries))
        self.metrics.batch_size.observe(len(entries))
        self._handle(entries, pending=None)
        self._switch(self.tuner.tick(self.state, self.scorer))
        return False

    def _switch(self, checkpoint: Checkpoint | None) -> None:
        """Serve ``checkpoint`` from the next batch on (None: no change)."""
        if checkpoint is None:
            return
        config = checkpoint.config
        if (config.window, config.horizon) != (self.window, self.horizon):
            log.error(
                "model %s has window %d and horizon %d, the worker runs %d and %d: not served",
                checkpoint.version,
                config.window,
                config.horizon,
                self.window,
                self.horizon,
            )
            return
        if self.engine is None:
            device = resolve_device(self.settings.device)
            self.engine = Engine(checkpoint, device=device, max_batch=self.settings.max_batch)
            log.info("forecasting with model %s on %s", checkpoint.version, device)
        else:
            self.engine.swap(checkpoint)
        self.metrics.model_version(checkpoint.version)

    def _read_batch(self) -> list[Entry] | None:
        """Up to max_batch entries: the first read blocks; then more are gathered until
        the batch is full or max_wait_ms has passed since the first arrived. None: the
        reads skipped entries, re-sync first."""
        s = self.settings
        block_ms = min(s.block_ms, BURST_BLOCK_MS) if self.burst else s.block_ms
        entries = self._read(s.max_batch, block_ms, after=self.state.last_id)
        if not entries:
            return entries
        window = BatchWindow(max_batch=s.max_batch, max_wait_ms=s.max_wait_ms)
        window.add(len(entries))
        while (block := window.block_ms()) is not None:
            more = self._read(window.room, block, after=entries[-1][0])
            if more is None:
                return None
            window.add(len(more))
            entries += more
        return entries

    def _read(self, count: int, block_ms: int, *, after: bytes) -> list[Entry] | None:
        """New entries for this consumer, checked to start right after ``after``.

        The first entry of the stream after ``after`` is fetched in the same round trip,
        before the blocking read (or after it, when the stream had nothing new). If the
        read starts elsewhere, entries between were
        delivered to this consumer and never reached us (a reply lost on the way): they
        are pending on us, and the windows must see them first, so re-sync.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.xrange(self.keys.input, min=b"(" + after, count=1)
        pipe.xreadgroup(
            self.keys.group,
            self.settings.consumer,
            {self.keys.input: ">"},
            count=count,
            block=block_ms,
        )
        following, reply = pipe.execute()
        entries = entries_of(reply)
        if entries and not following:  # all arrived while the read blocked: check now
            following = self.client.xrange(self.keys.input, min=b"(" + after, count=1)
        if entries and (not following or entries[0][0] != following[0][0]):
            log.warning(
                "a read for entries after %s started at %s: entries were delivered to this "
                "consumer and never reached it (a lost reply?), or the group was reset; "
                "re-syncing",
                after.decode(),
                entries[0][0].decode(),
            )
            return None
        return entries

    def _housekeeping(self) -> bool:
        """Lease renewal and the pending audit, on their timers. False: re-sync first."""
        now = time.monotonic()
        if now >= self._next_lease:
            holder = self.lease.acquire()
            if holder != self.settings.consumer:
                log.error("lost the lease on %s to %s; stepping back", self.keys.input, holder)
                self._ready = False
                return False
            self._next_lease = now + self.settings.lease_ttl_ms / 3000
        if now >= self._next_audit:
            self._next_audit = now + AUDIT_INTERVAL_S
            info = group_info(self.client, self.keys)
            if info.get("lag") is not None:
                self.metrics.lag.set(info["lag"])
            self._series_gauges()
            if self._stray_pending():
                self._ready = False
                return False
        return True

    def _series_gauges(self) -> None:
        names = self.state.names()[:SERIES_GAUGES]
        for slot, name in enumerate(names):
            if slot < self.scorer.series_mae.size and np.isfinite(self.scorer.series_mae[slot]):
                self.metrics.series_mae.labels(name).set(self.scorer.series_mae[slot])

    def _stray_pending(self) -> bool:
        """Entries pending between batches: a read whose reply was lost (ours), or a
        consumer that died holding them (theirs, once idle for claim_idle_ms)."""
        s = self.settings
        ours = self.client.xpending_range(
            self.keys.input, self.keys.group, min="-", max="+", count=1, consumername=s.consumer
        )
        idle = self.client.xpending_range(
            self.keys.input, self.keys.group, min="-", max="+", count=1, idle=s.claim_idle_ms
        )
        if ours or idle:
            log.warning(
                "entries pending outside any batch (a lost reply or a dead consumer); re-syncing"
            )
        return bool(ours or idle)

    # -- one batch ----------------------------------------------------------------

    def _handle(self, entries: list[Entry], *, pending: dict[bytes, int] | None) -> None:
        """Validate, update the windows, forecast, publish with the acks, in one EXEC.

        ``pending`` is None for a live read (every entry is new to us). While re-syncing
        it maps the entries still pending to their delivery counts; the others were
        acked before and are only replayed into the windows.
        """
        batch = self._sort_out(entries, pending)
        slots = self.state.slots_for(batch.names)
        publish = np.asarray(batch.publish, dtype=bool)
        for i in np.flatnonzero((slots == NO_SLOT) & publish):
            reason = f"series limit reached (max_series={self.state.max_series})"
            batch.dead.append((batch.ids[i], batch.fields[i], reason))
        kept = slots != NO_SLOT
        values = np.asarray(batch.values, dtype=np.float64)
        wanted = publish[kept]  # of the kept entries, those to forecast once full
        serving = self.engine is not None
        gather = serving and bool(wanted.any())
        full, windows = self.state.push(slots[kept], values[kept], gather=gather)
        forecast = full & wanted if serving else np.zeros_like(wanted)
        rows = np.flatnonzero(kept)[forecast]  # batch positions to forecast
        yhat, attn = self._forecast(windows[wanted[full]] if gather else windows[:0])
        pending_forecasts = np.full(forecast.size, np.nan)
        pending_forecasts[forecast] = yhat[:, 0]
        self._score(slots[kept], values[kept], pending_forecasts)
        warming = int((~forecast & wanted).sum())
        self.totals.warming += warming
        self.metrics.warming.inc(warming)
        if id_key(entries[-1][0]) > id_key(self.state.last_id):
            self.state.last_id = entries[-1][0]
        self._publish(batch, rows, yhat, attn)

    def _sort_out(self, entries: list[Entry], pending: dict[bytes, int] | None) -> _Batch:
        batch = _Batch()
        if len(self._known) > 2 * self.settings.max_series:  # bounded, like the windows
            self._known.clear()
        handled = self._handled_before(entries)
        max_deliveries = self.settings.max_deliveries
        for k, (entry_id, fields) in enumerate(entries):
            ours = pending is None or entry_id in pending
            if ours:
                batch.acks.append(entry_id)
            if fields is None or k < handled:
                continue  # deleted, or handled before the state was saved
            if pending is not None and pending.get(entry_id, 0) > max_deliveries:
                reason = f"delivered {pending[entry_id]} times without being handled"
                batch.dead.append((entry_id, fields, reason))
                continue
            reading = parse(entry_id, fields, self._known)
            if isinstance(reading, str):
                if ours:
                    batch.dead.append((entry_id, fields, reading))
                continue
            batch.ids.append(entry_id)
            batch.fields.append(fields)
            batch.names.append(reading.series)
            batch.values.append(reading.value)
            batch.ts.append(reading.ts)
            batch.publish.append(ours)
        return batch

    def _handled_before(self, entries: list[Entry]) -> int:
        """How many leading entries the state already reflects (reads come in id order,
        so only a batch that starts at or before the state's entry needs looking at)."""
        last = id_key(self.state.last_id)
        if not entries or id_key(entries[0][0]) > last:
            return 0
        return next(
            (k for k, (entry_id, _) in enumerate(entries) if id_key(entry_id) > last),
            len(entries),
        )

    def _score(self, slots: np.ndarray, values: np.ndarray, forecasts: np.ndarray) -> None:
        scored = self.scorer.update(slots, values, forecasts, time.monotonic())
        if scored:
            self.metrics.scored.inc(scored)
            self.metrics.rolling_mae.set(self.scorer.mae)
            self.metrics.rolling_naive_mae.set(self.scorer.naive_mae)
            self.metrics.mae_level.set(self.scorer.level)

    def _forecast(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.engine is None or windows.shape[0] == 0:
            return np.empty((0, self.horizon)), np.empty((0, self.window))
        started = time.perf_counter()
        yhat, attn = self.engine.forecast(windows)
        self.metrics.inference.observe(time.perf_counter() - started)
        return yhat, attn

    def _publish(self, batch: _Batch, rows: np.ndarray, yhat: np.ndarray, attn: np.ndarray) -> None:
        finite = np.isfinite(yhat).all(axis=1) & np.isfinite(attn).all(axis=1)
        for i in rows[~finite]:
            reason = "the model's forecast is not finite"
            batch.dead.append((batch.ids[i], batch.fields[i], reason))
        rows, yhat, attn = rows[finite], yhat[finite], attn[finite]
        s, keys = self.settings, self.keys
        version = self.engine.version.encode() if self.engine is not None else b""
        output = (b"XADD", keys.output.encode(), b"MAXLEN", b"~", b"%d" % s.output_maxlen, b"*")
        commands: list[Command] = [
            (*output, *forecast_fields(batch.names[i], batch.ids[i], batch.ts[i], y, a, version))
            for i, y, a in zip(rows.tolist(), json_rows(yhat), fraction_rows(attn), strict=True)
        ]
        dead = (b"XADD", keys.dead.encode(), b"MAXLEN", b"~", b"%d" % s.output_maxlen, b"*")
        for entry_id, fields_in, reason in batch.dead:
            commands.append((*dead, *_flat(dead_fields(fields_in, entry_id, reason))))
        if batch.acks:
            commands.append((b"XACK", keys.input.encode(), keys.group.encode(), *batch.acks))
        checkpoint = time.monotonic() >= self._next_checkpoint
        if checkpoint:
            commands.append((b"SET", keys.state.encode(), self.state.to_bytes()))
        if commands:
            transaction(self.client, commands)
        now_ms = time.time() * 1000
        if checkpoint:
            self._next_checkpoint = time.monotonic() + s.checkpoint_interval_s
        self._count(batch, rows, now_ms)

    def _count(self, batch: _Batch, rows: np.ndarray, now_ms: float) -> None:
        self.totals.forecasts += rows.size
        self.totals.dead += len(batch.dead)
        self.metrics.forecasts.inc(rows.size)
        for _, _, reason in batch.dead:
            self.metrics.dead.labels(reason_kind(reason)).inc()
        if rows.size:
            sent_ms = np.fromiter((entry_ms(batch.ids[i]) for i in rows), np.float64, rows.size)
            self.metrics.latency.observe_many((now_ms - sent_ms) / 1000)
        self.metrics.series.set(self.state.series_count)

    # -- the way out --------------------------------------------------------------

    def _close(self) -> None:
        self.tuner.close()
        if not self._ready:
            log.info("stopped (not in step with Redis; the last checkpoint stands)")
            return
        try:
            self.client.set(self.keys.state, self.state.to_bytes())
            self.lease.release()
        except redis.RedisError as e:
            log.warning("could not save the window state at exit (%s); the last one stands", e)
            return
        log.info(
            "stopped: saved windows of %d series at entry %s",
            self.state.series_count,
            self.state.last_id.decode(),
        )

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def _flat(fields: Fields) -> list[bytes]:
    return [part for pair in fields.items() for part in pair]


def _describe(e: redis.RedisError) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if isinstance(e, redis.ConnectionError) else text
