"""The worker's main loop: read a batch, forecast it, publish it together with its acks.

Invariant: the window state reflects the input stream, in id order, up to
``state.last_id``, and every entry up to that id has been handled (forecast or
dead-lettered, and acked). Whenever the worker is unsure of that (at start, after any
Redis error, when the group holds entries nobody is working on) it restores the state
checkpoint from Redis and re-syncs: it re-reads the stream from the checkpoint's id,
replaying acked entries into the windows without publishing them again, and handles
the entries still pending. Publishing and acking in one MULTI/EXEC makes "handled"
and "acked" the same thing, so a crash at any point loses nothing and repeats nothing.

Redis and the model work at the same time: while a batch is forecast, the next read
(one that cannot block) is already out, and a batch's transaction reply is read during
the next batch. A stop handles the batch read ahead; a re-sync first reads every reply
still due.
"""

from __future__ import annotations

import contextlib
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
from worker.batch import Batch, batch_commands, sort_out
from worker.batcher import BatchWindow
from worker.contract import entry_ms, reason_kind
from worker.engine import Engine
from worker.metrics import SERIES_GAUGES, Metrics
from worker.models import ModelStore
from worker.scoring import Scorer
from worker.settings import Settings
from worker.state import NO_SLOT, StateError, WindowState
from worker.streams import (
    Entry,
    Lease,
    Wire,
    ensure_group,
    executed,
    group_info,
    id_key,
    multi_exec,
    pending_deliveries,
    raise_first_error,
    range_entries,
    read_entries,
    read_group,
    stream_range,
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
class _Sent:
    """A batch whose transaction was sent and whose reply is still to be read."""

    batch: Batch
    rows: np.ndarray  # the batch positions forecast
    transaction: bool  # False: the batch had nothing to write
    checkpoint: bool  # the window state went with it
    sent_ms: float  # when it went out: its forecasts' publish time, for the latency


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
        self.wire = Wire(client)  # reads, and the batches' transactions
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
        self._sent: _Sent | None = None  # the last batch, its reply not read yet
        self._ahead = False  # a read went out before the batch in hand was forecast
        self._early: list[Entry] = []  # that read's entries: the next batch's start

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
            except redis.exceptions.NoPermissionError as e:
                # An ACL that lacks a right: retrying cannot help, and a worker that
                # retries forever looks hung. Exit with what to fix.
                self._ready = False
                self._close()
                raise ValueError(
                    f"Redis refused this worker's user a command ({e}); give the user the "
                    "rights deploy/users.acl.template grants the worker user"
                ) from None
            except redis.RedisError as e:
                self._ready = False
                self.metrics.connected = False
                self.metrics.redis_errors.inc()
                delay = min(max(2 * delay, 0.2), 5.0)
                log.warning("Redis: %s; retrying in %.1f s", _describe(e), delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
        self._finish()
        self._close()
        return self.totals.report()

    # -- start and recovery -------------------------------------------------------

    def _start(self) -> None:
        self._quiet_wire()
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
        if not self._stopping and time.monotonic() < self._next_audit:
            # The next read goes out now, without blocking: Redis answers it while this
            # batch is forecast. Not when the pending audit is due: it must find none.
            self._send_read(self.settings.max_batch, None, after=entries[-1][0])
            self._ahead = True
        self.totals.read += len(entries)
        self.totals.batches += 1
        self.metrics.entries_read.inc(len(entries))
        self.metrics.batch_size.observe(len(entries))
        self._handle(entries, pending=None, hold=True)
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
        """Up to max_batch entries: those read ahead, or else a read that blocks; then
        more are gathered until the batch is full or max_wait_ms has passed since the
        first arrived. None: the reads skipped entries, re-sync first."""
        s = self.settings
        entries: list[Entry] | None = self._early
        self._early = []
        if not entries:
            entries = self._read(s.max_batch, self._block_ms(), after=self.state.last_id)
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

    def _block_ms(self) -> int:
        return min(self.settings.block_ms, BURST_BLOCK_MS) if self.burst else self.settings.block_ms

    def _read(self, count: int, block_ms: int, *, after: bytes) -> list[Entry] | None:
        self._settle()  # the last batch's reply is due on the wire before this read's
        self._send_read(count, block_ms, after=after)
        return self._take_read(after=after)

    def _send_read(self, count: int, block_ms: int | None, *, after: bytes) -> None:
        """Ask for up to ``count`` new entries for this consumer, waiting up to
        ``block_ms`` for one (None: not at all); :meth:`_take_read` reads them. The
        first entry of the stream after ``after``, and the models events not seen yet,
        are asked for in the same write.

        Only a read that cannot block may go out ahead of a transaction: Redis runs
        nothing more from a connection while a read on it is blocked.
        """
        self.wire.send(
            [
                (b"XRANGE", self.keys.input.encode(), b"(" + after, b"+", b"COUNT", b"1"),
                read_group(self.keys, self.settings.consumer, count, block_ms),
                self.tuner.watch(),
            ]
        )

    def _take_read(self, *, after: bytes) -> list[Entry] | None:
        """The entries of the read sent last, checked to start right after ``after``.

        When the stream had nothing new before the read blocked, the first entry after
        ``after`` is fetched again. If the read starts elsewhere, entries between were
        delivered to this consumer and never reached us (a reply lost on the way): they
        are pending on us, and the windows must see them first, so re-sync.
        """
        replies = self.wire.receive()
        raise_first_error(replies)
        following, reply, events = replies
        # A promotion or rollback counts from the batch this read starts.
        self._switch(self.tuner.sync(range_entries(events)))
        entries = read_entries(reply)
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
        if now >= self._next_audit and not self._early:
            self._settle()  # the audit must not find the last batch's entries pending
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

    def _handle(
        self, entries: list[Entry], *, pending: dict[bytes, int] | None, hold: bool = False
    ) -> None:
        """Validate, update the windows, forecast, publish with the acks, in one EXEC.

        ``pending`` is None for a live read (every entry is new to us). While re-syncing
        it maps the entries still pending to their delivery counts; the others were
        acked before and are only replayed into the windows. ``hold``: leave the
        transaction's reply to be read during the next batch.
        """
        if len(self._known) > 2 * self.settings.max_series:  # bounded, like the windows
            self._known.clear()
        batch = sort_out(
            entries,
            pending=pending,
            known=self._known,
            last_id=self.state.last_id,
            max_deliveries=self.settings.max_deliveries,
        )
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
        self._publish(batch, rows, yhat, attn, hold=hold)

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

    def _publish(
        self, batch: Batch, rows: np.ndarray, yhat: np.ndarray, attn: np.ndarray, *, hold: bool
    ) -> None:
        finite = np.isfinite(yhat).all(axis=1) & np.isfinite(attn).all(axis=1)
        for i in rows[~finite]:
            reason = "the model's forecast is not finite"
            batch.dead.append((batch.ids[i], batch.fields[i], reason))
        rows, yhat, attn = rows[finite], yhat[finite], attn[finite]
        version = self.engine.version.encode() if self.engine is not None else b""
        commands = batch_commands(
            batch, rows, yhat, attn, self.keys, maxlen=self.settings.output_maxlen, version=version
        )
        checkpoint = time.monotonic() >= self._next_checkpoint
        if checkpoint:
            commands.append((b"SET", self.keys.state.encode(), self.state.to_bytes()))
        self._settle()  # the batch before this one: its reply is due first
        if self._ahead:
            # Taken before the transaction goes out: a reply too big for the socket's
            # buffer would otherwise wait behind the transaction's execution.
            self._ahead = False
            early = self._take_read(after=self.state.last_id)
            if early is None:
                self._ready = False  # re-sync after this batch
            else:
                self._early = early
        if commands:
            self.wire.send(multi_exec(commands))
        sent_ms = time.time() * 1000
        self._sent = _Sent(batch, rows, bool(commands), checkpoint, sent_ms)
        if not hold:
            self._settle()

    def _settle(self) -> None:
        """Read the reply to the last batch's transaction, and count the batch."""
        sent, self._sent = self._sent, None
        if sent is None:
            return
        if sent.transaction:
            executed(self.wire.receive())
        if sent.checkpoint:
            self._next_checkpoint = time.monotonic() + self.settings.checkpoint_interval_s
        self._count(sent.batch, sent.rows, sent.sent_ms)

    def _quiet_wire(self) -> None:
        """Before a re-sync: read every reply still due, so that a transaction sent is
        known to be applied (or not, if it failed), or drop the connection. Entries of a
        read ahead stay pending on us: the re-sync claims and handles them."""
        try:
            with contextlib.suppress(redis.ResponseError):
                self._settle()
            while self.wire.waiting:
                self.wire.receive()
        except redis.RedisError:
            self.wire.drop()
        finally:
            self._sent, self._ahead, self._early = None, False, []

    def _count(self, batch: Batch, rows: np.ndarray, published_ms: float) -> None:
        self.totals.forecasts += rows.size
        self.totals.dead += len(batch.dead)
        self.metrics.forecasts.inc(rows.size)
        for _, _, reason in batch.dead:
            self.metrics.dead.labels(reason_kind(reason)).inc()
        if rows.size:
            entered_ms = np.fromiter((entry_ms(batch.ids[i]) for i in rows), np.float64, rows.size)
            self.metrics.latency.observe_many((published_ms - entered_ms) / 1000)
        self.metrics.series.set(self.state.series_count)

    # -- the way out --------------------------------------------------------------

    def _finish(self) -> None:
        """At a stop: handle the entries read ahead, the batch still in flight."""
        if not (self._ready and self._early):
            return
        try:
            self._turn()
        except redis.RedisError as e:
            self._ready = False
            log.warning("Redis: %s; the entries read ahead are handled at the next start", e)

    def _close(self) -> None:
        try:
            self._settle()  # the state to save is true only once its last batch is applied
        except redis.RedisError as e:
            self._ready = False
            log.warning("Redis: %s", _describe(e))
        self._quiet_wire()
        self.wire.close()
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


def _describe(e: redis.RedisError) -> str:
    text = str(e) or type(e).__name__
    return f"{type(e).__name__}: {text}" if isinstance(e, redis.ConnectionError) else text
