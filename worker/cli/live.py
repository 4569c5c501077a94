"""The commands that talk to a live system: ``worker``, ``replay``, ``demo``,
``plot --from-stream``, ``models`` and ``bench``. Each takes the parsed arguments and
returns the figures it reports; :mod:`worker.cli` dispatches to them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import redis
import torch

from attnlstm.checkpoint import dumps, open_checkpoint
from attnlstm.device import resolve_device
from attnlstm.partition import partition_of
from attnlstm.synthetic import SineSpec
from worker.app import run_service
from worker.cli.parser import WORKER_FLAGS
from worker.online.store import ModelStore
from worker.settings import Settings, from_flags
from worker.streams import connect
from worker.tools import RUNS
from worker.tools.bench import BenchPlan, run_bench
from worker.tools.demo import DemoPlan, run_demo
from worker.tools.poolbench import PoolPlan, run_pool_bench
from worker.tools.readback import draw, read_views, summary
from worker.tools.replay import CsvLayout, FlatFields, csv_entries, replay, sine_entries

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    return run_service(worker_settings(args), burst=args.burst)


def worker_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment and .env, with the flags that were given on top."""
    return from_flags(**{name: getattr(args, name) for _, name, _, _ in WORKER_FLAGS})


def bench_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level="INFO", format=LOG_FORMAT)
    torch.set_num_threads(args.threads)
    if args.workers and args.runs:
        raise ValueError("--runs picks parts of the bench of one worker, not of a pool (--workers)")
    flags = {**vars(args), "runs": args.runs or RUNS}  # named after the plan's fields
    names = [f.name for f in dataclasses.fields(BenchPlan) if f.name in flags]
    plan = BenchPlan(**{name: flags[name] for name in names})
    model = open_checkpoint(args.model).model if args.model else None
    device = resolve_device(args.device)
    if args.workers:
        pool = PoolPlan(
            workers=args.workers,
            partitions=args.partitions,
            entries=args.entries,
            series=args.series,
            cluster=not args.no_cluster,
        )
        return run_pool_bench(plan=pool, device=device, url=args.redis_url, model=model)
    return run_bench(plan=plan, device=device, url=args.redis_url, model=model)


def _replay_source(args: argparse.Namespace) -> tuple[Iterable[FlatFields], int | None]:
    """The entries to write, and how many there are when that is known."""
    if args.csv is not None:
        layout = CsvLayout(
            time_column=args.time_column,
            value_columns=tuple(args.column),
            series_column=args.series_column,
            value_column=args.value_column,
        )
        return csv_entries(args.csv, layout), None
    points = args.points
    if points is None and args.seconds is not None:
        if args.rate is None:
            raise ValueError("--seconds with --fast needs --points: how many to write")
        points = max(2, math.ceil(args.seconds * args.rate / args.series))
    default = SineSpec()
    spec = SineSpec(
        n_series=args.series,
        n_points=points or 1000,
        freq=args.freq or default.freq,
        amplitude=args.amplitude or default.amplitude,
        offset=args.offset or default.offset,
        noise=args.noise,
        drift_at=args.drift_at,
        drift_kind=args.drift_kind,
        drift_factor=args.drift_factor or default.drift_factor,
        anomaly_rate=args.anomaly_rate,
    )
    if not 0.0 <= args.bad_rate <= 1.0:
        raise ValueError(f"--bad-rate must be in [0, 1], got {args.bad_rate}")
    entries = sine_entries(spec, seed=args.seed, bad_rate=args.bad_rate, prefix=args.prefix)
    return entries, None if args.bad_rate else spec.n_series * spec.n_points


