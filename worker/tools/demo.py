"""``attnlstm demo``: the whole product in one command.

A Redis (embedded unless a URL is set), a model (trained on sines, or the cached one),
the worker in a thread and a replay in its own process for ``seconds``; then the
forecasts are read back from the output stream, drawn and summed up.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import numpy as np
import redis
import torch
from redis.exceptions import LockError
from redis.lock import Lock
from tqdm import tqdm

from attnlstm.checkpoint import CheckpointError, load, save
from attnlstm.data import DataError, load_csv, load_dataset
from attnlstm.experiment import (
    SEASONAL_WEIGHT_DECAY,
    dataset_config,
    train_model,
    training_meta,
)
from attnlstm.plots import plot_error_over_time
from attnlstm.synthetic import SineSpec, make_sines
from attnlstm.train import TrainConfig
from attnlstm.windows import HELD_OUT, split_point
from worker.app import build_engine
from worker.contract import Fields
from worker.embedded import die_with_parent, url_or_embedded
from worker.engine import Engine
from worker.keys import Keys
from worker.loop import Worker
from worker.metrics import Metrics
from worker.online.store import ModelStore
from worker.settings import Settings
from worker.signals import STOP_SIGNALS, deaf_children, handled
from worker.streams import connect, group_info
from worker.tools.readback import SeriesView, Views, draw, errors_by_time, read_views, summary
from worker.tools.replay import (
    MAX_SINE_VALUES,
    check_sine_size,
    count_csv,
    csv_entries,
    replay,
    series_id,
    sine_entries,
)
from worker.tools.served import Served

log = logging.getLogger("attnlstm.demo")

DEMO_KEYS = Keys.prefixed("demo:")  # beside a live system's, on a server given by URL
DEMO_LOCK = "demo:lock"  # held by the demo running on a server (see _only_demo)
LOCK_TTL_S = 30.0  # how long a demo's lock outlives a demo killed without its exit
SHOWN = 3  # series drawn in forecasts.png
CATCH_UP_S = 60.0  # longest wait for the worker to finish after the replay


@dataclass(frozen=True)
class DemoPlan:
    seconds: float = 60.0  # replay length
    series: int = 50  # sine series
    rate: float | None = 500.0  # entries/s; None: as fast as Redis takes them
    bad_rate: float = 0.002  # malformed entries among the sines, for the dead stream
    seed: int = 1  # the replayed sines' seed (the model trains on seed 0's)
    csv: Path | None = None  # replay this file instead, with a model trained on it
    points: int = 200  # forecasts drawn per series
    noise: float = 0.0  # sine noise std, in amplitudes
    drift_at: int | None = None  # step where every sine's frequency changes

    def __post_init__(self) -> None:
        """Data the replay would refuse, refused now: before the model is trained or a
        server started, not in the replay's process once the worker runs."""
        if self.csv is not None:
            count_csv(self.csv)  # the whole file, as the replay reads it
            return
        if self.entries > MAX_SINE_VALUES:
            raise ValueError(
                f"the sines to replay (--seconds x rate: {self.entries:.3g} entries) are more "
                f"than the {MAX_SINE_VALUES:,} values a replay draws at once: a lower --seconds "
                "or --rate"
            )
        spec = self.sines()
        try:  # one series is checked as every one would be, in a fraction of the memory
            check_sine_size(spec)
            make_sines(replace(spec, n_series=1))
        except ValueError as e:
            raise ValueError(
                f"the sines to replay ({spec.n_points} points a series: --seconds x rate "
                f"/ --series): {e}"
            ) from None

    @property
    def entries(self) -> float:
        """The sines' entries: ``seconds`` at ``rate`` (at 1000/s for --fast); inf past
        the floats' range."""
        return self.seconds * (self.rate or 1000.0)

    def sines(self) -> SineSpec:
        """The replayed sines: enough points for ``seconds`` at ``rate``."""
        points = int(self.entries / self.series) + 1
        return SineSpec(
            n_series=self.series, n_points=max(points, 2), noise=self.noise, drift_at=self.drift_at
        )


