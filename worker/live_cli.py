"""The commands that talk to a live system: ``replay``, ``demo``, ``plot --from-stream``.

Their flags and their wiring; :mod:`worker.cli` dispatches to them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import redis
import torch

from attnlstm.synthetic import SineSpec
from worker.argtypes import number, positive, rate
from worker.demo import DemoPlan, run_demo
from worker.models import ModelStore
from worker.readback import draw, read_views, summary
from worker.replay import CsvLayout, Fields, csv_entries, replay, sine_entries
from worker.settings import Settings, from_flags
from worker.streams import connect


def add_replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
    p.add_argument("--stream", default=None, help="(default: ATTNLSTM_INPUT_STREAM or sensors)")
    pace = p.add_mutually_exclusive_group(required=True)
    pace.add_argument("--rate", type=rate, help="entries per second, steady")
    pace.add_argument("--fast", action="store_true", help="as fast as Redis takes them")
    p.add_argument("--seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--maxlen", type=positive, default=None, help="approximate cap (XADD MAXLEN ~)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    sines = p.add_argument_group("sines (the default source)")
    spec = SineSpec()
    sines.add_argument("--series", type=positive, default=spec.n_series, help="(default 50)")
    sines.add_argument(
        "--points",
        type=positive,
        default=None,
        help="per series (default: enough for --seconds at --rate, else 1000)",
    )
    sines.add_argument("--seed", type=int, default=0, help="same seed, same entries (default 0)")
    sines.add_argument("--prefix", default="sine-", help="series ids are PREFIX0.. (sine-)")
    for flag, name, what in (
        ("--freq", "freq", "angular step, radians per point"),
        ("--amplitude", "amplitude", "amplitude"),
        ("--offset", "offset", "level"),
        ("--drift-factor", "drift_factor", "multiplier at --drift-at"),
    ):
        lo, hi = getattr(spec, name)
        sines.add_argument(
            flag, nargs=2, type=number, metavar=("LO", "HI"), help=f"{what} (default {lo} {hi})"
        )
    sines.add_argument("--noise", type=float, default=0.0, help="std, in amplitudes (default 0)")
    sines.add_argument("--drift-at", type=positive, default=None, help="step where drift starts")
    sines.add_argument(
        "--drift-kind", choices=["frequency", "amplitude"], default="frequency", help="(frequency)"
    )
    sines.add_argument("--anomaly-rate", type=float, default=0.0, help="share of spikes (0)")
    sines.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed entries (0)")
    table = p.add_argument_group("CSV")
    table.add_argument("--csv", type=Path, default=None, help="replay this file instead of sines")
    table.add_argument("--time-column", default=None, help="(default: the first column)")
    table.add_argument(
        "--column", action="append", default=[], help="value column, repeatable (default: all)"
    )
    table.add_argument("--series-column", default=None, help="long format: the series id column")
    table.add_argument("--value-column", default="value", help="long format (default value)")


def _replay_source(args: argparse.Namespace) -> tuple[Iterable[Fields], int | None]:
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
def _redis(settings: Settings, command: str) -> Iterator[redis.Redis]:
    """A client for the configured Redis; a lost connection is a one-line error."""
    url = settings.url()
    if url is None:
        raise ValueError(
            f"{command} needs a Redis: set ATTNLSTM_REDIS_URL or pass --redis-url "
            "(`attnlstm demo` runs an embedded one with a worker and a replay)"
        )
    client = connect(url, socket_timeout_s=settings.socket_timeout_s, client_name=command)
    try:
        yield client
    except redis.ConnectionError as e:
        raise ValueError(f"cannot reach Redis at {settings.url_for_logs()}: {e}") from None
    finally:
        client.close()


def run_replay(args: argparse.Namespace) -> dict[str, Any]:
    entries, total = _replay_source(args)
    settings = from_flags(redis_url=args.redis_url, input_stream=args.stream)
    with _redis(settings, "replay") as client:
        return replay(
            client,
            settings.input_stream,
            entries,
            rate=args.rate,
            seconds=args.seconds,
            maxlen=args.maxlen,
            total=total,
            progress=not args.json and sys.stderr.isatty(),
        )


def add_demo_args(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--seconds", type=float, default=60.0, help="replay length (default 60)")
    demo.add_argument("--series", type=positive, default=50, help="sine series (default 50)")
    pace = demo.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=rate, default=None, help="entries/s (default 500 for sines)")
    pace.add_argument("--fast", action="store_true", help="replay as fast as Redis takes it")
    demo.add_argument("--csv", type=Path, default=None, help="replay this file, not sines")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="(default demo-out)")
    demo.add_argument("--points", type=positive, default=200, help="forecasts drawn (200)")
    demo.add_argument("--noise", type=float, default=0.0, help="sine noise, in amplitudes (0)")
    demo.add_argument("--drift-at", type=positive, default=None, help="step where sines drift")
    demo.add_argument(
        "--finetune-interval-s",
        type=float,
        default=None,
        help="(default: ATTNLSTM_FINETUNE_INTERVAL_S or 300; 0: off)",
    )
    demo.add_argument("--device", default=None, help="auto, cpu or cuda (default auto)")
    demo.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run_demo_command(args: argparse.Namespace) -> dict[str, Any]:
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


def add_live_plot_args(plot: argparse.ArgumentParser) -> None:
    live = plot.add_argument_group("--from-stream")
    live.add_argument("--from-stream", action="store_true", help="read the live streams")
    live.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
    live.add_argument(
        "--last", type=positive, default=100_000, help="output entries to search (100000)"
    )
    live.add_argument("--points", type=positive, default=200, help="forecasts drawn (200)")


def series_count(text: str) -> int:
    try:
        return positive(text)
    except argparse.ArgumentTypeError as e:
        raise ValueError(f"--series: {e} (a series id needs --from-stream)") from None


def run_live_plot(args: argparse.Namespace) -> dict[str, Any]:
    if isinstance(args.series, int):
        raise ValueError("plot --from-stream needs --series ID: the series to draw")
    settings = from_flags(redis_url=args.redis_url)
    with _redis(settings, "plot") as client:
        views = read_views(client, settings.keys, series={args.series}, newest=args.last)
    if args.series not in views:
        raise ValueError(
            f"no forecast for series {args.series!r} among the last {args.last:,} entries "
            f"of {settings.output_stream}"
        )
    written = draw(views, args.out, shown=[args.series], points=args.points, label=args.series)
    return summary(views) | {"series": args.series, "written": [str(w) for w in written]}


def add_models_args(models: argparse.ArgumentParser) -> None:
    what = models.add_subparsers(dest="action", required=True, parser_class=type(models))
    listing = what.add_parser("list", help="stored versions, the serving one, recent events")
    listing.add_argument("--events", type=positive, default=10, help="events shown (default 10)")
    back = what.add_parser("rollback", help="serve a stored version again, from the next batch")
    back.add_argument("version", help="a version from `attnlstm models list`")
    for action in (listing, back):
        action.add_argument("--redis-url", default=None, help="(default: ATTNLSTM_REDIS_URL)")
        action.add_argument(
            "--models-stream", default=None, help="(default: ATTNLSTM_MODELS_STREAM or models)"
        )
        action.add_argument("--json", action="store_true", help="one JSON object, last line")


def run_models(args: argparse.Namespace) -> dict[str, Any]:
    settings = from_flags(redis_url=args.redis_url, models_stream=args.models_stream)
    with _redis(settings, "models") as client:
        store = ModelStore(client, settings.keys, keep=settings.keep_models, source="cli")
        if args.action == "rollback":
            checkpoint = store.get(args.version)  # refuses a missing or damaged version
            before = store.serving()
            store.switch(checkpoint.version, "rolled_back", previous=before)
            return {"serving": checkpoint.version, "previous": before}
        events = [
            {k.decode(): v.decode() for k, v in fields.items()} | {"id": entry_id.decode()}
            for entry_id, fields in reversed(store.recent_events(args.events))
            if fields is not None
        ]
        return {"serving": store.serving(), "versions": store.versions(), "events": events}