@contextlib.contextmanager
def _redis(settings: Settings, command: str) -> Iterator[tuple[redis.Redis, Settings]]:
    """A client for the configured Redis, and the settings for it (a cluster's keys on a
    Redis Cluster); a lost connection is a one-line error."""
    url = settings.url()
    if url is None:
        raise ValueError(
            f"{command} needs a Redis: set ATTNLSTM_REDIS_URL or pass --redis-url "
            "(`attnlstm demo` runs an embedded one with a worker and a replay)"
        )
    try:
        client = connect(
            url,
            socket_timeout_s=settings.socket_timeout_s,
            client_name=command,
            cluster=settings.cluster,
        )
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {settings.url_for_logs()}: {e}") from None
    try:
        yield client, settings.on(client)
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {settings.url_for_logs()}: {e}") from None
    finally:
        client.close()


def replay_command(args: argparse.Namespace) -> dict[str, Any]:
    entries, total = _replay_source(args)
    settings = from_flags(
        redis_url=args.redis_url, input_stream=args.stream, partitions=args.partitions
    )
    with _redis(settings, "replay") as (client, settings):
        return replay(
            client,
            settings.input_stream,
            entries,
            rate=args.rate,
            seconds=args.seconds,
            maxlen=args.maxlen,
            total=total,
            progress=not args.json and sys.stderr.isatty(),
            partitions=settings.partitions,
        )


def demo_command(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level="INFO", format=LOG_FORMAT)
    torch.set_num_threads(1)  # the worker's; Redis and the replay have the other cores
    pace = None if args.fast or (args.csv and args.rate is None) else args.rate or 500.0
    plan = DemoPlan(
        seconds=args.seconds,
        series=args.series,
        rate=pace,
        csv=args.csv,
        points=args.points,
        noise=args.noise,
        drift_at=args.drift_at,
    )
    settings = from_flags(device=args.device, finetune_interval_s=args.finetune_interval_s)
    progress = not args.json and sys.stderr.isatty()
    try:
        return run_demo(settings, plan, args.out, progress=progress)
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {settings.url_for_logs()}: {e}") from None


def live_plot_command(args: argparse.Namespace) -> dict[str, Any]:
    if isinstance(args.series, int):
        raise ValueError("plot --from-stream needs --series ID: the series to draw")
    settings = from_flags(redis_url=args.redis_url, partitions=args.partitions)
    with _redis(settings, "plot") as (client, settings):
        views = read_views(
            client,
            settings.keys,
            partitions=settings.partitions,
            series={args.series},
            newest=args.last,
        )
    if args.series not in views:
        k = partition_of(args.series, settings.partitions)
        raise ValueError(
            f"no forecast for series {args.series!r} among the last {args.last:,} entries "
            f"of {settings.keys.partition(k, settings.partitions).output}"
        )
    written = draw(views, args.out, shown=[args.series], points=args.points, label=args.series)
    return summary(views) | {"series": args.series, "written": [str(w) for w in written]}


def models_command(args: argparse.Namespace) -> dict[str, Any]:
    settings = from_flags(
        redis_url=args.redis_url,
        models_stream=args.models_stream,
        model_key_file=args.model_key_file,
    )
    with _redis(settings, "models") as (client, settings):
        store = ModelStore(
            client, settings.keys, keep=settings.keep_models, source="cli", key=settings.model_key()
        )
        if args.action in ("rollback", "promote"):
            store.check_key()
        if args.action == "rollback":
            checkpoint = store.get(args.version)  # refuses a missing, damaged or forged version
            before = store.serving()
            store.set_serving(checkpoint.version, "rolled_back", previous=before)
            return {"serving": checkpoint.version, "previous": before}
        if args.action == "promote":
            checkpoint = open_checkpoint(args.path)
            before = store.serving()
            store.put(dumps(checkpoint.model, checkpoint.meta)[0], checkpoint.version)
            store.set_serving(checkpoint.version, "promoted", reason="promoted by hand")
            return {"serving": checkpoint.version, "previous": before, "signed": bool(store.key)}
        events = [
            {k.decode(): v.decode() for k, v in fields.items()} | {"id": entry_id.decode()}
            for entry_id, fields in reversed(store.recent_events(args.events))
            if fields is not None
        ]
        return {"serving": store.serving(), "versions": store.versions(), "events": events}
