"""The worker's main loop: read a batch, forecast it, publish it together with its acks.

Invariant: the window state reflects the input stream, in id order, up to
``state.last_id``, and every entry up to that id has been handled (forecast or
dead-lettered, and acked). Whenever the worker is unsure of that (at start, after any
Redis error, when the group holds entries nobody is working on) it gets back in step
(:mod:`worker.recovery`): it restores the state checkpoint from Redis and re-reads the
stream from the checkpoint's id, replaying acked entries into the windows (and through
the model and the scoring, restored with the windows, so that intervals and anomalies
go on as they went) without publishing them again, and handling the entries still
pending. Publishing and acking in one MULTI/EXEC makes "handled" and "acked" the same
thing, so a crash at any point loses nothing and repeats nothing.

With P partitions (:mod:`worker.pool`) the worker serves its share of them from this
one loop: a batch holds the entries of every partition it serves, read together and
forecast in one model call, and each partition's part is published with its acks by
that partition's own fenced call, so everything above holds per partition.

Redis and the model work at the same time (:mod:`worker.pipeline`): while a batch is
forecast, the read for the next one is already out, and a batch's transaction reply is
read during the next batch. A stop handles the batch read ahead; a re-sync first reads
every reply still due.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import redis

from attnlstm.checkpoint import Checkpoint
from attnlstm.device import resolve_device
from attnlstm.intervals import Spread, window_scale
from attnlstm.model import one_step_reads
from worker.batch import Anomalies, Batch, Forecasts, Receipt, batch_call, triage
from worker.contract import entry_ms
from worker.engine import Engine, batch_rows, check_fits
from worker.keys import Keys
from worker.lease import ensure_library, process_token
from worker.metrics import Metrics
from worker.online.finetune import history_kept
from worker.online.scoring import Overall, Scorer
from worker.online.store import ModelStore
from worker.online.tuner import COLD_START_MODEL, Tuner
from worker.pipeline import Pipeline
from worker.pool import PartitionsError, Pool
from worker.recovery import Recovery
from worker.settings import Settings
from worker.state import CHUNK, META, NO_SLOT, WindowState
from worker.streams import (
    REDIS_ERRORS,
    Command,
    Entry,
    OutOfStepError,
    ask_for_slots,
    cluster_of,
    id_key,
    scheme_hint,
    what_to_fix,
    words,
)

log = logging.getLogger("attnlstm.worker")

AUDIT_INTERVAL_S = 2.0  # pending-entry audit, lag and per-series gauges
STRAYS_LOG_S = 60.0  # entries left in the unpartitioned stream: logged this often
REFUSALS_LOG_S = 60.0  # entries refused at the series limit: logged this often
# A dead letter's error for an entry of a new series past the limit, and what to change.
SERIES_LIMIT = (
    "series limit reached (max_series={}): raise max_series, or free the slots of series "
    "gone quiet sooner (series_idle_s)"
)
RESYNC_CALM_S = 30.0  # out of step again within this: the next re-sync waits, longer each time
BURST_BLOCK_MS = 200  # in --burst mode, an empty read this long means drained


@dataclass
class Lane:
    """One partition this worker serves: its keys, lease and windows."""

    k: int
    keys: Keys
    recovery: Recovery
    state: WindowState
    scorer: Scorer
    synced: bool = False  # its windows restored and re-synced: what a stop may save


@dataclass
class _Part:
    """One partition's entries of a batch, up to the model call."""

    lane: Lane
    entries: list[Entry]
    batch: Batch
    slots: np.ndarray  # of the kept entries
    kept: np.ndarray  # (entries triaged,) bool: in the windows from now on
    values: np.ndarray  # of the kept entries
    forecast: np.ndarray  # (kept,) bool: forecast now
    publish: np.ndarray  # (kept,) bool: published (not re-read after being acked)
    windows: np.ndarray  # (forecast,) their windows
    fresh: np.ndarray  # (kept,) bool: the first value of a series started afresh
    read: int  # the Receipt's counts
    warming: int
    refused: int


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
        engine_from_store: bool = False,
    ) -> None:
        """``engine`` None: no model yet; the worker keeps values and trains a first one
        (a cold start) once it has enough. ``burst``: stop once the stream is drained.
        ``finetune_clock`` times the fine-tune schedule (tests move it by hand).
        ``engine_from_store``: the engine's model is the store's (a worker made again with
        its shape, :attr:`reshaped`), not a model file's."""
        self.client = client
        self.engine = engine
        config = engine.checkpoint.config if engine is not None else COLD_START_MODEL
        self.context, self.window, self.horizon = config.context, config.window, config.horizon
        batch = batch_rows(settings.max_batch, settings.batch_values, self.context)
        if batch < settings.max_batch:
            log.info(
                "batches of at most %d entries: %d values each, %d in all at most (batch_values)",
                batch,
                self.context,
                settings.batch_values,
            )
        settings = settings.on(client).model_copy(update={"max_batch": batch})
        self.settings, self.keys = settings, settings.keys
        self.metrics = metrics or Metrics()
        self.metrics.partitioned = settings.partitions > 1
        self.metrics.coverage_target.set(settings.coverage)
        self.metrics.finetune_interval.set(settings.finetune_interval_s)
        self.metrics.partition_count.set(settings.partitions)
        self.burst = burst
        # One read blocks at most a third of a lease's life: the leases are renewed between
        # reads, and a quiet stream must not let them lapse (with a 1 s lease and the
        # default block_ms of 1 s, each idle read lost them, and each renewal re-synced).
        block_ms = min(settings.block_ms, max(1, settings.lease_ttl_ms // 3))
        self._block_ms = min(block_ms, BURST_BLOCK_MS) if burst else block_ms
        self.token = process_token(settings.consumer)  # in every lease this worker holds
        self.pool = Pool(
            client,
            self.keys,
            token=self.token,
            ttl_ms=settings.lease_ttl_ms,
            partitions=settings.partitions,
        )
        self.lanes: dict[int, Lane] = {}  # the partitions served, by number, in the order taken
        self._share = 0  # how many partitions this worker should serve, as of the last turn
        self.scores = Overall(halflife_s=settings.mae_halflife_s)
        store = ModelStore(
            client,
            self.keys,
            keep=settings.keep_models,
            source=settings.consumer,
            key=settings.model_key(),
        )
        self.tuner = Tuner(
            client,
            settings=settings,
            store=store,
            metrics=self.metrics,
            fits=functools.partial(
                check_fits, context=self.context, window=self.window, horizon=self.horizon
            ),
            clock=finetune_clock,
            from_store=engine_from_store,
        )
        self.pipeline = Pipeline(
            client,
            settings=settings,
            events_query=self.tuner.events_query,
            on_applied=self.metrics.published,
        )
        self._series_ids: dict[bytes, str] = {}  # series ids already validated
        self._in_step = False  # the windows match the group (see the module docstring)
        self._running = False  # in step once: its partitions served
        self._strays_logged = -math.inf  # when strays (see _report_strays) were last logged
        self._refused_logged = -math.inf  # when the series limit's refusals were last logged
        self._refused_unlogged = 0  # entries it refused since
        self._mark_logged: str | None = None  # the partitions mark's refusal last logged
        self._stopping = False
        self._answered = False  # Redis answered a step of the loop (see run)
        self._next_audit = 0.0
        self._next_balance = 0.0
        self._waiting_for: str | None = None  # the holder last logged, while on standby
        self._started = time.monotonic()

    @property
    def reshaped(self) -> Checkpoint | None:
        """The store's model of another shape that stopped this worker, with no model of
        its own: a worker made with an engine of it serves on (worker.app)."""
        return self.tuner.reshape

    def stop(self, *_: object) -> None:
        """Ask the loop to finish the batch in flight and exit (a signal handler)."""
        # The flag first: a second signal can land while the first one is logging.
        first, self._stopping = not self._stopping, True
        if first:
            log.info("stopping: finishing the batch in flight")

    def run(self) -> dict[str, float]:
        """Batches until stopped, or in burst mode until the stream is drained; then
        the counts of this run."""
        delay = resync_delay = 0.0
        out_of_step_at = -math.inf
        while not self._stopping:
            try:
                if not self._in_step:
                    self._in_step = self._get_in_step()
                elif self._handle_next_batch() and self.burst and len(self.lanes) >= self._share:
                    # (drained once it serves its share: a start takes one partition)
                    log.info("stream drained (--burst)")
                    break
                self.metrics.connected = self._answered = True
                delay = 0.0
            except OutOfStepError as e:
                if self._stopping:  # a stop asked for mid re-sync: _resync_alive
                    log.info("%s", e)
                    break
                # Out of step again soon after (another reader in the group takes entries):
                # each re-sync re-reads every window, so the re-syncs are spaced out, by
                # less than the leases last unrenewed.
                now = time.monotonic()
                again = now - out_of_step_at < RESYNC_CALM_S
                longest = min(5.0, self.settings.lease_ttl_ms / 4000)
                resync_delay = min(max(2 * resync_delay, 0.25), longest) if again else 0.0
                out_of_step_at = now
                log.warning("%s; re-syncing%s", e, f" in {resync_delay:g} s" * again)
                self._in_step = False
                self._sleep(resync_delay)
            except REDIS_ERRORS as e:
                clustered = cluster_of(self.client) is not None
                if fix := what_to_fix(e, clustered, self.settings.redis_password_file):  # for good
                    self._in_step = False
                    self._close(save=False)
                    raise ValueError(fix) from None
                self._follow_a_failover(e)
                self._in_step = False
                self.metrics.cut_off()
                self.metrics.redis_errors.inc()
                self.metrics.expire()
                delay = min(max(2 * delay, 0.2), 5.0)
                # Once Redis has answered, the URL's scheme is right: a reset is a
                # server gone (a restart, a failover), and hinted at TLS on every one.
                said = _describe(e, None if self._answered else self.settings.url_for_logs())
                log.warning("Redis: %s; retrying in %.1f s", said, delay)
                self._sleep(delay * random.uniform(0.8, 1.2))
            except ValueError:  # no retry mends it (a library of a newer version, the
                self._in_step = False  # partitions' mark): its leases handed back now, not
                self._close(save=False)  # held until they lapse, for whoever comes next
                raise
        in_step = self._in_step and self._finish()
        if not in_step and self.reshaped is None:  # (not said of a stop for an error, or to
            # be made again: their own lines say why)
            log.info("stopped (not in step with Redis; the last checkpoint stands)")
        self._close(save=in_step)
        return self.metrics.totals(time.monotonic() - self._started)

    def _follow_a_failover(self, e: Exception) -> None:
        """A cluster's node lost, maybe for good, its replica promoted in its place:
        the slot table asked for again. The worker's own connections (Wires, the
        library's check on every primary) go around redis-py's own asking, and the table
        kept a killed primary until it came back: no partition served meanwhile, even
        those on healthy nodes (a review)."""
        cluster = cluster_of(self.client)
        if cluster is not None and isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
            with contextlib.suppress(*REDIS_ERRORS):
                ask_for_slots(cluster)

    def _handle_next_batch(self) -> bool:
        """Read one batch, forecast it, publish it. True when the streams had nothing new."""
        self._housekeeping()
        if not self._in_step:  # gave back every partition it served
            return False
        if self.engine is None and self.tuner.metrics.no_model and not self.pipeline.holds_next:
            self._wait_for_a_model()
            return False
        handled = {k: lane.state.last_id for k, lane in self.lanes.items()}
        read = self.pipeline.next_batch(handled, block_ms=self._block_ms)
        self.metrics.beat()
        # Delivered, handled below or left pending: counted only as handled, a batch left
        # pending at a reshape was counted as lost input at the stop (a review).
        for k, entries in read.entries.items():
            self.lanes[k].recovery.delivered(len(entries))
        self._serve(self.tuner.sync(read.events))
        if self.reshaped is not None:  # left pending: the worker made again takes them
            self._stopping = True
            return False
        if read.entries:
            if not self._stopping and time.monotonic() < self._quiet_due:
                # Redis answers the next read while this batch is forecast. Not when the
                # audit or the pool's turn is due: that must find nothing pending.
                self.pipeline.read_ahead(read.last(handled))
            self.metrics.batch_size.observe(read.count)
            self._handle(read.entries, pending=None)
        self._serve(self.tuner.tick(self._histories, self.scores, start=not self._stopping))
        return not read.entries

    def _wait_for_a_model(self) -> None:
        """No model, and none comes without an operator (the store serves one that this
        worker refused, so no cold start): the input is left unread, to be forecast once a
        model serves, and the models events are read for one. Read, every entry was acked
        as warming, and none of them was forecast once a model came. A first model's
        training begun before the refusal is collected (its lock given back), and none is
        begun. In burst mode, an error: nothing would end the wait."""
        if self.burst:
            raise ValueError(f"no model: {self.tuner.metrics.no_model}; the input is left unread")
        self.pipeline.drain()
        self.metrics.beat()
        self._serve(self.tuner.sync(self.tuner.new_events()))
        if self.engine is None and self.reshaped is None:  # a pointer changed with no event
            self._serve(self.tuner.recheck())
        self._serve(self.tuner.tick(self._histories, self.scores, start=False))
        if self.reshaped is not None:  # one of another shape serves: made again with it
            self._stopping = True
        elif self.engine is None:
            self._sleep(self._block_ms / 1000)

    def _renew_leases(self) -> None:
        """Every partition's lease, where due: FencedError for one no longer ours; and
        this worker's place in the pool. The loop turns: through a long re-sync too,
        the worker is healthy."""
        started = time.monotonic()
        for lane in self.lanes.values():
            lane.recovery.renew_lease()
        self.tuner.keep_lock()
        self.pool.stay()
        self.metrics.beat()
        self.metrics.renewed(self._held_until(started))

    def _held_until(self, since: float) -> float:
        """Until when the leases hold at least, each renewed or taken since ``since`` or
        within a third of its life before (when each is due): two thirds of their life
        past it. Past that unrenewed, the metrics report a standby (Metrics.expire)."""
        return since + self.settings.lease_ttl_ms / 1500

    def _resync_alive(self) -> None:
        """A re-sync's turn, page by page: the leases renewed, or, once a stop is asked
        for, the re-sync abandoned (the worker exits out of step: its leases handed back,
        the last checkpoint standing). A re-sync of 7-31 s ignored SIGTERM, and Docker
        killed the worker with its leases held."""
        if self._stopping:
            raise OutOfStepError("stopped in the middle of a re-sync: the last checkpoint stands")
        self._renew_leases()

    @property
    def _quiet_due(self) -> float:
        """When the next turn with nothing read ahead is due: the audit's, the pool's."""
        return min(self._next_audit, self._next_balance)

    def _housekeeping(self) -> None:
        """The leases; the audit of what is pending, and the pool's share, each on its
        timer."""
        self._renew_leases()
        now = time.monotonic()
        if now < self._quiet_due or self.pipeline.holds_next:
            return
        self.pipeline.drain()  # the audit must not find the last batch's entries pending
        if now >= self._next_balance:
            self._balance()
        if now >= self._next_audit:
            self._next_audit = now + AUDIT_INTERVAL_S
            self._audit()

    def _audit(self) -> None:
        """Every partition's: what is pending, idle series, and the lag gauges; and the
        entries of the unpartitioned stream."""
        self.metrics.series_maes(
            [(lane.state.names(), lane.scorer.series_mae) for lane in self.lanes.values()]
        )
        for lane in self.lanes.values():
            self._renew_leases()  # where due: each partition's audit takes round trips
            # Idle by the stream's clock: the newest entry read, whether or not its series
            # has a slot (by the newest value held, no slot was ever freed once every
            # slot's series had gone quiet, and every new series was refused for good).
            lane.scorer.forget(lane.state.sweep(entry_ms(lane.state.last_id)))
            lane.recovery.audit()
        self._report_served()
        self._report_strays(self.pool.strays())
        self._check_mark()

    def _check_mark(self) -> None:
        """The partitions mark written again where it is gone: deleted under a running
        pool, the next producer or worker with another P took it for its own, and the
        pool went down at its next re-sync. One of another P is an error in the log (once
        until it changes), not a stop: the pool serves on, as it did until a re-sync."""
        try:
            self.pool.check_mark()
        except PartitionsError as e:
            if str(e) != self._mark_logged:
                log.error("%s", e)
            self._mark_logged = str(e)
        else:
            self._mark_logged = None

    def _report_served(self) -> None:
        """The gauges of what this worker serves: at each audit, and at once when a
        partition goes (given back, or found another's at a re-sync), when the next
        batch's count of its series, which a quiet worker never had, and the next
        audit's lags came too late: the pool's sums counted the partition twice. A lag
        is its partition's at its last audit; None: Redis cannot count it (an entry
        deleted unread, until the group has read to the end), or not audited yet: NaN,
        where the last count stayed while a backlog built."""
        lanes = self.lanes.values()
        self.metrics.served(
            series=sum(lane.state.series_count for lane in lanes),
            lags={
                lane.k: math.nan if lane.recovery.lag is None else lane.recovery.lag
                for lane in lanes
            },
        )

    def _report_strays(self, strays: int) -> None:
        """Entries in the unpartitioned input stream, which no worker serves: the gauge
        at each audit and re-sync, and an error when they first appear, then at most once
        every STRAYS_LOG_S while they stay (each audit's, every 2 s, filled the log)."""
        self.metrics.unpartitioned.set(strays)
        now = time.monotonic()
        if not strays:
            self._strays_logged = -math.inf
        elif now - self._strays_logged >= STRAYS_LOG_S:
            self._strays_logged = now
            count = self.settings.partitions
            log.error(
                "%d entries in %s, which no worker reads: the input is %d partitions (%s "
                "..). A producer writes there: have it write each entry to its series' "
                "partition, k = crc32(series) mod %d (attnlstm.partition.partition_of), "
                "then add these to theirs and delete %s",
                strays,
                self.keys.input,
                count,
                self.keys.partition(0, count).input,
                count,
                self.keys.input,
            )

    def _balance(self) -> None:
        """Serve this worker's share of the partitions (:mod:`worker.pool`): give some
        back, or take free ones. Nothing may be read ahead. The last taken go back
        first: after a worker's outage, the partitions taken from it go back to it, and
        no other changes hands (the highest numbers went back: two moved for one)."""
        started = time.monotonic()
        share = self._share = self.pool.share()
        for k in list(self.lanes)[share:]:
            self._give_back(self.lanes.pop(k))
            self._report_served()
        taken = self._take(share)
        self.lanes |= {lane.k: lane for lane in taken}  # their leases kept while others re-sync
        for lane in taken:
            self._get_lane_in_step(lane)
        self.pipeline.serve({k: lane.keys for k, lane in self.lanes.items()})
        interval_s = self.settings.lease_ttl_ms / 1000 / (3 if len(self.lanes) >= share else 10)
        self._next_balance = time.monotonic() + interval_s
        self.metrics.serving(len(self.lanes), until=self._held_until(started))
        if not self.lanes:
            self.metrics.standby()
            self._in_step = False  # a standby again: waits in _get_in_step

    def _take(self, share: int) -> list[Lane]:
        """Free partitions, their leases taken, until this worker serves ``share``: a
        lane made, and its lease asked for, only where the holders read at once show it
        free (or ours, taken by a turn an error cut short)."""
        taken: list[Lane] = []
        if len(self.lanes) >= share:
            return taken
        candidates = self.pool.candidates(set(self.lanes))
        for k, holder in zip(candidates, self.pool.holders(candidates), strict=True):
            if len(self.lanes) + len(taken) >= share:
                break
            if holder in (None, self.token):
                lane = self._lane(k)
                if (holder := lane.recovery.take_lease()) == self.token:
                    taken.append(lane)
                    continue
            if self.settings.partitions == 1 and holder != self._waiting_for:
                log.info(
                    "waiting: %s holds the lease on %s (one worker per stream and group)",
                    holder,
                    self.keys.partition(k, 1).input,
                )
                self._waiting_for = holder
        return taken

    def _give_back(self, lane: Lane) -> None:
        """Save a partition's windows and hand its lease back, for the worker whose
        share it is now."""
        log.info("giving partition %d back (%s) to the pool", lane.k, lane.keys.input)
        lane.recovery.save(lane.state, lane.scorer.saved)

    def _lane(self, k: int) -> Lane:
        keys = self.keys.partition(k, self.settings.partitions)
        recovery = Recovery(
            self.client, keys=keys, token=self.token, settings=self.settings, metrics=self.metrics
        )
        return Lane(k, keys, recovery, self._empty_state(), self._scorer())

    def _handle(self, entries: dict[int, list[Entry]], *, pending: dict[bytes, int] | None) -> None:
        """Validate, update the windows, forecast (every partition's entries in one model
        call); publish each partition's part with its acks, in one call each.

        ``pending`` is None for a live read (every entry is new to us). While re-syncing
        it maps the entries still pending to their handling attempts so far; the others were
        acked before and are only replayed: into the windows, and after a restore through
        the model and the scoring, unpublished.
        """
        if len(self._series_ids) > self.settings.max_series:  # bounded, like the windows
            self._series_ids.clear()
        series = sum(lane.state.series_count for lane in self.lanes.values())
        parts = []
        for k, read in entries.items():
            state = self.lanes[k].state
            before = state.series_count
            parts.append(
                self._prepare(self.lanes[k], read, pending, self.settings.max_series - series)
            )
            series += state.series_count - before
        self.metrics.served(series=series)
        windows = [part.windows for part in parts]
        yhat, attn = self._forecast(windows[0] if len(windows) == 1 else np.concatenate(windows))
        # One time for the whole batch: Overall weighs a batch by the time since the last
        # one, and takes the calls at the same time as one batch (worker.online.scoring).
        calls, start, scored_at = [], 0, time.monotonic()
        for part in parts:
            end = start + int(part.forecast.sum())
            calls.append(self._call(part, yhat[start:end], attn[start:end], scored_at))
            start = end
        self.pipeline.publish(calls)

    def _make_room(self, lane: Lane, entries: list[Entry], names: int, room: int) -> int:
        """``room`` for a batch of ``names`` values, and the slots of series idle by the
        clock at the batch's first entry, where the batch may not fit: freed now, as the
        next audit would free them. Before, a backlog read faster than the audits ran
        turned new series away with slots of series long idle by the entries' own times:
        3,000 series one second apart, 60-160 of them live at once, with a limit of 200,
        lost 2,800 of their values read as a backlog and none paced (a review)."""
        if names <= room or not entries:
            return room
        state = lane.state
        now_ms = max(entry_ms(entries[0][0]), entry_ms(state.last_id))
        freed = state.sweep(now_ms)
        lane.scorer.forget(freed)
        return room + freed.size

    def _prepare(
        self, lane: Lane, entries: list[Entry], pending: dict[bytes, int] | None, room: int
    ) -> _Part:
        """One partition's entries into its windows: the windows to forecast. ``room``:
        how many more series this worker's windows may hold."""
        state = lane.state
        batch = triage(
            entries,
            pending=pending,
            series_ids=self._series_ids,
            last_id=state.last_id,
            max_attempts=self.settings.max_attempts,
            put_aside=state.put_aside,
            partition=(lane.k, self.settings.partitions),
        )
        slots = state.slots_for(batch.names, self._make_room(lane, entries, len(batch.names), room))
        publish = np.asarray(batch.publish, dtype=bool)
        refused = np.flatnonzero((slots == NO_SLOT) & publish)
        batch.reject(refused, SERIES_LIMIT.format(state.max_series))
        self._log_refused(refused.size)
        # After a restore, entries the saved windows already hold are only acked.
        kept = (slots != NO_SLOT) & ~state.holds(slots, batch.ids)
        values = np.asarray(batch.values, dtype=np.float64)[kept]
        ms = np.fromiter(map(entry_ms, batch.ids), np.int64, len(batch.ids))[kept]
        published = publish[kept]
        wanted = published  # of the kept entries, those to forecast once full
        if pending is not None and state.restored:
            # Re-read after a restore: the entries acked since the checkpoint are forecast
            # again, unpublished, so that each series' scoring, restored as it was saved,
            # goes on as it went (its intervals, the anomalies it finds).
            wanted = np.ones_like(published)
        gather = self.engine is not None and bool(wanted.any())
        full, windows = state.push(slots[kept], values, ms=ms, gather=gather)
        forecast = full & wanted if gather else np.zeros_like(wanted)
        chosen = np.empty((0, self.context))
        if gather:  # most often every full window: then without a copy
            chosen = windows if wanted[full].all() else windows[wanted[full]]
        return _Part(
            lane,
            entries,
            batch,
            slots[kept],
            kept,
            values,
            forecast,
            published,
            chosen,
            state.fresh,
            # Counted once the call applies (Receipt): of a re-sync, the pending entries
            # alone are handled for the first time, the others only back into the windows.
            read=len(entries) if pending is None else sum(i in pending for i, _ in entries),
            warming=int((~forecast & published).sum()),
            refused=refused.size,
        )

    def _call(
        self, part: _Part, yhat: np.ndarray, attn: np.ndarray, scored_at: float
    ) -> tuple[Command | None, Receipt]:
        """One partition's part of a batch, forecast: scored (as of ``scored_at``, the
        batch's time), given intervals, and its fenced call."""
        lane, state, entries = part.lane, part.lane.state, part.entries
        made = np.full((part.forecast.size, self.horizon), np.nan)
        made[part.forecast] = yhat
        scale = np.zeros(part.forecast.size)
        scale[part.forecast] = window_scale(part.windows, self.window)
        scored = lane.scorer.update(
            part.slots,
            part.values,
            made,
            scale,
            scored_at,
            stand_in=functools.partial(self._stand_in, part, made, scale, yhat, attn)
            if self.settings.stand_in_anomalies
            else None,
            fresh=part.fresh,
            counted=None if part.publish.all() else part.publish,
        )
        if scored.count:
            self.metrics.scores_now(self.scores)
        if id_key(entries[-1][0]) > id_key(state.last_id):
            state.last_id = entries[-1][0]
        version = self.engine.version.encode() if self.engine is not None else b""
        positions = np.flatnonzero(part.kept)  # of the kept entries, in the batch
        intervals = lane.scorer.half_width is not None
        out = part.forecast
        if not part.publish.all():  # re-read entries, acked before: published then
            out = part.forecast & part.publish
            sent = part.publish[part.forecast]
            yhat, attn = yhat[sent], attn[sent]
        forecasts = Forecasts(
            positions[out],
            yhat,
            attn,
            scored.lo[out] if intervals else None,
            scored.hi[out] if intervals else None,
        )
        # (batch_call publishes no event of an entry re-read: it was published then)
        anomalies = Anomalies(positions[scored.anomalies], scored.expected, scored.scores)
        # Pieces of the window checkpoint, when due (worker.state): one, or more with a
        # large batch, so that the checkpoint's work follows the batch's own.
        now, saved = time.monotonic(), dict[bytes, bytes]()
        for _ in range(1 + len(entries) // (2 * CHUNK)):
            if (due := state.due_chunk(now, self.settings.checkpoint_interval_s)) is None:
                break
            saved |= state.save_chunk(due, now, lane.scorer.saved)
        if saved:
            self.metrics.checkpointed(time.monotonic() - now)
        if part.batch.aside:
            # Named in this call's meta: a re-read before the checkpoint passes them skips
            # them (worker.state), where it took them in as acked entries and handled
            # the poison again, with no attempt counted: a crash at every start.
            state.put_aside.update(part.batch.aside)
            saved[META] = state.meta()
        call, receipt = batch_call(
            part.batch,
            forecasts,
            lane.recovery.fence,
            maxlen=self.settings.output_maxlen,
            version=version,
            anomalies=anomalies,
            state=saved or None,
            handled=state.last_id,
        )
        counted = replace(
            receipt,
            read=part.read,
            warming=part.warming,
            refused=part.refused,
            scored=scored.count,
        )
        return call, counted

    def _log_refused(self, refused: int) -> None:
        """The entries of new series refused (dead-lettered) at the series limit, counted
        in the log at most once a minute: it said nothing of them, where they may be a
        third of the input and crowd other dead letters out of the capped dead stream."""
        self._refused_unlogged += refused
        now = time.monotonic()
        if self._refused_unlogged and now - self._refused_logged >= REFUSALS_LOG_S:
            idle = self.settings.series_idle_s
            log.warning(
                "%d entries of new series dead-lettered since the last such line: this "
                "worker holds max_series=%d series already; raise max_series, or free the "
                "slots of series gone quiet sooner (series_idle_s, now %s)",
                self._refused_unlogged,
                self.settings.max_series,
                f"{idle:g} s" if idle else "0: never",
            )
            self._refused_logged, self._refused_unlogged = now, 0

    def _stand_in(
        self,
        part: _Part,
        made: np.ndarray,
        scale: np.ndarray,
        yhat: np.ndarray,
        attn: np.ndarray,
        at: np.ndarray,
        values: np.ndarray,
    ) -> None:
        """The anomalies at positions ``at`` of ``part``'s kept values stood in for by
        ``values`` in their windows (worker.online.scoring), and every forecast of ``part``
        whose window held one made again: rewritten in place in ``made`` and ``scale``
        (by kept value) and in ``yhat`` and ``attn`` (by window). What those forecasts
        would have been had each series come one value a batch."""
        state, slots = part.lane.state, part.slots
        rows = np.cumsum(part.forecast) - 1  # each kept value's row of windows, if forecast
        redo = []
        for p, value in zip(at.tolist(), values.tolist(), strict=True):
            later = np.flatnonzero(slots[p:] == slots[p]) + p  # its series, from it on
            if not state.replace(int(slots[p]), later.size - 1, value):
                continue
            back = np.arange(later.size)  # how far before each later value it came
            made_at = part.forecast[later] & (back < self.context)
            later, back = later[made_at], back[made_at]
            part.windows[rows[later], self.context - 1 - back] = value
            redo.append(later)
        if not redo:  # (stand-ins come only from a model's intervals: an engine serves)
            return
        again = np.unique(np.concatenate(redo))
        windows = part.windows[rows[again]]
        made[again], attn[rows[again]] = self._forecast(windows)
        yhat[rows[again]] = made[again]
        scale[again] = window_scale(windows, self.window)

    def _forecast(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.engine is None or windows.shape[0] == 0:
            return np.empty((0, self.horizon)), np.empty((0, self.window))
        started = time.perf_counter()
        yhat, attn = self.engine.forecast(windows)
        self.metrics.inference.observe(time.perf_counter() - started)
        return yhat, attn

    def _histories(self) -> tuple[list[str], list[np.ndarray]]:
        """Every served series' recent values (what a fine-tune learns from)."""
        names: list[str] = []
        values: list[np.ndarray] = []
        for lane in self.lanes.values():
            n, v = lane.state.histories()
            names += n
            values += v
        return names, values

    def _serve(self, checkpoint: Checkpoint | None) -> None:
        """Forecast with ``checkpoint`` from the next batch on (None: no change)."""
        if checkpoint is None:
            return
        switched = self.engine is not None
        if self.engine is None:
            device = resolve_device(self.settings.device)
            self.engine = Engine(checkpoint, device=device, max_batch=self.settings.max_batch)
            log.info("forecasting with model %s on %s", checkpoint.version, device)
        else:
            self.engine.swap(checkpoint)
        for lane in self.lanes.values():  # each model its own spread, and what it reads
            lane.scorer.half_width = self._half_width
            lane.scorer.reads = self._reads
            lane.scorer.model = checkpoint.version
            if switched:  # and each series' multiplier, learned against the one before,
                # from 1 again: kept, one learned against a spread 33x too narrow made
                # the next model's intervals 33x too wide for the 15 s it took to
                # unlearn (every value inside, no anomaly), at every promotion (a review)
                lane.scorer.adaptive.reset()
        self.metrics.model_version(checkpoint.version)

    def _get_in_step(self) -> bool:
        """Take the leases of this worker's share of the partitions, restore their
        windows, re-sync with their groups (see :mod:`worker.recovery`). False while
        other workers hold them all."""
        self.pipeline.reset()
        self.tuner.store.check_key()
        ensure_library(self.client)
        started = time.monotonic()
        strays = self.pool.check_partitions(running=self._running)
        share = self._share = self.pool.share()
        held, self.lanes = self.lanes, {}  # before an error: still ours, if still leased
        for lane in held.values():
            if lane.recovery.take_lease() == self.token:
                self.lanes[lane.k] = lane
            else:  # another's, or another's again: Redis gone back to before we took it
                lane.recovery.check_kept(lane.state.last_id)
                log.warning("partition %d (%s) is no longer ours", lane.k, lane.keys.input)
        if len(self.lanes) < len(held):
            self._report_served()
        # One partition at a start, none past those held at a re-sync: the rest of the
        # share at the first _balance, a third of a lease's life on, once every worker
        # alive has announced itself (each does every third). The first of workers
        # started together saw a pool of one and took every partition, and with
        # max_series sized for its share refused valid series until it gave them back
        # (two workers on a backlog of 40 series, 25 each: 450 of 1,200 entries).
        self.lanes |= {lane.k: lane for lane in self._take(min(share, max(len(self.lanes), 1)))}
        if not self.lanes:
            self.tuner.drop("this worker serves no partition now (a standby)")
            self.metrics.standby()
            self.metrics.unpartitioned.set(strays)  # (logged by the workers that serve)
            self.metrics.connected = True  # Redis answered: the library, the pool's share
            self.metrics.beat()  # a standby is healthy, with a share of none too
            self._sleep(min(self.settings.lease_ttl_ms / 4000, 1.0))
            return False
        self._waiting_for = None
        try:
            self._serve(self.tuner.start(self.engine.checkpoint if self.engine else None))
            if self.reshaped is not None:  # (its leases handed back as it stops)
                self._stopping = True
                return False
        except ValueError:  # no model, and none to come: the leases are not ours to keep
            for lane in self.lanes.values():
                lane.recovery.lease.release()
            raise
        for lane in self.lanes.values():
            self._get_lane_in_step(lane)
        self.pipeline.serve({k: lane.keys for k, lane in self.lanes.items()})
        self._next_balance = time.monotonic() + self.settings.lease_ttl_ms / 3000
        self.metrics.serving(len(self.lanes), until=self._held_until(started))
        self._report_strays(strays)
        self._running = True
        return True

    def _get_lane_in_step(self, lane: Lane) -> None:
        """A partition whose lease was just taken: its windows restored, and re-synced.
        The leases are renewed first, where due: partitions re-synced one after another
        outlasted them (each takes round trips, and an idle one re-reads no page), and
        every re-sync then began again, for ever."""
        self._resync_alive()
        recovery = lane.recovery
        lane.synced = False
        created = recovery.ensure_group()
        recovery.check_kept(lane.state.last_id, group_created=created)
        lane.state = recovery.restore(self._empty_state())
        lane.scorer = self._scorer()
        for slots, saved in lane.state.restored_scoring:
            try:
                lane.scorer.restore(slots, saved)
            except ValueError as e:
                log.error("%s: their intervals start again from the model's spread", e)
        lane.state.restored_scoring.clear()
        recovery.resync(
            lane.state,
            lambda entries, pending: self._at_once(lane, entries, pending),
            keep_alive=self._resync_alive,
        )
        lane.state.reread_done()
        lane.synced = True
        self.metrics.recoveries.inc()

    def _at_once(self, lane: Lane, entries: list[Entry], pending: dict[bytes, int]) -> None:
        """A page of a re-sync: a batch of its pending entries (the others go back into
        the windows only)."""
        if handled := sum(entry_id in pending for entry_id, _ in entries):
            self.metrics.batch_size.observe(handled)
        self._handle({lane.k: entries}, pending=pending)
        self.pipeline.drain()

    def _scorer(self) -> Scorer:
        return Scorer(
            self.scores,
            half_width=self._half_width,
            coverage=self.settings.coverage or 0.5,  # any: with coverage 0 nothing adapts
            threshold=self.settings.anomaly_threshold,
            reads=self._reads,
            model=self.engine.version if self.engine is not None else None,
        )

    @property
    def _half_width(self) -> np.ndarray | None:
        """The served model's spread at the configured coverage; None: intervals off,
        or no model yet."""
        if not self.settings.coverage or self.engine is None:
            return None
        checkpoint = self.engine.checkpoint
        return Spread.from_meta(checkpoint.meta, self.horizon).at(self.settings.coverage)

    @property
    def _reads(self) -> np.ndarray:
        """Which of the values before a forecast the served model reads."""
        config = self.engine.checkpoint.config if self.engine is not None else COLD_START_MODEL
        return one_step_reads(config)

    def _empty_state(self) -> WindowState:
        s = self.settings
        return WindowState(
            window=self.context,
            length=history_kept(s.history_len, self.context, self.horizon, s.finetune_holdout),
            max_series=s.max_series,
            idle_ms=int(s.series_idle_s * 1000),
            history_series=-(-s.history_series // s.partitions),  # the pool's, spread
        )

    def _finish(self) -> bool:
        """At a stop, in step: handle the entries read ahead, and read the last replies
        (the state saved is true only once its last batch is applied). True when the
        windows are still in step with the groups."""
        try:
            if self.pipeline.holds_next:
                self._handle_next_batch()
            self.pipeline.drain()
            for lane in self.lanes.values():
                lane.recovery.account_unread()
        except (OutOfStepError, *REDIS_ERRORS) as e:
            log.warning("%s; what is left is handled at the next start", e)
            return False
        return True

    def _close(self, *, save: bool) -> None:
        self.pipeline.close()
        with contextlib.suppress(*REDIS_ERRORS):  # its process is stopped first: the lock
            self.tuner.close()  # lapses on its own (a stop while Redis is unreachable)
        # A stop during one lane's re-sync leaves the lanes taken with it unrestored: their
        # empty windows saved over their checkpoints forgot them, and the entries put aside.
        refused: ValueError | None = None  # no retry mends it: raised once all is closed
        for lane in self.lanes.values():
            if save and lane.synced:
                try:
                    lane.recovery.save(lane.state, lane.scorer.saved)
                except ValueError as e:
                    refused = refused or e
            else:  # a successor need not wait for its lease to lapse
                with contextlib.suppress(*REDIS_ERRORS):
                    lane.recovery.lease.release()
        with contextlib.suppress(*REDIS_ERRORS):
            self.pool.leave()
        if refused is not None:
            raise refused

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.1))


def _describe(e: Exception, url: str | None) -> str:
    """An error of Redis's in words, with a hint where ``url``'s scheme may be wrong
    (None: no hint)."""
    text = words(e) or type(e).__name__
    text = f"{type(e).__name__}: {text}" if isinstance(e, redis.ConnectionError) else text
    hint = scheme_hint(e, url)
    return f"{text}; {hint}" if hint else text