def run_demo(
    settings: Settings, plan: DemoPlan, out_dir: Path, *, progress: bool
) -> dict[str, Any]:
    """The demo; Ctrl-C stops it with the report so far (and SIGTERM and SIGHUP, where
    they raise KeyboardInterrupt, as the command line makes them)."""
    settings = settings.with_keys(DEMO_KEYS).model_copy(update={"metrics_port": 0})
    with url_or_embedded(settings.url()) as url:
        client = connect(
            url,
            socket_timeout_s=settings.socket_timeout_s,
            client_name="demo",
            cluster=settings.cluster,
        )
        try:
            # Redis reached and the lock held before the model trains (15 s): a demo
            # refused, or with no Redis to run on, said so only after it.
            with _only_demo(client):
                model = _model(out_dir, plan, progress)
                settings = settings.model_copy(update={"model": model})
                engine = build_engine(settings)
                assert engine is not None  # the demo always has its model file
                first_version = engine.version
                report, views, events, worker = _live(client, url, engine, settings, plan, progress)
        finally:
            client.close()
    report |= _online(worker, events)
    if not views:
        return report | {"written": []}
    shown = sorted(views, key=_natural)[:SHOWN]
    label = f"demo ({plan.csv.name if plan.csv else 'sines'}, model {first_version})"
    written = draw(views, out_dir, shown=shown, points=plan.points, label=label)
    written.append(_draw_errors(views, events, report, plan, out_dir))
    report["written"] = [str(p) for p in written]
    if plan.csv is not None:
        report |= _held_out(views, plan.csv)
    return report


def _live(
    client: redis.Redis,
    url: str,
    engine: Engine,
    settings: Settings,
    plan: DemoPlan,
    progress: bool,
) -> tuple[dict[str, Any], Views, list[Fields | None], Worker]:
    """The demo's streams emptied, the run, and what it left: the report so far, the
    forecasts read back, the models' events, and the worker."""
    settings = settings.on(client)
    keys, lanes = settings.keys, _lanes(settings)
    for version in cast(list[bytes], client.lrange(keys.versions, 0, -1)):  # the last run's
        client.delete(keys.model(version.decode()), keys.model_signature(version.decode()))
    client.delete(keys.input, keys.partitions, keys.pool, keys.models, keys.versions)
    client.delete(keys.serving, keys.finetune_lock, keys.finetune_fence)
    for lane in lanes:
        client.delete(lane.input, lane.output, lane.dead, lane.anomalies, lane.state, lane.lease)
        client.delete(lane.fence, lane.handling)
    worker = Worker(client, engine=engine, settings=settings, metrics=Metrics())
    report = _run(client, url, worker, settings, plan, progress)
    views = read_views(client, keys, partitions=settings.partitions)
    report |= summary(views)
    report["entries"] = sum(client.xlen(lane.input) for lane in lanes)
    report["dead"] = sum(client.xlen(lane.dead) for lane in lanes)
    return report, views, _events(ModelStore(client, keys, keep=1, source="demo")), worker


def _events(store: ModelStore) -> list[Fields | None]:
    """Every event of the models stream, a page at a time (one read gave the first 100:
    a long demo's later promotions went unseen)."""
    events: list[Fields | None] = []
    after = b"-"
    while page := store.events(after=after):
        events += [fields for _, fields in page]
        after = page[-1][0]
    return events


