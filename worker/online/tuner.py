"""Fine-tuning on a schedule beside the serving path, and keeping every worker on the
serving version.

The worker's main loop sends :meth:`Tuner.events_query` with every read of the input
and hands each batch's events to :meth:`Tuner.sync` (a promotion or a rollback by
anyone takes effect on the next batch), and calls :meth:`Tuner.tick` between batches
(start a fine-tune when one is due, collect a finished one). A fine-tune runs in one
child process at a lower priority with ``finetune_threads`` torch threads, so
inference keeps its cores and never waits for it. One worker fine-tunes at a time: a
lock with a TTL in Redis.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.connection import Connection

import numpy as np
import redis

from attnlstm.checkpoint import Checkpoint, CheckpointError, dumps, loads
from attnlstm.model import ModelConfig
from worker.lease import Lease
from worker.metrics import Metrics
from worker.online.finetune import (
    FinetuneConfig,
    Job,
    NotEnoughDataError,
    Outcome,
    init_process,
    min_points,
    run_job,
)
from worker.online.scoring import Overall
from worker.online.store import SWITCHES, ModelStore
from worker.settings import Settings
from worker.streams import Command, Entry

log = logging.getLogger("attnlstm.worker")

LOCK_TTL_MS = 600_000  # the fine-tune lock's time to live
JOB_TIMEOUT_S = 300.0  # a fine-tune still running after this is stopped (a hung child)
COLD_START_VALUES = 2_000  # values in long-enough series before a first model is trained
COLD_START_MODEL = ModelConfig()  # what a cold start trains, and the windows it keeps

# The series served and each one's recent values (WindowState.histories, of every
# partition the worker serves).
Histories = Callable[[], tuple[list[str], list[np.ndarray]]]


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
    ) -> None:
        """``fits`` raises ValueError for a model the worker cannot serve (it reads or
        forecasts another number of values: :func:`worker.engine.check_fits`); ``clock``
        times the schedule: when fine-tunes are due, and how long one runs."""
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
            ttl_ms=LOCK_TTL_MS,
        )
        self.version: str | None = None  # what this worker serves
        self.context, self.horizon = COLD_START_MODEL.context, COLD_START_MODEL.horizon  # serving
        self._serving: bytes | None = None  # its checkpoint bytes, for the fine-tune job
        self._seen = b"0-0"  # the last models event looked at
        self._trainer: _Trainer | None = None
        self._job_started: float | None = None  # a fine-tune is running
        self._parent: str | None = None  # the version it started from
        self._clock = clock
        self._due = clock() + settings.finetune_interval_s
        self.cycles = 0  # fine-tunes finished
        self.busy_s = 0.0  # their training time, summed
        self._due_check = 0.0  # cold start: when to look at the history again

    # -- which model serves --------------------------------------------------------

    def start(self, file_model: Checkpoint | None) -> Checkpoint | None:
        """The model to serve at start: the store's serving version. A model file is
        promoted (stored, signed with a key, served by every worker) only when the store
        serves none yet, and served here alone while the store's is refused; a restart
        never undoes a promotion, nor does a worker with another file. None: no change,
        or nothing yet (a cold start). ValueError when there is nothing to serve and
        fine-tuning is off, so nothing ever will be."""
        self._seen = self.store.last_event_id()
        serving = self.store.serving()
        if serving is None and file_model is not None:
            blob, _ = dumps(file_model.model, file_model.meta)
            self.store.put(blob, file_model.version)
            if self.store.claim_serving(file_model.version, "promoted", reason="model file"):
                self._seen = self.store.last_event_id()
                return self._adopt(file_model, blob)
            serving = self.store.serving()  # another worker's file, promoted first
        if serving is not None and serving != self.version:
            if file_model is not None and self.version is None and file_model.version != serving:
                path = self.settings.model or "PATH"
                log.warning(
                    "--model %s (model %s) is not served: the store serves %s, promoted "
                    "before this start; to serve the file on every worker: attnlstm models "
                    "promote %s",
                    path,
                    file_model.version,
                    serving,
                    path,
                )
            try:
                return self._adopt(self.store.get(serving))
            except CheckpointError as e:
                self._refuse(serving, e)
        if file_model is not None and self.version is None:
            return self._adopt(file_model)
        if self.version is None and not self.enabled:
            raise ValueError(
                f"no model: none in the store ({self.store.keys.models}), none given; pass "
                "--model PATH (train one with: attnlstm train), or set a finetune interval "
                "for a cold start"
            )
        if self.version is None:
            log.info(
                "no model yet: keeping values, a first model is trained once there are "
                "enough (cold start)"
            )
        return None

    def events_query(self, after: bytes | None = None) -> Command:
        """The read of the models events after ``after`` (None: those not seen yet),
        sent with every read of the input; the events go to :meth:`sync`."""
        return self.store.events_query(after=after or self._seen)

    def sync(self, events: list[Entry]) -> Checkpoint | None:
        """A model to switch to, when one of ``events`` (read by :meth:`events_query`)
        promoted or rolled back to another."""
        if not events:
            return None
        self._seen = events[-1][0]
        switches = [f for _, f in events if f is not None and f.get(b"event") in SWITCHES]
        if not switches or (version := switches[-1][b"version"].decode()) == self.version:
            return None
        try:
            checkpoint = self.store.get(version)
        except CheckpointError as e:
            self._refuse(version, e)
            return None
        log.info("switching to model %s (%s)", version, switches[-1][b"event"].decode())
        return self._adopt(checkpoint)

    def _adopt(self, checkpoint: Checkpoint | None, blob: bytes | None = None) -> Checkpoint | None:
        """``checkpoint`` served from now on, where the worker can serve it."""
        if checkpoint is not None:
            try:
                self._fits(checkpoint)
            except ValueError as e:
                log.error("%s: not served; serving %s unchanged", e, self.version)
                return None
            self.version = checkpoint.version
            self.context, self.horizon = checkpoint.config.context, checkpoint.config.horizon
            self._serving = blob or dumps(checkpoint.model, checkpoint.meta)[0]
        return checkpoint

    def _refuse(self, version: str, error: CheckpointError) -> None:
        log.error("refused model %s: %s; serving %s unchanged", version, error, self.version)
        self.store.event(version, "refused", reason=str(error))

    # -- fine-tuning ---------------------------------------------------------------

    def tick(self, histories: Histories, scores: Overall) -> Checkpoint | None:
        """Collect a finished fine-tune (the candidate, when promoted), or start one
        when it is due. ``histories()``: the recent values of every series served."""
        if not self.enabled:
            return None
        now = self._clock()
        if self.running:
            return self._poll(now)
        cold = self.version is None
        drift = not cold and scores.drifting(self.settings.drift_ratio)
        if cold and not self._first_model_due(histories, now):
            return None
        if not (cold or drift or now >= self._due):
            return None
        if not cold and not _usable_values(histories, self._min_points()):
            self._due = now + self.settings.finetune_interval_s  # too little history yet
            return None
        if self.lock.acquire()[0] != self.lock.token:
            self._due = now + self.settings.finetune_interval_s  # someone else's turn
            return None
        if drift:
            log.info(
                "drift: rolling MAE %.4g is over %.1fx its level %.4g; fine-tuning now",
                scores.mae,
                self.settings.drift_ratio,
                scores.level,
            )
            scores.settle()
        self._submit(histories, cold)
        return None

    @property
    def running(self) -> bool:
        return self._job_started is not None

    def _poll(self, now: float) -> Checkpoint | None:
        assert self._trainer is not None
        assert self._job_started is not None
        if self._trainer.ready():
            return self._collect()
        if now - self._job_started > JOB_TIMEOUT_S:
            self._failed(f"still running after {JOB_TIMEOUT_S:.0f} s: stopped")
            self.close()
            self._due = now + self.settings.finetune_interval_s
        return None

    def _first_model_due(self, histories: Histories, now: float) -> bool:
        if now < self._due_check:
            return False
        self._due_check = now + 1.0  # looking at every history costs: once a second
        return _usable_values(histories, self._min_points()) >= COLD_START_VALUES

    def _min_points(self) -> int:
        return min_points(self.context, self.horizon, self.config.holdout)

    def _submit(self, histories: Histories, cold: bool) -> None:
        names, values = histories()
        job = Job(
            histories=values,
            config=self.config,
            serving=self._serving,
            model_config=COLD_START_MODEL.to_dict(),
        )
        if self._trainer is not None and not self._trainer.alive:
            log.warning("the fine-tuning process had died (%s): starting a new one", self._trainer)
            self._trainer.stop()
            self._trainer = None
        if self._trainer is None:
            self._trainer = _Trainer(self.settings.finetune_threads)
        self._parent = self.version
        what = "training a first model (cold start)" if cold else "fine-tuning"
        log.info("%s on the recent history of %d series", what, len(names))
        try:
            self._trainer.submit(job)
        except OSError as e:  # it died just now: this one fails, the next gets a new one
            self._failed(f"could not hand the job to the fine-tuning process: {e}")
            self._trainer.stop()
            self._trainer = None
            self.lock.release()
            self._due = self._clock() + self.settings.finetune_interval_s
            return
        self._job_started = self._clock()

    def _collect(self) -> Checkpoint | None:
        assert self._trainer is not None
        self._job_started = None
        self._due = self._clock() + self.settings.finetune_interval_s
        self.cycles += 1
        try:
            return self._settle(self._trainer)
        finally:
            self.lock.release()  # after the promotion: the next fine-tune starts from it

    def _settle(self, trainer: _Trainer) -> Checkpoint | None:
        """The finished fine-tune's candidate stored, and promoted if it passed its gate
        and the version it started from still serves."""
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
        self.store.put(outcome.candidate, outcome.version)
        self.store.event(outcome.version, "trained", parent=self._parent, **scores)
        reason = outcome.reason
        if outcome.promote and self.store.promote(
            outcome.version, self._parent, "promoted", reason=reason, **scores
        ):
            log.info("candidate %s promoted: %s", outcome.version, reason)
            self.metrics.finetunes.labels("promoted").inc()
            self._seen = self.store.last_event_id()
            return self._adopt(loads(outcome.candidate), outcome.candidate)
        if outcome.promote:
            reason = (
                f"{self.store.serving()} serves by now, promoted or rolled back to while it "
                f"was fine-tuned from {self._parent}"
            )
        log.info("candidate %s rejected: %s", outcome.version, reason)
        self.metrics.finetunes.labels("rejected").inc()
        self.store.event(outcome.version, "rejected", reason=reason, **scores)
        return None

    def _failed(self, reason: str) -> None:
        """A fine-tune that failed: logged, counted, and an event on the models stream."""
        log.error("fine-tune failed: %s", reason)
        self.metrics.finetunes.labels("failed").inc()
        self.store.event(self.version or "", "failed", reason=reason)

    def close(self) -> None:
        if self._trainer is not None:  # a fine-tune in flight is dropped: it was not promoted
            self._trainer.stop()
            self._trainer = None
        if self._job_started is not None:
            self._job_started = None
            self.lock.release()


def _usable_values(histories: Histories, usable: int) -> int:
    """Values in the series whose history (at least ``usable`` long) a fine-tune uses."""
    return sum(len(h) for h in histories()[1] if len(h) >= usable)


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


class _Trainer:
    """One child process that runs fine-tunes sent over a pipe, for as long as the
    worker runs. (A multiprocessing Pool terminated in the middle of a job leaks a
    semaphore and says so at exit; a pipe has none.)"""

    def __init__(self, threads: int) -> None:
        context = get_context("spawn")
        self._conn, child = context.Pipe()
        self._proc = context.Process(
            target=_serve, args=(child, threads), name="attnlstm-finetune", daemon=True
        )
        self._proc.start()
        child.close()

    def submit(self, job: Job) -> None:
        self._conn.send(job)

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    def __str__(self) -> str:
        code = self._proc.exitcode
        return f"pid {self._proc.pid}, " + ("running" if code is None else f"exit code {code}")

    def ready(self) -> bool:
        """A result is waiting (or the process died: then result() raises EOFError or
        ConnectionResetError)."""
        return self._conn.poll()

    def result(self) -> Outcome:
        ok, value = self._conn.recv()
        if not ok:
            raise value
        outcome: Outcome = value
        return outcome

    def stop(self) -> None:
        self._proc.terminate()
        self._proc.join()
        self._conn.close()


def _serve(conn: Connection, threads: int) -> None:
    init_process(threads)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the worker has gone
            return
        try:
            conn.send((True, run_job(job)))
        except Exception as e:  # sent back, to be logged by the worker
            conn.send((False, e))
