"""Fine-tuning on a schedule beside the serving path, and keeping every worker on the
serving version.

The worker's main loop sends :meth:`Tuner.events_query` with every read of the input
and hands each batch's events to :meth:`Tuner.sync` (a promotion or a rollback by
anyone takes effect on the next batch), and calls :meth:`Tuner.tick` between batches
(start a fine-tune when one is due, collect a finished one). A fine-tune runs in one
child process at a lower priority with ``finetune_threads`` torch threads, so
inference keeps its cores and never waits for it: not even for a new process, which
imports torch for seconds before it reads its first job (the job waits, polled between
batches). One worker fine-tunes at a time: a lock with a TTL in Redis.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Literal

import numpy as np
import redis

from attnlstm.checkpoint import VERSION_HEX, Checkpoint, CheckpointError, dumps, loads
from attnlstm.model import ModelConfig
from worker.engine import ShapeError
from worker.lease import Lease
from worker.metrics import Metrics
from worker.online.finetune import FinetuneConfig, Job, NotEnoughDataError, min_points
from worker.online.scoring import Overall
from worker.online.store import SWITCHES, ModelStore, check_size
from worker.online.trainer import Trainer
from worker.settings import Settings
from worker.streams import NOT_A_COUNT, WRONG_TYPE, Command, Entry, refused_for

log = logging.getLogger("attnlstm.worker")

# The fine-tune lock's time to live (or the stream leases', when longer), renewed with
# them while its fine-tune runs: a worker killed mid-fine-tune held it for the ten
# minutes it lived, and no worker fine-tuned until then, without a word.
LOCK_TTL_MS = 60_000
JOB_TIMEOUT_S = 300.0  # a fine-tune with no result after this is stopped (a hung child)
COLD_START_VALUES = 2_000  # values in long-enough series before a first model is trained
COLD_START_MODEL = ModelConfig()  # what a cold start trains, and the windows it keeps
# A fine-tune that could not start (too little history, the lock held elsewhere) is
# tried again after this long: a cold start, or after a drift. Each try copies every
# history (0.15 s for 10,000 series of 200 values), too much for every batch.
COLD_RETRY_S = 1.0
DRIFT_RETRY_S = 10.0

# What a version in a models event must be: a model's content hash (version_of).
VERSION = re.compile(rb"[0-9a-f]{%d}" % VERSION_HEX)

# Why a fine-tune starts: a first model (cold), a drift, or the schedule.
Trigger = Literal["cold", "drift", "schedule"]

# The series served and each one's recent values (WindowState.histories, of every
# partition the worker serves).
Histories = Callable[[], tuple[list[str], list[np.ndarray]]]


# What a worker with no model, and no cold start, is told to do.
NO_MODEL_FIX = (
    "pass --model PATH (train one with: attnlstm train), or set a finetune interval for a "
    "cold start"
)


class Tuner:
    def __init__(
        self,
        client: redis.Redis,
        *,
        settings: Settings,
        store: ModelStore,
        metrics: Metrics,
        fits: Callable[[Checkpoint], None],
        clock: Callable[[], float] = time.monotonic,
        from_store: bool = False,
    ) -> None:
        """``fits`` raises ValueError for a model the worker cannot serve (it reads or
        forecasts another number of values: :func:`worker.engine.check_fits`); ``clock``
        times the schedule: when fine-tunes are due, and how long one runs;
        ``from_store``: the model given at start is the store's (a worker made again with
        its shape), not a file's."""
        self.settings = settings
        self._fits = fits
        self.metrics = metrics
        self.store = store
        if store.key is None:
            log.warning(
                "no model key (model_key_file): the model store is unauthenticated, and "
                "anyone who can write to its Redis can change the model every worker serves"
            )
        self.enabled = settings.finetune_interval_s > 0
        self.config = FinetuneConfig(
            steps=settings.finetune_steps,
            lr=settings.finetune_lr,
            holdout=settings.finetune_holdout,
            margin=settings.promote_margin,
        )
        self.lock = Lease(
            client,
            key=settings.keys.finetune_lock,
            fence_key=settings.keys.finetune_fence,
            owner=settings.consumer,
            ttl_ms=max(LOCK_TTL_MS, settings.lease_ttl_ms),
        )
        self.version: str | None = None  # what this worker serves
        self.context, self.horizon = COLD_START_MODEL.context, COLD_START_MODEL.horizon  # serving
        self._serving: bytes | None = None  # its checkpoint bytes, for the fine-tune job
        self._refused: str | None = None  # the store's serving version, not served here
        # The store's serving model, of another shape than this worker's, where it has no
        # model of its own: served by a worker made again with its shape (worker.app).
        self.reshape: Checkpoint | None = None
        self.from_store = from_store
        self._seen = b"0-0"  # the last models event looked at
        self._trainer: Trainer | None = None
        self._job: Job | None = None  # the fine-tune waiting for its process to start
        self._job_started: float | None = None  # a fine-tune is running
        self._lock_renewed = 0.0  # when its lock was last taken or renewed
        self._lock_lost = False  # and found another's since
        self._lock_owed = False  # its lock to release still (a release Redis did not take)
        self._parent: str | None = None  # the version it started from
        self._clock = clock
        self._due = clock() + settings.finetune_interval_s  # the next on the schedule
        self._tried = False  # a fine-tune has started: a cold start keeps the schedule since
        self._cold_at = 0.0  # when a cold start is tried again
        self._drift_at = 0.0  # when a drift fine-tune is tried again
        self._scored_at: int | None = None  # values scored as the last fine-tune began
        self._idle_said = False  # and that none came since, logged
        self._lock_logged: str | None = None  # the refusal of the lock last logged
        self.cycles = 0  # fine-tunes finished
        self.busy_s = 0.0  # their training time, summed

    # -- which model serves --------------------------------------------------------

    def start(self, file_model: Checkpoint | None) -> Checkpoint | None:
        """The model to serve at start: the store's serving version. A model file is
        promoted (stored, signed with a key, served by every worker) only when the store
        serves none yet, and served here alone while the store's is refused; a restart
        never undoes a promotion, nor does a worker with another file. At a re-sync,
        ``file_model`` is the model served here (the loop's engine's). None: no change,
        or nothing yet (a cold start). ValueError when there is nothing to serve and
        fine-tuning is off, so nothing ever will be.

        Run again at every re-sync: what was refused is looked at afresh (the store may
        have lost its models keys since, in a Redis restart without persistence, or an
        operator cleared them), and refused again if it still serves. A refusal kept
        from before left the worker never fine-tuning again, or with no model never
        training one (/healthz 503 for good), against a store that served nothing."""
        self._refused = None
        self.metrics.no_model = None
        self._seen = self.store.last_event_id()
        serving = self.store.serving()
        if serving is None and file_model is not None:
            # Stored under the version of its bytes, which is not the one served here for
            # a model that an older release stored (Checkpoint.former_version).
            blob, version = dumps(file_model.model, file_model.meta)
            file_model = replace(file_model, version=version)
            # At a re-sync, the model this worker serves (its file, or a version it switched
            # to since), on a store that lost its keys: the fleet goes on with it.
            reason = "model file" if self.version is None else "served here; the store had none"
            if self.store.promote(blob, file_model.version, None, "promoted", reason=reason):
                # _seen stays: its own `promoted` event changes nothing when read, and a
                # promotion or rollback written after it must be read, not skipped.
                return self._adopt(file_model, blob)
            serving = self.store.serving()  # another worker's file, promoted first
        if serving is not None and serving != self.version:
            # A model of the store's (a worker made again with its shape) is no file: it
            # takes another shape again, should one serve by now.
            own_file = file_model is not None and not self.from_store
            starting = self.version is None
            if (checkpoint := self._switch(serving, reshape=not own_file)) is not None:
                self._file_not_served(file_model, serving, starting=starting)
                return checkpoint
            if self.reshape is not None:
                return None
        if file_model is not None and self.version is None:
            self._file_alone(file_model)
            return self._adopt(file_model)
        if self.version is None and not self.enabled:
            raise ValueError(f"no model: {self._store_holds()}, none given; {NO_MODEL_FIX}")
        if self.version is None and self._refused is not None:
            self._no_cold_start()
        elif self.version is None:
            log.info(
                "no model yet: keeping values, a first model is trained once there are "
                "enough (cold start)"
            )
        return None

    def _store_holds(self) -> str:
        """What the store holds for a worker with no model: said wrong, "none in the
        store", where it served one this worker had just refused (a review)."""
        if self._refused is None:
            return f"none in the store ({self.store.keys.models})"
        return f"the store serves model {self._refused}, refused above"

    def _file_not_served(
        self, file_model: Checkpoint | None, serving: str, *, starting: bool
    ) -> None:
        """A warning where this worker's model file, at its start, is not what serves:
        the store's version, served instead."""
        if file_model is None or not starting:
            return
        if serving in (file_model.version, file_model.former_version):  # (the file, stored
            return  # by an older release under the version it gave it)
        if self.from_store:  # the store's: a worker made again with its shape
            return
        path = self.settings.model or "PATH"
        log.warning(
            "--model %s (model %s) is not served: the store serves %s, promoted before this "
            "start; to serve the file on every worker: attnlstm models promote %s",
            path,
            file_model.version,
            serving,
            path,
        )

    def _file_alone(self, file_model: Checkpoint) -> None:
        """A warning where this worker serves its model file because the store's version
        was refused at its start: the log said the file was "not served" (the warning
        for a file the store's version replaces), then forecast with it, and never said
        that fine-tunes stop (a review)."""
        if self._refused is None:
            return
        log.warning(
            "serving --model %s (model %s) here alone: the store serves %s, refused above%s. "
            "Serve one this worker can: attnlstm models rollback VERSION, or attnlstm models "
            "promote PATH",
            self.settings.model or "PATH",
            file_model.version,
            self._refused,
            "; no fine-tunes while it does" if self.enabled else "",
        )

    def events_query(self, after: bytes | None = None) -> Command:
        """The read of the models events after ``after`` (None: those not seen yet),
        sent with every read of the input; the events go to :meth:`sync`."""
        return self.store.events_query(after=after or self._seen)

    def recheck(self) -> Checkpoint | None:
        """For a worker that waits with no model: the store looked at again, as at a start,
        once it serves another version than the one refused (its pointer changed with no
        event: deleted, or set by hand), and nothing while it serves that one."""
        if self.store.serving() == self._refused:
            return None
        return self.start(None)

    def new_events(self) -> list[Entry]:
        """The models events not seen yet, read now: for a worker that reads no input,
        whose reads bring them (:meth:`events_query`)."""
        return self.store.events(after=self._seen)

    def sync(self, events: list[Entry]) -> Checkpoint | None:
        """A model to switch to, when one of ``events`` (read by :meth:`events_query`)
        promoted or rolled back to another."""
        if not events:
            return None
        self._seen = events[-1][0]
        switch = _last_switch(events)
        if switch is None:
            return None
        named, event = switch
        # What the store serves is its pointer's, not the event's: an event read late names
        # a version pruned since, and one written by hand any version at all. Refused, it
        # stopped every worker's fine-tunes, and "the store serves" in the log was untrue.
        version = self.store.serving()
        if version != named:
            log.warning(
                "a %s event names model %s, but the store serves %s: following the store",
                event,
                named,
                version,
            )
        if version is None or version == self.version:  # nothing refused now
            self._refused = None
            return None
        checkpoint = self._switch(version, reshape=True)
        if checkpoint is not None:
            log.info("switched to model %s (%s)", version, event)
        elif self.version is None and self.reshape is None:
            self._no_cold_start()
        return checkpoint

    def _switch(self, version: str, *, reshape: bool = False) -> Checkpoint | None:
        """The store's serving ``version``, served from now on; None where it is refused
        (missing, damaged, forged, or it does not fit this worker), which serves what it
        served, with a `refused` event (without one, `models list` showed it serving).
        Of another shape, where this worker serves no model and has no file (``reshape``),
        it is :attr:`reshape`: a worker with no model of its own, started with the cold
        start's shape, refused every other shape for good (the docker-compose default,
        after a model of another window was promoted), and acked its input unforecast."""
        try:
            checkpoint = self.store.get(version)
            try:
                self._fits(checkpoint)
            except ValueError as e:
                if not (reshape and self.version is None):
                    raise
                log.info("the store serves %s; the worker takes its shape", e)
                self.reshape = checkpoint
                return None
        except (CheckpointError, ValueError) as e:
            unchanged = f"; serving {self.version} unchanged" if self.version else ""
            log.error("refused model %s: %s%s", version, e, unchanged)
            # The shape this worker runs, for `models promote` to compare the next with.
            runs = {"runs": json.dumps(list(e.runs))} if isinstance(e, ShapeError) else {}
            self.store.event(version, "refused", reason=str(e), **runs)
            self._refused = version
            if self.version is not None and self.enabled:
                log.warning(
                    "no fine-tunes while the store serves %s: a candidate from %s would not "
                    "be promoted over it",
                    version,
                    self.version,
                )
            return None
        self._refused = None
        return self._adopt(checkpoint)

    def _adopt(self, checkpoint: Checkpoint, blob: bytes | None = None) -> Checkpoint:
        """``checkpoint`` served from now on: the store's, once it fits (:meth:`_switch`),
        this worker's model file, or a candidate fine-tuned from what it serves."""
        self.version = checkpoint.version
        self.metrics.no_model = None
        self.context, self.horizon = checkpoint.config.context, checkpoint.config.horizon
        self._serving = blob or dumps(checkpoint.model, checkpoint.meta)[0]
        return checkpoint

    def _no_cold_start(self) -> None:
        """A worker with no model, where the store serves one it refused: a first model
        trained here could never be promoted (only while none serves), so none is. It
        forecasts nothing until an operator acts: /healthz says so (503)."""
        self.metrics.no_model = (
            f"the store serves model {self._refused}, which this worker cannot serve"
        )
        log.error(
            "no model: the store serves model %s, which this worker cannot serve, and a "
            "first model trained here would not replace it: no cold start while it serves. "
            "Serve one this worker can: attnlstm models rollback VERSION, or attnlstm models "
            "promote PATH",
            self._refused,
        )

    # -- fine-tuning ---------------------------------------------------------------

    def tick(
        self, histories: Histories, scores: Overall, *, start: bool = True
    ) -> Checkpoint | None:
        """Collect a finished fine-tune (the candidate, when promoted), or start one
        when it is due and ``start`` (False as the worker stops: one started then was
        killed at once). ``histories()``: the recent values of every series served."""
        if not self.enabled:
            return None
        now = self._clock()
        if self.running:
            return self._poll(now)
        trigger = self._trigger(now, scores) if start else None
        if trigger is None:
            self._not_due()
            return None
        if self._nothing_new(trigger, scores):
            return None
        if not self._lock_free():
            self._put_off(trigger, now)  # another's turn: no histories copied for nothing
            return None
        names, values = histories()
        usable = _usable_values(values, self._min_points())
        if usable < (COLD_START_VALUES if trigger == "cold" else 1):
            if trigger != "cold":  # (a cold start waits for its values, as it says at start)
                # Said, or fine-tunes that never ran (series that live shorter) said nothing.
                log.info(
                    "fine-tune put off: none of the %d series served holds the %d values a "
                    "fine-tune needs",
                    len(names),
                    self._min_points(),
                )
                # Nothing scored since the start: a wait for input (a worker up before its
                # producers fired the stalled alert 45 minutes on: a review). Values
                # scored, and series that never hold enough: a stall, for the alert.
                self.metrics.finetune_waiting.set(scores.scored == 0)
            self._put_off(trigger, now)
            return None
        if not self._take_lock():
            self._put_off(trigger, now)  # another's turn
            return None
        if trigger == "drift":
            log.info(
                "drift: rolling MAE %.4g is over %.1fx its level %.4g; fine-tuning now",
                scores.mae,
                self.settings.drift_ratio,
                scores.level,
            )
            scores.settle()
        self._scored_at, self._idle_said = scores.scored, False
        self._submit(names, values, trigger)
        return None

    def _not_due(self) -> None:
        """No fine-tune starts now. Where that is for a model the store serves and this
        worker refused, it is a stall, not a wait for input: left at 1 from an idle
        stream, the gauge hid it from the stalled alert (a review)."""
        if self._refused is not None:
            self.metrics.finetune_waiting.set(0)

    def _nothing_new(self, trigger: Trigger, scores: Overall) -> bool:
        """True, and the fine-tune held until a value is scored, where none was since the
        last one began: the same values, the same candidate. An idle worker promoted four
        versions from one history (each pushed a stored version a rollback goes back to
        out), then trained one and rejected it at every turn, for ever; and undid a
        rollback by hand within seconds (a review). Held, not put off to the next turn:
        it starts with the first value scored, not up to an interval after."""
        waiting = trigger != "cold" and scores.scored == self._scored_at
        self.metrics.finetune_waiting.set(waiting)  # (the stalled alert fired on an idle
        if waiting and not self._idle_said:  # stream, at 45 minutes: a review)
            log.info("fine-tune put off: no value has been scored since the last one")
            self._idle_said = True
        return waiting

    def keep_lock(self) -> None:
        """The fine-tune lock renewed while a fine-tune runs, a third of its life after
        the last time: wherever the worker renews its leases, through a long re-sync too.
        Where another worker holds it by then (this one frozen, or cut off from Redis,
        past its life), the fine-tune goes on, as a warning says: its candidate is
        promoted only over the version it started from, whichever finishes first."""
        now = self._clock()
        if not self.running or now - self._lock_renewed < self.lock.ttl_ms / 3000:
            return
        self._lock_renewed = now
        if not self._take_lock() and not self._lock_lost:
            self._lock_lost = True
            log.warning(
                "the fine-tune lock lapsed, and another holds it: this fine-tune goes on "
                "beside that one, and the first to finish is promoted over the version both "
                "started from (if they did), the other rejected"
            )

    def _lock_free(self) -> bool:
        """Whether the fine-tune lock is free or this worker's, read before the histories
        are copied (0.15 s for 10,000 series, on the serving thread): a drift while another
        worker fine-tuned copied them every 10 s to find the lock held. The lock is taken
        after, in one step that a worker quicker in between wins."""
        try:
            return self.lock.holder() in (None, self.lock.token)
        except redis.ResponseError as e:
            if not self._lock_refused(e):
                raise
            return False

    def _take_lock(self) -> bool:
        """Whether this worker has the fine-tune lock now (taken, or renewed)."""
        try:
            turn = self.lock.acquire()[0] == self.lock.token
        except redis.ResponseError as e:
            if not self._lock_refused(e):
                raise
            return False
        self._lock_logged = None
        return turn

    def _lock_refused(self, e: redis.ResponseError) -> bool:
        """True where Redis refused the fine-tune lock for a value of another making in
        its key or fence (anyone with the worker's password can plant one), with an error
        in the log, once until it changes: fine-tuning waits, and serving goes on. That
        refusal used to go up to the main loop, which stopped the worker."""
        if not refused_for(e, WRONG_TYPE, NOT_A_COUNT):
            return False
        if str(e) != self._lock_logged:
            log.error(
                "Redis refused the fine-tune lock (%s, fence %s): %s; delete the one that "
                "holds something else. Fine-tuning waits until then; serving goes on",
                self.lock.key,
                self.lock.fence_key,
                e,
            )
            self._lock_logged = str(e)
        return True

    def _release(self) -> None:
        try:
            self.lock.release()
        except redis.ResponseError as e:
            if not self._lock_refused(e):
                raise
        self._lock_owed = False

    @property
    def running(self) -> bool:
        return self._job_started is not None

    def _trigger(self, now: float, scores: Overall) -> Trigger | None:
        """Why a fine-tune starts now, if one does: none while the store serves a version
        this worker refused (a candidate from here is promoted only over the version
        that serves). With no model: the first as soon as there are values, the next
        ones on the schedule. With one: a drift, or the schedule."""
        if self._refused is not None:
            return None
        if self.version is None:
            waiting = now < self._cold_at or (self._tried and now < self._due)
            return None if waiting else "cold"
        if now >= self._drift_at and scores.drifting(self.settings.drift_ratio):
            return "drift"
        return "schedule" if now >= self._due else None

    def _put_off(self, trigger: Trigger, now: float) -> None:
        """A fine-tune that could not start now is tried again later, not at every batch."""
        if trigger == "cold":
            self._cold_at = now + COLD_RETRY_S
        elif trigger == "drift":
            self._drift_at = now + DRIFT_RETRY_S
        else:
            self._due = now + self.settings.finetune_interval_s

    def _min_points(self) -> int:
        return min_points(self.context, self.horizon, self.config.holdout)

    def _submit(self, names: list[str], values: list[np.ndarray], trigger: Trigger) -> None:
        """The fine-tune begun (the lock is held): its process started where there is
        none, and the job handed to it once it has (:meth:`_hand_over`)."""
        self._tried = True
        self._parent = self.version
        self._job_started = self._lock_renewed = self._clock()
        self._lock_lost = False
        what = "training a first model (cold start)" if trigger == "cold" else "fine-tuning"
        log.info("%s on the recent history of %d series", what, len(names))
        if self._trainer is not None and not self._trainer.alive:
            log.warning("the fine-tuning process had died (%s): starting a new one", self._trainer)
            self._trainer.stop()
            self._trainer = None
        if self._trainer is None:
            try:
                self._trainer = Trainer(self.settings.finetune_threads)
            except OSError as e:  # out of processes, or of file descriptors
                self._end(f"could not start the fine-tuning process: {e}")
                return
        self._job = Job(
            histories=values,
            config=self.config,
            serving=self._serving,
            model_config=COLD_START_MODEL.to_dict(),
        )
        self._hand_over(self._trainer, self._job)

    def _hand_over(self, trainer: Trainer, job: Job) -> None:
        """``job`` sent, once its process has started: a new one imports torch for
        seconds first, and the serving thread polls it between batches, not waits."""
        try:
            if not trainer.started():
                return
            trainer.submit(job)
        except (EOFError, OSError):  # it died as it started, or just now
            self._end("the fine-tuning process died before it had the job")
            return
        self._job = None  # the process has it: the histories are not held here

    def _poll(self, now: float) -> Checkpoint | None:
        trainer, started = self._trainer, self._job_started
        assert trainer is not None
        assert started is not None
        if self._job is not None:
            self._hand_over(trainer, self._job)
        elif trainer.done():
            return self._collect()
        if self.running and now - started > JOB_TIMEOUT_S:
            self._end(f"still running after {JOB_TIMEOUT_S:.0f} s: stopped")
        return None

    def _end(self, reason: str) -> None:
        """A fine-tune that failed before its result: its process stopped (the next
        fine-tune starts a new one), the lock released, the next one on the schedule."""
        self.metrics.finetune_ended.set_to_current_time()  # (before what may raise)
        self._failed(reason)
        self.close()
        self._due = self._clock() + self.settings.finetune_interval_s

    def _collect(self) -> Checkpoint | None:
        assert self._trainer is not None
        self._job_started = None
        self._due = self._clock() + self.settings.finetune_interval_s
        self.cycles += 1
        try:
            return self._settle(self._trainer)
        finally:
            self.metrics.finetune_ended.set_to_current_time()  # (before what may raise)
            self._lock_owed = True  # until released: a failed release is tried again
            self._release()  # after the promotion: the next fine-tune starts from it

    def _settle(self, trainer: Trainer) -> Checkpoint | None:
        """The finished fine-tune's candidate promoted (and stored) if it passed its
        gate and the version it started from still serves; else rejected, and not
        stored: it would push out the versions a rollback goes back to."""
        try:
            outcome = trainer.result()
        except NotEnoughDataError as e:
            log.info("fine-tune skipped: %s", e)
            self.metrics.finetunes.labels("skipped").inc()
            return None
        except (EOFError, OSError):  # its end of the pipe closed, or was reset
            self._failed(f"the fine-tuning process died ({trainer}); a new one starts")
            trainer.stop()
            self._trainer = None
            return None
        except Exception as e:  # the child's failure must not stop the serving path
            self._failed(f"{type(e).__name__}: {e}")
            return None
        self.busy_s += outcome.scores["seconds"]
        scores = {k: _round(v) for k, v in outcome.scores.items()}
        self.store.event(outcome.version, "trained", parent=self._parent, **scores)
        reason, promote = outcome.reason, outcome.promote
        if promote:
            try:  # the store would refuse it, failing the worker with the lock held
                check_size(len(outcome.candidate), f"candidate {outcome.version}")
            except CheckpointError as e:
                reason, promote = str(e), False
        if promote and self.store.promote(
            outcome.candidate, outcome.version, self._parent, "promoted", reason=reason, **scores
        ):
            log.info("candidate %s promoted: %s", outcome.version, reason)
            self.metrics.finetunes.labels("promoted").inc()
            # _seen stays, as at start: an event written after its own must not be skipped.
            return self._adopt(loads(outcome.candidate), outcome.candidate)
        if promote:
            reason = self._overtaken()
        log.info("candidate %s rejected: %s", outcome.version, reason)
        self.metrics.finetunes.labels("rejected").inc()
        self.store.event(outcome.version, "rejected", reason=reason, **scores)
        return None

    def _overtaken(self) -> str:
        """Why a candidate that passed its gate was not promoted."""
        serving = self.store.serving()
        if serving == self._parent:  # newer versions stored meanwhile pushed it out
            return "it was no longer stored when it was to be promoted"
        if self._parent is None:
            return f"{serving} serves by now: a first model is promoted only while none serves"
        return f"{serving} serves by now, not {self._parent}, which it was fine-tuned from"

    def _failed(self, reason: str) -> None:
        """A fine-tune that failed: logged, counted, and an event on the models stream."""
        log.error("fine-tune failed: %s", reason)
        self._scored_at = None  # no candidate came of it: the next may take the same values
        self.metrics.finetunes.labels("failed").inc()
        self.store.event(self.version or "", "failed", reason=reason)

    def drop(self, why: str) -> None:
        """The fine-tune in flight, if any, dropped where this worker stops serving
        (``why``): its process stopped, and the lock released for the worker that serves
        now. Left to run, it held the lock for up to ten minutes (no other worker could
        fine-tune), past its timeout (checked only between batches), and its candidate,
        trained on values of long before, was promoted when this worker served again."""
        if self.running:
            log.warning("fine-tune dropped: %s", why)
            self._due = self._clock() + self.settings.finetune_interval_s
            self._scored_at = None  # (nor of this one)
        self.close()  # (a release that failed is tried again, at the next drop)

    def close(self) -> None:
        if self._trainer is not None:  # a fine-tune in flight is dropped: it was not promoted
            self._trainer.stop()
            self._trainer = None
        self._job = None
        if self._job_started is not None:
            self._job_started = None
            self._lock_owed = True
        if self._lock_owed:
            self._release()


def _usable_values(values: list[np.ndarray], usable: int) -> int:
    """Values in the series whose history (at least ``usable`` long) a fine-tune uses."""
    return sum(len(h) for h in values if len(h) >= usable)


def _last_switch(events: list[Entry]) -> tuple[str, str] | None:
    """The version and event of the last of ``events`` that changed the serving version;
    one that names no version, or something else than a version (not UTF-8 text, not 16
    hex digits), is logged and skipped (anyone who can write to the stream can write
    one: it must not stop the worker)."""
    last = None
    for entry_id, fields in events:
        if fields is None or (event := fields.get(b"event")) not in SWITCHES:
            continue
        if (version := fields.get(b"version")) is None or not VERSION.fullmatch(version):
            named = "no version" if version is None else f"{version!r}, not a model version"
            log.warning(
                "models event %s (%s) names %s: skipped", entry_id.decode(), event.decode(), named
            )
            continue
        last = version.decode(), event.decode()
    return last


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)