@contextlib.contextmanager
def _only_demo(client: redis.Redis) -> Iterator[None]:
    """The demo's lock on this server (SET NX with a TTL) for the block, renewed while
    it runs: two demos on one Redis emptied each other's streams and each reported the
    mix, exit 0. A ValueError where another demo holds it."""
    lock = client.lock(DEMO_LOCK, timeout=LOCK_TTL_S, thread_local=False)
    if not lock.acquire(blocking=False):
        raise ValueError(
            f"another demo is running on this Redis: it holds {DEMO_LOCK!r} (a demo killed "
            f"lets go of it within {LOCK_TTL_S:g} s); wait for it to end, or unset "
            "ATTNLSTM_REDIS_URL to run this one on an embedded server of its own"
        )
    done = threading.Event()
    renewer = threading.Thread(target=_renew, args=(lock, done), name="demo-lock", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        done.set()
        renewer.join()
        with contextlib.suppress(LockError, redis.RedisError):  # lost, or the server gone
            lock.release()


def _renew(lock: Lock, done: threading.Event) -> None:
    """The lock's TTL set afresh every third of it, until ``done``."""
    while not done.wait(LOCK_TTL_S / 3):
        try:
            lock.reacquire()
        except (LockError, redis.RedisError) as e:
            log.warning("could not renew the demo's lock %s: %s", DEMO_LOCK, e)


def _online(worker: Worker, events: list[Fields | None]) -> dict[str, Any]:
    """What the worker scored as it went, and what its fine-tuning did."""
    kinds = [f[b"event"].decode() for f in events if f is not None]
    return {
        "model": worker.engine.version if worker.engine else None,
        "rolling_mae": _finite(worker.scores.mae),
        "rolling_naive_mae": _finite(worker.scores.naive_mae),
        "finetunes": worker.tuner.cycles,
        "promoted": max(kinds.count("promoted") - 1, 0),  # the first: the model file
        "rejected": kinds.count("rejected"),
    }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _draw_errors(
    views: dict[str, SeriesView],
    events: list[Fields | None],
    report: dict[str, Any],
    plan: DemoPlan,
    out_dir: Path,
) -> Path:
    """mae.png: the one-step MAE per second over the run, promotions (and the drift)
    marked; with a drift, its figures go in the report."""
    errors = errors_by_time(views, bucket_ms=1000.0)
    when = errors["t_ms"].astype("datetime64[ms]")
    marks = [
        (np.datetime64(int(f[b"ts"]), "ms"), f"promoted {f[b'version'].decode()[:8]}")
        for f in events[1:]  # the first promotion is the model file's, at the start
        if f is not None and f[b"event"] == b"promoted"
    ]
    if plan.drift_at is not None:
        # When the sines changed: the median time of each series' value at drift_at.
        at = np.concatenate([v.target_ms[v.position == plan.drift_at] for v in views.values()])
        if at.size:  # else the run stopped before the drift
            drift_ms = float(np.median(at))
            marks.append((np.datetime64(int(drift_ms), "ms"), "drift"))
            trained = [int(f[b"ts"]) for f in events if f is not None and f[b"event"] == b"trained"]
            report |= _drift_figures(errors, drift_ms, trained)
    promoted = sum(label.startswith("promoted") for _, label in marks)
    title = f"one-step MAE per second, {len(views)} series; {promoted} models promoted"
    return plot_error_over_time(
        when, errors["mae"], errors["naive_mae"], out_dir / "mae.png", title=title, marks=marks
    )


def _drift_figures(
    errors: dict[str, np.ndarray], drift_ms: float, trained_ms: list[int]
) -> dict[str, Any]:
    """MAE in the 10 s before the drift, its worst second after, when (seconds after
    the drift) it first came back within 1.5x of before, and how many fine-tunes had
    finished after the drift by then."""
    t, mae = errors["t_ms"], errors["mae"]
    before = mae[(t + 1000 <= drift_ms) & (t >= drift_ms - 11_000)]  # whole seconds
    after_t, after = t[t >= drift_ms + 1000], mae[t >= drift_ms + 1000]
    if not before.size or not after.size:
        return {}
    level = float(before.mean())
    back = np.flatnonzero(after <= 1.5 * level)
    back_ms = float(after_t[back[0]]) if back.size else None
    return {
        "mae_before_drift": level,
        "mae_worst_after_drift": float(after.max()),
        "mae_last_10s": float(mae[t >= t[-1] - 10_000].mean()),
        "back_within_1_5x_after_s": (
            round((back_ms - drift_ms) / 1000, 1) if back_ms is not None else None
        ),
        "finetunes_until_back": (
            sum(drift_ms < ts <= back_ms for ts in trained_ms) if back_ms is not None else None
        ),
    }


def _natural(name: str) -> tuple[str, int]:
    """sine-2 before sine-10."""
    head, _, tail = name.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (name, -1)


def _model(out_dir: Path, plan: DemoPlan, progress: bool) -> Path:
    """The cached demo model for this data, or a new one trained on it."""
    spec = f"csv:{plan.csv}" if plan.csv else "sines"
    path = out_dir / (
        "model.safetensors" if plan.csv is None else f"model-{plan.csv.stem}.safetensors"
    )
    try:
        if load(path).meta.get("data") == spec:
            log.info("reusing the demo model %s", path)
            return path
    except (CheckpointError, OSError):
        pass
    log.info("training a model on %s for the demo (about 15 s)", spec)
    dataset = load_csv(plan.csv) if plan.csv else load_dataset("sines", n_series=50, seed=0)
    shape = dataset_config(dataset, dataset.daily_period())  # as `attnlstm train`
    config = TrainConfig(weight_decay=SEASONAL_WEIGHT_DECAY if shape.period else 0.0)
    model, result, metrics = train_model(
        dataset, shape, config, val_fraction=HELD_OUT, progress=progress
    )
    save(path, model, training_meta(spec, dataset, config, result, metrics, val_fraction=HELD_OUT))
    return path


def _lanes(settings: Settings) -> list[Keys]:
    """The keys of each partition the demo's worker serves."""
    return [settings.keys.partition(k, settings.partitions) for k in range(settings.partitions)]


def _replay_child(
    url: str, settings: Settings, plan: DemoPlan, parent: int, errors: Connection
) -> None:
    """The demo's producer, in its own process, as a real producer would be, for
    ``plan.seconds`` at most (a CSV file too). Ctrl-C is the parent's to handle: this
    process starts deaf to it (see :func:`_run`), and the parent stops it; so does the
    parent's death, even by kill -9, after which the replay went on writing. An error of
    the user's or of Redis goes to the parent through ``errors``, for one line there."""
    die_with_parent(parent)
    # tqdm's default lock is a multiprocessing semaphore, which this process, stopped by
    # SIGTERM, left behind (the resource tracker warned of it at exit): a thread lock.
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(1)
    try:
        client = connect(url, socket_timeout_s=30, client_name="replay", cluster=settings.cluster)
        if plan.csv is not None:
            entries = csv_entries(plan.csv)
        else:
            entries = sine_entries(plan.sines(), seed=plan.seed, bad_rate=plan.bad_rate)
        replay(
            client,
            settings.input_stream,
            entries,
            rate=plan.rate,
            seconds=plan.seconds,
            partitions=settings.partitions,
        )
        client.close()
    except (DataError, ValueError, redis.RedisError) as e:
        errors.send(str(e))
        sys.exit(1)


def _run(
    client: redis.Redis,
    url: str,
    worker: Worker,
    settings: Settings,
    plan: DemoPlan,
    progress: bool,
) -> dict[str, Any]:
    """The worker (a thread) and the replay (a process) until the replay is done and
    the worker has caught up, or Ctrl-C."""
    served = Served(worker)
    thread = served.thread
    spawn = multiprocessing.get_context("spawn")
    errors, child_errors = spawn.Pipe(duplex=False)
    producer = spawn.Process(
        target=_replay_child,
        args=(url, settings, plan, os.getpid(), child_errors),
        name="replay",
    )
    started = time.monotonic()
    interrupted = False
    thread.start()
    # It imports torch for 1-2 s before it runs a line of its own: deaf to Ctrl-C first.
    with deaf_children():
        producer.start()
    child_errors.close()  # the child's end: ours closed, its death reads as the end
    try:
        _wait(client, settings, producer, plan, progress, thread)
    except KeyboardInterrupt:
        interrupted = True
        log.info("interrupted: stopping the replay and the worker")
    finally:
        _stop(worker, thread, producer)
    if served.error is not None:
        raise served.error
    if producer.exitcode not in (0, -15) and not interrupted:
        raise ValueError(f"the demo's replay failed: {_said(errors, producer.exitcode)}")
    return {"seconds": round(time.monotonic() - started, 1), "interrupted": interrupted}


def _stop(
    worker: Worker, thread: threading.Thread, producer: multiprocessing.process.BaseProcess
) -> None:
    """The worker first, then the replay; the server, the caller's, goes after. Deaf to
    stop signals meanwhile: a second Ctrl-C that cut this short skipped the worker's
    stop, and its thread retried forever on a server gone."""
    with handled(STOP_SIGNALS, signal.SIG_IGN):
        worker.stop()
        if producer.is_alive():
            producer.terminate()
        producer.join()
        thread.join(timeout=CATCH_UP_S)
    if thread.is_alive():
        log.warning("the worker had not stopped %.0f s after it was asked to", CATCH_UP_S)


def _said(errors: Connection, exitcode: int | None) -> str:
    """What the replay's process sent before it failed, or how it ended."""
    try:
        said = errors.recv() if errors.poll() else None
    except EOFError:  # it sent nothing
        said = None
    return str(said) if said else f"its process ended with exit code {exitcode}"


def _wait(
    client: redis.Redis,
    settings: Settings,
    producer: multiprocessing.process.BaseProcess,
    plan: DemoPlan,
    progress: bool,
    worker: threading.Thread,
) -> None:
    """Until the replay is done and the worker has caught up with it; at once where the
    worker's thread has stopped (its error is the demo's): a worker that failed at its
    start was said only after the whole replay, and a minute more."""
    lanes = _lanes(settings)
    with tqdm(total=plan.seconds, desc="demo", unit=" s", disable=not progress) as bar:
        started = time.monotonic()
        while producer.is_alive() and worker.is_alive():
            time.sleep(0.5)
            bar.n = round(time.monotonic() - started, 1)
            forecasts = sum(client.xlen(lane.output) for lane in lanes)
            bar.set_postfix(forecasts=forecasts, dead=sum(client.xlen(lane.dead) for lane in lanes))
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline and worker.is_alive():
        if all(_caught_up(client, lane) for lane in lanes):
            return
        time.sleep(0.1)
    if not worker.is_alive():
        return  # its error, said by the caller
    log.warning("the worker had not caught up %.0f s after the replay ended", CATCH_UP_S)


def _caught_up(client: redis.Redis, lane: Keys) -> bool:
    """The worker has handled every entry of the lane's input (none: nothing to do). Not
    before it made its group: a short replay could end first, and NOGROUP ended the demo."""
    if not client.exists(lane.input):
        return True
    try:
        info = group_info(client, lane)
    except redis.ResponseError as e:
        if str(e).startswith("NOGROUP"):
            return False
        raise
    return info.get("lag") == 0 and info.get("pending") == 0


def _held_out(views: dict[str, SeriesView], path: Path) -> dict[str, Any]:
    """MAE against naive on the forecasts for each series' held-out tail: the points the
    model was not fitted to (its early-stopping validation slice)."""
    dataset = load_csv(path)
    out: dict[str, Any] = {}
    for column, values in zip(dataset.names, dataset.series, strict=True):
        view = views.get(series_id(column))
        if view is None:
            continue
        keep = view.scored & (view.position >= split_point(len(values), 0.2))
        model, naive = view.forecast[keep] - view.actual[keep], view.naive[keep] - view.actual[keep]
        out[f"held_out_{view.name}"] = {  # no MAE where the run stopped before the tail
            "points": int(keep.sum()),
            "mae": float(abs(model).mean()) if keep.any() else None,
            "naive_mae": float(abs(naive).mean()) if keep.any() else None,
        }
    return out
